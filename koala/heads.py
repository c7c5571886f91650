"""Draft heads (Medusa and EAGLE, each with K independent layers) and their checkpoint format.

Terms, used the same way everywhere in koala:
  * h_t, the *feature* at position t: the target's final-norm hidden state (what its LM head
    reads; `Transformer.forward` returns it as `hidden`).
  * Medusa head i (0-based) reads h_t and predicts x_{t+2+i}: the target's own LM head already
    gives x_{t+1}, head 0 the token after it.
  * The EAGLE head reads [embedding(x_{t+1}); f_t] and predicts f_{t+1}; its logits are the
    target's LM head applied to that predicted feature. When drafting it feeds its own features back.

The target's embedding and LM head are *shared and frozen*: the heads hold references to them
that are not registered as submodules, so they are never trained, moved, or saved with the head.

Checkpoint (`save_pretrained` / `load_head`): `config.json` + `model.safetensors` holding only
the head's own weights; any file over 16 MiB is sharded (`model-0000k-of-0000n.safetensors`
with `model.safetensors.index.json`); a single tensor over the limit is split by rows. Optional
`token_counts.safetensors`: how often each token occurs in the answers of the training data
(`python -m train.vocab`), from which a *draft vocabulary* is chosen (`set_draft_vocab`).

Draft vocabulary: drafting from the n most frequent tokens only replaces the LM head's V rows by
n at every drafted level (V = 49,152 for SmolLM2, a 56 MB read at each level). It is lossless:
the target verifies with its whole vocabulary. Greedy, a drafted token is always one of the n, and
a target's choice outside them is simply never drafted (it still comes out as the bonus token);
sampled, the draft's q is zero outside them, which speculative sampling's acceptance test and
residual handle like any other q.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import CheckpointError, HeadMismatchError, KoalaError
from .model import Block, CachedStack, Rotary, Transformer, _fused, _row_config, _small_m

FORMAT = "koala-draft-head"
FORMAT_VERSION = 1
MAX_SHARD_BYTES = 16 * 2**20     # GitHub-friendly: every committed file stays under 16 MiB
KINDS = ("medusa", "eagle")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
COUNTS = "token_counts.safetensors"
# fields of ModelConfig that define the network; eos/bos ids are left out because load_target
# adds ids from generation_config.json, and the same weights must keep the same fingerprint
_IDENTITY_FIELDS = ("arch", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "intermediate_size", "norm_eps", "rope_theta", "rope_scaling",
                    "tie_word_embeddings", "attention_bias")


# ----------------------------------------------------------------------------------------------
# config

@dataclass
class DraftConfig:
    kind: str = "eagle"          # "medusa" | "eagle"
    layers: int = 1              # K: ResBlocks per Medusa head / decoder layers of the EAGLE head
    n_heads: int = 4             # Medusa only: head i predicts x_{t+2+i} from h_t
    shared_lm_head: bool = True  # Medusa: True = the target's LM head, frozen, for every head;
    #                              False = one trained projection per head, initialised from it
    #                              (49152 x 576 for SmolLM2: each as large as the whole target)
    chain_depth: int | None = None  # the chain depth the decoder uses when none is asked for: the
    #                              one that measured fastest for this head (bench.mtbench --depths);
    #                              None: the decoder's own default
    draft_vocab: int | None = None  # draft from the head's `draft_vocab` most frequent tokens only
    #                              (counts in token_counts.safetensors): a smaller LM head at every
    #                              drafted level; verification keeps the whole vocabulary, so the
    #                              output does not change. None: the whole vocabulary

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"DraftConfig.kind must be 'medusa' or 'eagle', got {self.kind!r}")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or not 1 <= self.layers <= 8:
            raise ValueError(f"DraftConfig.layers (K) must be an integer in 1..8, got {self.layers!r}")
        if isinstance(self.n_heads, bool) or not isinstance(self.n_heads, int) or not 1 <= self.n_heads <= 8:
            raise ValueError(f"DraftConfig.n_heads must be an integer in 1..8, got {self.n_heads!r}")
        if not isinstance(self.shared_lm_head, bool):
            raise ValueError(f"DraftConfig.shared_lm_head must be True or False, got {self.shared_lm_head!r}")
        d = self.chain_depth
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= 16
                              or (self.kind == "medusa" and d > self.n_heads)):
            most = self.n_heads if self.kind == "medusa" else 16
            raise ValueError(f"DraftConfig.chain_depth must be None or an integer in 1..{most}, got {d!r}")
        n = self.draft_vocab
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"DraftConfig.draft_vocab must be None or a positive integer, got {n!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def build(self, target, target_name: str | None = None) -> "MedusaHead | EagleHead":
        """An untrained head for target (a LoadedTarget or a Transformer), on its device and dtype."""
        model, name = _unpack_target(target, target_name)
        cls = MedusaHead if self.kind == "medusa" else EagleHead
        return cls(self, model, name)


def parse_draft_vocab(text: str, keep: str = "head"):
    """A draft vocabulary from the command line: `keep` (returned as is), 'none' or 'all' (None:
    every token), or a positive integer."""
    if text == keep:
        return keep
    if text.lower() in ("none", "all"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise KoalaError(f"a draft vocabulary must be a positive integer, 'none' or '{keep}', got {text!r}")
    return n


def _unpack_target(target, target_name=None) -> tuple[Transformer, str]:
    model = getattr(target, "model", target)
    if not isinstance(model, Transformer):
        raise TypeError(f"target must be a koala LoadedTarget or Transformer, got {type(target).__name__}")
    name = target_name or getattr(target, "name", None) or "unnamed-target"
    return model, name


def target_fingerprint(model: Transformer) -> str:
    """Short hash of the target's architecture plus a checksum of a few embedding rows.
    Rows are rounded to bf16 first, so the same weights loaded in fp32 or bf16 (CPU or GPU) agree."""
    cfg = model.config.to_dict()
    ident = {k: cfg[k] for k in _IDENTITY_FIELDS}
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
    emb = model.tok_embeddings.weight
    V = emb.shape[0]
    rows = torch.tensor(sorted({0, 1, V // 3, V // 2, V - 1}), device=emb.device)
    sample = emb.detach().index_select(0, rows).to(torch.bfloat16).float().cpu()
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


class _Frozen:
    """Plain holder for the target's shared, frozen modules: not an nn.Module attribute, so they
    are not parameters of the head (not trained, not moved by .to(), not in the state dict)."""

    def __init__(self, model: Transformer):
        self.embedding = model.tok_embeddings   # (V, D)
        self.lm_head = model.output             # (V, D), no bias


class _DraftHead(nn.Module):
    config: DraftConfig

    def __init__(self, config: DraftConfig, target: Transformer, target_name: str):
        super().__init__()
        self.config = config
        self.target_config: ModelConfig = target.config
        self.target_name = target_name
        self.target_fingerprint = target_fingerprint(target)
        self._frozen = _Frozen(target)
        # (V,) int64: each token's count in the training answers (token_counts.safetensors), or None
        self.token_counts: torch.Tensor | None = None
        self.vocab_ids: torch.Tensor | None = None   # (n,) the draft vocabulary, ascending ids; None: all
        self.vocab_index: torch.Tensor | None = None  # (V,) int32: a token's index in vocab_ids, or -1
        self._vocab_w: list | None = None            # the gathered projection rows, one per projection

    def lm_head(self, x):  # x (..., D) -> (..., V) with the target's frozen LM head
        w = self._frozen.lm_head.weight
        return F.linear(x.to(w.dtype), w)

    # ---- draft vocabulary (inference only: training always uses the whole vocabulary)
    def _projections(self) -> list:
        """The (weight, bias) of every projection to the vocabulary this head drafts with."""
        return [(self._frozen.lm_head.weight, None)]

    @property
    def draft_vocab_size(self) -> int:
        return self.target_config.vocab_size if self.vocab_ids is None else int(self.vocab_ids.numel())

    def set_draft_vocab(self, n: int | None):
        """Draft from the n most frequent tokens of token_counts (None or n >= V: all of them).
        Gathers the projections' rows once, on the head's device: call it again after moving
        the head."""
        V = self.target_config.vocab_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise KoalaError(f"draft_vocab must be None or a positive integer, got {n!r}")
        if n is None or n >= V:
            self.vocab_ids, self.vocab_index, self._vocab_w = None, None, None
            return
        if self.token_counts is None:
            raise KoalaError(f"draft_vocab={n} needs the head's token counts, and this head has none: run "
                             f"python -m train.vocab --data <prepared data> --heads <head dir>, or pass draft_vocab=None")
        counts = self.token_counts
        # the n most frequent (ties: lower id first), kept in ascending id order so that an
        # argmax over the subset breaks ties towards the lower id, as one over all V does
        order = torch.sort(-counts, stable=True).indices[:n]
        dev = self._projections()[0][0].device
        self.vocab_ids = order.sort().values.to(dev)
        self.vocab_index = torch.full((V,), -1, dtype=torch.int32, device=dev)
        self.vocab_index[self.vocab_ids] = torch.arange(n, dtype=torch.int32, device=dev)
        self._vocab_w = [(w.detach()[self.vocab_ids].contiguous(),
                          None if b is None else b.detach()[self.vocab_ids].contiguous())
                         for w, b in self._projections()]

    def draft_vocab_state(self):
        """The draft vocabulary in use (an opaque value for restore_draft_vocab)."""
        return self.vocab_ids, self.vocab_index, self._vocab_w

    def restore_draft_vocab(self, state):
        """Put back a draft vocabulary taken with draft_vocab_state: the same tensors, so that
        CUDA graphs captured with it stay valid after another decoder set its own."""
        self.vocab_ids, self.vocab_index, self._vocab_w = state

    def draft_project(self, x, i: int = 0):
        """Projection i applied to x (..., D) over the draft vocabulary: (..., draft_vocab_size)."""
        if self.vocab_ids is None:
            w, b = self._projections()[i]
        else:
            w, b = self._vocab_w[i]
            if w.device != x.device:
                raise KoalaError(f"the draft vocabulary was gathered on {w.device} but the head runs on "
                                 f"{x.device}: call set_draft_vocab again after moving the head")
        x = x.to(w.dtype)
        if _fused(x) and x.numel() == x.shape[-1]:
            # one row (a drafted level): kernels/linear.py's GEMV, which keeps the PDL chain of
            # the kernels around it; more rows go to cuBLAS, whose GEMV-free tiles read W once
            from kernels.linear import linear
            return linear(x, w, b, config=_row_config(w, 1))
        return F.linear(x, w, b)

    def to_token_ids(self, idx):
        """Indices into the draft vocabulary -> the target's token ids."""
        return idx if self.vocab_ids is None else self.vocab_ids[idx]

    def to_full_probs(self, q):
        """A distribution over the draft vocabulary (..., n) -> over all V tokens (zero elsewhere)."""
        if self.vocab_ids is None:
            return q
        out = q.new_zeros(*q.shape[:-1], self.target_config.vocab_size)
        return out.index_copy_(q.dim() - 1, self.vocab_ids, q)

    def save_pretrained(self, path, dtype: torch.dtype | None = None):
        save_head(self, path, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, target, device=None, dtype=None):
        kind = "medusa" if cls is MedusaHead else "eagle" if cls is EagleHead else None
        return load_head(path, target, device=device, dtype=dtype, kind=kind)


