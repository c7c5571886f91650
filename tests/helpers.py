"""Tiny random Hugging Face checkpoints of each supported architecture, written to disk."""
from pathlib import Path

import torch


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


ARCHS = {
    "llama": dict(model_type="llama"),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "llama3-rope": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-linear-rope": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "phi3": dict(model_type="phi3", pad_token_id=0),
}


def make_hf_checkpoint(tmp: Path, arch: str, seed: int = 0, vocab: int = 128, scale: float = 1.0,
                       max_positions: int = 256):
    from transformers import AutoConfig, AutoModelForCausalLM
    spec = dict(ARCHS[arch])
    mt = spec.pop("model_type")
    scaling = spec.pop("rope_scaling", None)
    cfg = AutoConfig.for_model(mt, vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                               rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, **spec)
    if scaling is not None:  # transformers 4.x and 5.x spell rope settings differently
        if hasattr(cfg, "rope_parameters") and cfg.rope_parameters is not None:
            cfg.rope_parameters = {**cfg.rope_parameters, **scaling}
        else:
            cfg.rope_scaling = scaling
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if mt == "qwen2":  # biases start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    if mt == "qwen3":  # q/k norm weights start at one: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.3)
                layer.self_attn.k_norm.weight.normal_(1, 0.3)
    if scale != 1.0:  # sharper or flatter next-token distributions
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    path = tmp / f"{arch}-{vocab}-{seed}" if max_positions == 256 else tmp / f"{arch}-{vocab}-{seed}-{max_positions}"
    model.save_pretrained(path)
    word_tokenizer(vocab).save_pretrained(path)
    return path, model


def hf_greedy(hf, ids, n: int):
    """Exactly n greedy tokens from transformers' generate, with EOS handling switched off on the
    model's own generation config (generate merges it in; min_new_tokens would instead suppress
    the EOS logit, which changes the greedy choice)."""
    gc = hf.generation_config
    saved = gc.eos_token_id
    gc.eos_token_id = None
    try:
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        gc.eos_token_id = saved
    new = out[0, len(ids):].tolist()
    assert len(new) == n
    return new


def logits_and_caches(model, ids, spans, window: int):
    """Run model (its cache set up) over ids (1, n) in the given (start, end) spans, each a forward
    at slots start..end-1 under a causal mask of `window` slots, with no grad; return each span's
    logits and then every layer's k|v cache up to the last span's end: what the bitwise tests of
    the fused path's switches compare between two settings."""
    from koala.model import causal_mask
    got = []
    with torch.no_grad():
        for a, b in spans:
            s = torch.arange(a, b, device=ids.device)
            got.append(model(ids[:, a:b], s[None], s, causal_mask(s, window))[0])
    end = spans[-1][1]
    return got + [torch.cat([l.attention.kv_cache.k[:, :, :end], l.attention.kv_cache.v[:, :, :end]])
                  for l in model.layers]
