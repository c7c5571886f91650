"""One config dataclass for every supported target (the Llama family) and its presets."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UnsupportedModelError

# model_type values of Hugging Face configs that this runtime implements. All are the Llama
# block (RMSNorm, RoPE, GQA attention, SwiGLU MLP); they differ only in the fields below and in
# their checkpoints' tensor names (koala.loading): Phi-3 stores q|k|v and gate|up fused, Qwen3
# adds a per-head RMSNorm on q and k (qk_norm).
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")


@dataclass
class ModelConfig:
    arch: str = "llama"                 # one of SUPPORTED_ARCHS
    vocab_size: int = 32000             # V
    dim: int = 4096                     # D, the residual width
    n_layers: int = 32
    n_heads: int = 32                   # query heads
    n_kv_heads: int = 32                # key/value heads (GQA when < n_heads)
    head_dim: int = 128                 # usually dim // n_heads; Mistral-Nemo-like configs differ
    intermediate_size: int = 11008      # SwiGLU hidden width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False   # SmolLM2: the LM head is the embedding matrix
    attention_bias: bool = False        # Qwen2: biases on q, k, v (not on o)
    qk_norm: bool = False               # Qwen3: RMSNorm over head_dim on every q and k head, before RoPE
    sliding_window: int | None = None   # Mistral v0.1: 4096; we refuse contexts beyond it
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def n_params(self) -> int:
        D, I, hd = self.dim, self.intermediate_size, self.head_dim
        attn = D * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        per_layer = attn + 3 * D * I + 2 * D
        emb = self.vocab_size * D * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + emb + D

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """From a transformers PretrainedConfig (4.x or 5.x field names)."""
        arch = getattr(hf, "model_type", None)
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; koala runs {', '.join(SUPPORTED_ARCHS)} "
                "(Llama 2/3, Vicuna, Mistral, Qwen2, Qwen3, Phi-3, SmolLM2). Convert the model to one of "
                "these or open an issue for the architecture.")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu/SwiGLU)")
        if getattr(hf, "mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters
        rp = getattr(hf, "rope_parameters", None) or {}
        theta = rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        scaling = getattr(hf, "rope_scaling", None) or (rp if rp.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = {k: v for k, v in dict(scaling).items() if k != "rope_theta"}
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind not in ("linear", "llama3"):
                raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
        # Phi-3.5 / Phi-4-mini rotate only part of each head (partial_rotary_factor 0.75)
        partial = rp.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
        if partial is not None and float(partial) != 1.0:
            raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported (RoPE over whole heads only)")
        n_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
        eos = hf.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        # Mistral v0.1 and Phi-3 apply their window to every layer; Qwen2/3 only with
        # use_sliding_window (then to the layers layer_types marks). Within the window a sliding
        # layer equals a full one, and koala refuses contexts beyond it (sliding_window).
        use_sw = getattr(hf, "use_sliding_window", None)
        if use_sw is None:
            use_sw = arch in ("mistral", "phi3")
        types = getattr(hf, "layer_types", None)
        if use_sw and types is not None and "sliding_attention" not in types:
            use_sw = False
        sw = getattr(hf, "sliding_window", None) if use_sw else None
        bias = getattr(hf, "attention_bias", arch == "qwen2")
        return cls(
            arch=arch, vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
            n_heads=n_heads, n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim, intermediate_size=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(bias), qk_norm=arch == "qwen3", sliding_window=sw,
            bos_token_id=getattr(hf, "bos_token_id", None), eos_token_ids=eos)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS: dict[str, dict] = {
    # SmolLM2-135M-Instruct: 30 layers, D=576, GQA 9/3, tied embeddings
    "smollm2-135m": dict(arch="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, intermediate_size=1536, norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    # Llama-2-7B / Vicuna-7B shape, used for the scale projection with random weights
    "llama-7b": dict(arch="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     head_dim=128, intermediate_size=11008, norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=4096),
    # tiny shapes for tests
    "tiny": dict(arch="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 intermediate_size=128, max_position_embeddings=512),
}


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies (head_dim/2,) with the config's scaling applied, as transformers does."""
    import torch
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor = float(sc["factor"])
        lo, hi = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old = float(sc.get("original_max_position_embeddings", 8192))
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= hi_wl) & (wavelen <= lo_wl)
        return torch.where(medium, smoothed, out)
    raise UnsupportedModelError(f"rope scaling {kind!r} is not supported")