# ----------------------------------------------------------------------------------------------
# Medusa

class ResBlock(nn.Module):
    """x + SiLU(W x + b), W zero-initialised (as Medusa) so an untrained block is the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)   # SiLU(0) = 0

    def forward(self, x):  # (..., D)
        return x + F.silu(self.linear(x))


class MedusaHead(_DraftHead):
    def __init__(self, config: DraftConfig, target: Transformer, target_name: str):
        super().__init__(config, target, target_name)
        D, V = target.config.dim, target.config.vocab_size
        H, K = config.n_heads, config.layers
        dev, dt = target.device, target.dtype
        # K *independent* blocks per head (Medusa's [ResBlock] * K would share one module)
        self.blocks = nn.ModuleList(
            nn.ModuleList(ResBlock(D) for _ in range(K)) for _ in range(H)).to(dev, dt)
        if config.shared_lm_head:
            self.proj = None
        else:
            self.proj = nn.ModuleList(nn.Linear(D, V, bias=False) for _ in range(H)).to(dev, dt)
            with torch.no_grad():
                for p in self.proj:
                    p.weight.copy_(target.output.weight)

    def features(self, hidden, heads: int | None = None):
        """hidden (B, T, D) -> (H, B, T, D): each head's input to its projection (the first
        `heads` heads, default all)."""
        outs = []
        for blocks in list(self.blocks)[:heads]:
            x = hidden
            for blk in blocks:
                x = blk(x)
            outs.append(x)
        return torch.stack(outs)

    def project(self, i: int, x):  # head i's projection: x (..., D) -> (..., V)
        return self.lm_head(x) if self.proj is None else self.proj[i](x)

    def _projections(self):
        if self.proj is None:
            return super()._projections()
        return [(p.weight, None) for p in self.proj]

    def forward(self, hidden, draft: bool = False, heads: int | None = None):
        """hidden (B, T, D) -> logits (H, B, T, V) of the first `heads` heads (default all);
        draft=True: over the draft vocabulary (..., draft_vocab_size)."""
        H = len(self.blocks) if heads is None else heads
        feats = self.features(hidden, H)
        if draft:
            return torch.stack([self.draft_project(feats[i], i if self.proj is not None else 0) for i in range(H)])
        return torch.stack([self.project(i, feats[i]) for i in range(H)])

    def draft_logits(self, hidden, heads: int):
        """The first `heads` heads' logits over the draft vocabulary: (heads, B, T, Vd). A
        subclass with its own forward is respected (its logits over all V, then gathered)."""
        if type(self).forward is MedusaHead.forward:
            return self(hidden, draft=True, heads=heads)
        logits = self(hidden)[:heads]
        return logits if self.vocab_ids is None else logits[..., self.vocab_ids]

    def resblock_weights(self):
        """Stacked copies for the fused kernel: W (H, K, D, D), b (H, K, D)."""
        W = torch.stack([torch.stack([b.linear.weight for b in blocks]) for blocks in self.blocks])
        b = torch.stack([torch.stack([b.linear.bias for b in blocks]) for blocks in self.blocks])
        return W, b


# ----------------------------------------------------------------------------------------------
# EAGLE

class EagleHead(_DraftHead, CachedStack):
    """fc([embedding(x_{t+1}); f_t]) -> K decoder layers of the target's kind -> f_{t+1};
    logits = target LM head(f_{t+1}) (no extra norm: features are final-norm hidden states)."""

    def __init__(self, config: DraftConfig, target: Transformer, target_name: str):
        super().__init__(config, target, target_name)
        cfg = target.config
        dev, dt = target.device, target.dtype
        self.fc = nn.Linear(2 * cfg.dim, cfg.dim).to(dev, dt)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(config.layers)).to(dev, dt)
        self.rotary = Rotary(cfg, cfg.max_position_embeddings).to(dev)
        self.max_batch = self.max_len = 0

    @property
    def device(self):
        return self.fc.weight.device

    @property
    def dtype(self):
        return self.fc.weight.dtype

    def stack_config(self) -> ModelConfig:  # its layers are the target's kind (CachedStack)
        return self.target_config

    def forward(self, tokens, features, positions=None, slots=None, mask=None, draft: bool = False):
        """tokens (B, T): x_{t+1}; features (B, T, D): f_t; positions (B, T); slots (T,);
        mask (B|1, T, S) bool. slots=None: uncached causal attention (training).
        Returns logits (B, T, V) and out_features (B, T, D), out_features[:, t] predicting f_{t+1};
        draft=True: the logits over the draft vocabulary (B, T, draft_vocab_size)."""
        x = self._features(tokens, features, positions, slots, mask)
        return (self.draft_project(x) if draft else self.lm_head(x)), x

    def _features(self, tokens, features, positions, slots, mask):
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if _fused(tokens) and slots is not None:
            # [embedding; feature] and the RoPE rows in one launch (kernels/embed.py), then the
            # Linear as a GEMV for few rows: no PyTorch op between the target's last kernel and
            # the head's first layer
            from kernels.embed import embed_rope
            xin, cos, sin = embed_rope(tokens, positions, self._frozen.embedding.weight, self.rotary.cos,
                                       self.rotary.sin, features, dtype=self.dtype)
            x = self._fc(xin)
        else:
            emb = self._frozen.embedding(tokens).to(self.dtype)
            x = self.fc(torch.cat([emb, features.to(self.dtype)], dim=-1))
            cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, slots, mask)
        return x

    def _fc(self, xin):
        """fc on the fused path: kernels/linear.py's GEMV up to the rows the layers give it too
        (exact mode's tiles, in or out of exact mode, as the layers), cuBLAS beyond."""
        M = xin.shape[0] * xin.shape[1]
        if M > _small_m():
            return self.fc(xin)
        from kernels.linear import linear
        w = self.fc.weight
        return linear(xin, w, self.fc.bias, config=_row_config(w, M))

    def prime(self, tokens, features, positions, slots, mask):
        """The head's pass over a prompt (forward's arguments, slots given): it fills the head's
        KV cache and computes no logits, which a prompt's pass never reads (forward's LM head
        over n prompt rows would be its largest product). A subclass with its own forward is
        respected: its forward runs and the logits are dropped."""
        if type(self).forward is EagleHead.forward:
            self._features(tokens, features, positions, slots, mask)
        else:
            self(tokens, features, positions, slots, mask)

    def draft_step_at(self, tokens, features, positions, slots, mask, row):
        """draft_step for one sequence (B = 1), keeping one row: row (1,) int tensor, an index
        into T. Returns its logits over the draft vocabulary (1, Vd) and its feature (1, D). The
        LM head then reads one row, not T (a catch-up pads its rows to depth + 1)."""
        if type(self).forward is EagleHead.forward:
            f = self._features(tokens, features, positions, slots, mask)[0].index_select(0, row)
            return self.draft_project(f), f
        lg, f = self.draft_step(tokens, features, positions, slots, mask)
        return lg[0].index_select(0, row), f[0].index_select(0, row)

    def draft_step(self, tokens, features, positions, slots, mask):
        """forward(..., draft=True): logits over the draft vocabulary and the features. A
        subclass with its own forward is respected (its logits over all V, then gathered)."""
        if type(self).forward is EagleHead.forward:
            return self(tokens, features, positions, slots, mask, draft=True)
        lg, f = self(tokens, features, positions, slots, mask)
        return (lg if self.vocab_ids is None else lg[..., self.vocab_ids]), f


# ----------------------------------------------------------------------------------------------
# checkpoints

def _head_config_dict(head: _DraftHead, dtype) -> dict:
    tc = head.target_config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **head.config.to_dict(),
        "dim": tc.dim,
        "vocab_size": tc.vocab_size,
        "dtype": str(dtype).removeprefix("torch."),
        "target": {"name": head.target_name, "fingerprint": head.target_fingerprint,
                   "config": {k: tc.to_dict()[k] for k in _IDENTITY_FIELDS}},
    }


