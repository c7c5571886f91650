"""Parity with transformers on the real SmolLM2-135M-Instruct weights (fp32, CPU)."""
import pytest
import torch

from koala import SpeculativeGenerator
from tests.helpers import hf_greedy

PROMPTS = [
    "What is the capital of France? Answer in two sentences.",
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers and explain what a prime is."}],
]


def test_logits_match_transformers(smollm2, smollm2_hf):
    tok = smollm2.tokenizer
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]])
    with torch.no_grad():
        ref = smollm2_hf(ids).logits
        got, _ = smollm2.model(ids)
    assert (got - ref).abs().max().item() < 1e-3, (got - ref).abs().max().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("prompt", PROMPTS, ids=["string", "messages", "system"])
def test_greedy_ids_equal_transformers_generate(smollm2, smollm2_hf, prompt):
    gen = SpeculativeGenerator(smollm2, max_seq_len=512)
    ours = gen.generate(prompt, max_new_tokens=64, ignore_eos=True)
    ids = gen.encode(prompt)
    with torch.no_grad():
        ref_new = hf_greedy(smollm2_hf, ids, 64)
    assert len(ours.token_ids) == 64
    assert ours.token_ids == ref_new


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_shipped_default_heads_are_lossless(smollm2, kind):
    """The heads in koala/default_heads load for the embedded model, draft real tokens, and the
    output equals plain greedy decoding (fp32, CPU)."""
    from koala.speculative import resolve_draft
    head = resolve_draft("default" if kind == "eagle" else "default-medusa", smollm2)
    assert head.config.kind == kind and head.config.layers >= 2    # KOALA heads: K >= 2
    plain = SpeculativeGenerator(smollm2, max_seq_len=512)
    spec = SpeculativeGenerator(smollm2, head, max_seq_len=512, mode="chain")
    prompt = PROMPTS[1]
    ref = plain.generate(prompt, max_new_tokens=40, ignore_eos=True)
    res = spec.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert res.token_ids == ref.token_ids
    assert res.stats.tau > 1.0  # trained heads get some drafts accepted


def test_default_head_refuses_another_target(tmp_path):
    from koala import HeadMismatchError, load_target
    from koala.speculative import resolve_draft
    from tests.helpers import make_hf_checkpoint
    path, _ = make_hf_checkpoint(tmp_path, "llama")
    with pytest.raises(HeadMismatchError, match="shipped for smollm2-135m-instruct"):
        resolve_draft("default", load_target(path, device="cpu"))