def save_head(head: _DraftHead, path, dtype: torch.dtype | None = None):
    """Write config.json and the head's own weights (sharded over 16 MiB) into directory path."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype or v.dtype).cpu().contiguous() for k, v in head.state_dict().items()}
    out_dtype = dtype or next(iter(sd.values())).dtype
    # split any tensor over the limit by rows, then pack tensors into shards in order
    pieces: list[tuple[str, torch.Tensor]] = []
    splits: dict[str, list[str]] = {}
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if nbytes > MAX_SHARD_BYTES and v.dim() >= 1:
            row = max(1, nbytes // v.shape[0])
            per = max(1, MAX_SHARD_BYTES // row)
            names = []
            for j, chunk in enumerate(torch.split(v, per, dim=0)):
                names.append(f"{k}.__part{j}")
                pieces.append((names[-1], chunk.contiguous()))
            splits[k] = names
        else:
            pieces.append((k, v))
    total = sum(v.numel() * v.element_size() for _, v in pieces)
    for old in list(path.glob("model*.safetensors")) + [path / INDEX]:
        old.unlink(missing_ok=True)       # never leave stale shards of an earlier save
    if total <= MAX_SHARD_BYTES and not splits:
        save_file(dict(pieces), path / WEIGHTS, metadata={"format": "pt"})
    else:
        shards, cur, size = [], {}, 0
        for k, v in pieces:
            n = v.numel() * v.element_size()
            if cur and size + n > MAX_SHARD_BYTES:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = v
            size += n
        shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        (path / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map, "splits": splits}, indent=2))
    if head.token_counts is not None:
        save_token_counts(path, head.token_counts)
    else:
        (path / COUNTS).unlink(missing_ok=True)
    cfg = _head_config_dict(head, out_dtype)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def save_token_counts(path, counts: torch.Tensor, source: str = ""):
    """Write token_counts.safetensors (counts (V,) int64) into head directory path."""
    from safetensors.torch import save_file
    counts = torch.as_tensor(counts).to(torch.int64).cpu().contiguous()
    save_file({"counts": counts}, Path(path) / COUNTS, metadata={"format": "pt", "source": source})


def _read_counts(path: Path, V: int) -> torch.Tensor | None:
    f = path / COUNTS
    if not f.exists():
        return None
    from safetensors.torch import load_file
    try:
        c = load_file(f).get("counts")
    except Exception as e:
        raise CheckpointError(f"{f} is corrupt or truncated ({e}); rerun python -m train.vocab for this head") from e
    if c is None or c.shape != (V,) or c.dtype != torch.int64 or bool((c < 0).any()):
        raise CheckpointError(f"{f} must hold 'counts', {V} non-negative int64 values (one per token of the "
                              f"target's vocabulary); rerun python -m train.vocab for this head")
    return c


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"draft head directory {path} does not exist; pass the folder that "
                              "save_pretrained (or python -m train) wrote")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass the head's folder, not a file in it")
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no config.json: not a koala draft head (or an incomplete copy)")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the file is corrupt: re-save or re-copy the head") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a koala draft head config (format {cfg.get('format') if isinstance(cfg, dict) else None!r})")
    v = cfg.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise CheckpointError(f"{f} has format_version {v!r}; this koala reads up to {FORMAT_VERSION}: upgrade koala")
    missing = [k for k in ("kind", "layers", "n_heads", "shared_lm_head", "dim", "vocab_size", "target") if k not in cfg]
    if missing or not isinstance(cfg["target"], dict) or "fingerprint" not in cfg["target"]:
        raise CheckpointError(f"{f} lacks fields {missing or ['target.fingerprint']}: the config is incomplete")
    return cfg


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    def load(f: Path):
        if not f.is_file():
            raise CheckpointError(f"weight file {f} is missing: the head directory is incomplete; re-copy it")
        try:
            return load_file(f)
        except Exception as e:  # safetensors raises its own SafetensorError on truncation
            raise CheckpointError(f"{f} is corrupt or truncated ({e}); re-save or re-copy the head") from e
    if (path / WEIGHTS).is_file():
        return load(path / WEIGHTS)
    if not (path / INDEX).is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS} and no {INDEX}: the weights are missing")
    try:
        index = json.loads((path / INDEX).read_text())
        weight_map, splits = index["weight_map"], index.get("splits", {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / INDEX} is corrupt ({e}); re-save the head") from e
    sd = {}
    for fname in sorted(set(weight_map.values())):
        part = load(path / fname)
        expect = {k for k, v in weight_map.items() if v == fname}
        if set(part) != expect:
            raise CheckpointError(f"{path / fname} holds {sorted(set(part) ^ expect)[:5]} contrary to "
                                  f"{INDEX}: shards from different saves are mixed; re-save the head")
        sd.update(part)
    for name, parts in splits.items():
        if any(p not in sd for p in parts):
            raise CheckpointError(f"{name}: some of its row pieces are missing from the shards")
        sd[name] = torch.cat([sd.pop(p) for p in parts])
    return sd


def load_head(path, target, device=None, dtype=None, kind: str | None = None,
              target_name: str | None = None) -> "MedusaHead | EagleHead":
    """Load a head saved by save_pretrained for target (LoadedTarget or Transformer), checking
    that it was trained for this very target and that every tensor is present and well-shaped.
    kind: if given, the head must be of this kind. device/dtype default to the target's."""
    path = Path(os.fspath(path))
    model, name = _unpack_target(target, target_name)
    cfg = _read_config(path)
    if kind is not None and cfg["kind"] != kind:
        raise HeadMismatchError(f"{path} is a {cfg['kind']!r} head but a {kind!r} head was asked for")
    try:
        dc = DraftConfig(kind=cfg["kind"], layers=cfg["layers"], n_heads=cfg["n_heads"],
                         shared_lm_head=cfg["shared_lm_head"], chain_depth=cfg.get("chain_depth"),
                         draft_vocab=cfg.get("draft_vocab"))
    except ValueError as e:
        raise CheckpointError(f"{path}/config.json describes an invalid head: {e}") from e
    t = cfg["target"]
    fp = target_fingerprint(model)
    if t["fingerprint"] != fp:
        raise HeadMismatchError(
            f"{path} was trained for target {t.get('name')!r} (fingerprint {t['fingerprint']}), but the "
            f"given target is {name!r} (fingerprint {fp}); load the target it was trained for, or "
            f"train a head for this one (python -m train --target ...)")
    tc = model.config
    if (cfg["dim"], cfg["vocab_size"]) != (tc.dim, tc.vocab_size):
        raise HeadMismatchError(f"{path}: head sizes D={cfg['dim']}, V={cfg['vocab_size']} do not "
                                f"match the target's D={tc.dim}, V={tc.vocab_size}")
    sd = _read_weights(path)
    head = dc.build(model, t.get("name") or name)
    expect = head.state_dict()
    missing = sorted(set(expect) - set(sd))
    unexpected = sorted(set(sd) - set(expect))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match a {dc.kind} head with K={dc.layers}: "
                              f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
                              "the checkpoint is incomplete or its config.json belongs to another head")
    bad = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expect.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: mis-shaped tensors {bad[:5]}; the checkpoint is corrupt or mixed")
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{path}: tensors {nonfinite[:5]} hold NaN/inf: the training run diverged")
    head.load_state_dict(sd, strict=True)
    head.token_counts = _read_counts(path, tc.vocab_size)
    if dc.draft_vocab is not None and head.token_counts is None:
        raise CheckpointError(f"{path}/config.json asks for draft_vocab={dc.draft_vocab} but {COUNTS} is missing: "
                              "re-copy the head, or rerun python -m train.vocab for it")
    return head.to(device=device or model.device, dtype=dtype or model.dtype)
