"""The target runtime: a compact Llama-family transformer with a preallocated static KV cache.

One forward serves every use:
  * prefill and one-token decode (slots = positions, causal mask),
  * verification of a drafted chain or tree: new tokens at explicit RoPE positions written to
    explicit cache slots, each seeing the prefix plus its ancestors (any boolean mask),
  * training without a cache (slots=None): plain causal attention over the sequence.
It returns the logits and the last hidden state (after the final norm: what the LM head reads,
and what draft heads read).

Weights are stored fused (q|k|v and gate|up) so a layer is 4 matrix products.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, rope_inv_freq


def _parse_tile(spec: str):
    """'BLOCK_NxNUM_WARPSxBLOCK_K' -> a one-row GEMV LinearConfig; '' -> None."""
    if not spec:
        return None
    from kernels.linear import LinearConfig
    try:
        bn, nw, bk = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"KOALA_OPROJ_TILE={spec!r}: expected BLOCK_NxNUM_WARPSxBLOCK_K, e.g. 16x4x256") from None
    return LinearConfig(False, 1, bn, bk, nw, 1, 1)


class _Fast:
    """The fused Triton path (kernels/), used on CUDA. `on` is set by Transformer.use_kernels();
    the PyTorch code beside it stays the reference.
    `exact`: batch-invariant kernels for every forward of <= 128 tokens (EXACT_M): each row goes
    through the same per-row GEMV code (up to 8 rows to a program) and the attention uses a fixed
    row tile and a split count that depends on the context only, so a token's bf16 logits do not
    depend on how many tokens are verified beside it, and speculative greedy output equals plain
    greedy output bit for bit. Off, forwards of more than 8 tokens (SMALL_M; LM heads of more
    than one row) use cuBLAS (faster there, but its bf16 rounding differs from the one-token
    step's, so greedy outputs drift apart after a near-tie) and the attention picks its tiles
    by size."""
    on = False
    exact = True
    # exact mode's GEMV: 0 gives each row programs of its own (the M-row forward launches M
    # times the programs of one); R in 2, 4, 8 computes R rows in one tile
    # (kernels.linear.vec_config), the plain step included, so up to R rows cost one launch
    row_tile = int(os.environ.get("KOALA_ROW_TILE", "0") or 0)
    # the q|k|v projection, RoPE and the cache write in one launch (kernels/linear_rope.py), not
    # two: one launch a layer fewer, but slower on the H200 (README, "One launch fewer per layer")
    fused_rope = os.environ.get("KOALA_FUSED_ROPE", "0") not in ("", "0")
    # RoPE and the cache write inside the attention's split launch (kernels/tree_attention.py,
    # rope_tree_attention) for forwards of up to 64 tokens: the same bits as the RoPE launch, one
    # launch a layer fewer, but not faster, so opt-in (KOALA_ROPE_ATTN=1): on the H100 at c2d81e5
    # a plain step took 0.485 against 0.481 ms (do_bench, four runs each, alternating), an EAGLE
    # depth-1 draft the same per layer (bench/results/spec_cost_rope_attn*_c2d81e5.json)
    rope_attn = os.environ.get("KOALA_ROPE_ATTN", "0") not in ("", "0")
    # the split attention's combine in the output projection's prologue (kernels/linear.py,
    # linear_combine) for one-row forwards (a plain step, a draft step): the same bits as the
    # combine launch followed by wo with the same tile, one launch a layer fewer wherever the
    # context spans more than one split (> 128 slots). Opt-in (KOALA_OPROJ_COMBINE=1): slower on
    # the H100 at cd08026. Every program of a row combines the whole row, so wo's 2-column tile
    # (288 programs) made a plain step 0.638 against 0.478 ms (do_bench GPU time), and tiles wide
    # enough to make that cheap slow wo more than the launch costs (16 columns: 0.528 against
    # 0.521 ms with the launch, against 0.478 with the usual tile;
    # bench/results/spec_cost_oproj_*_cd08026.json)
    oproj_combine = os.environ.get("KOALA_OPROJ_COMBINE", "0") not in ("", "0")
    # wo's GEMV tile for every M, in exact mode and out ("BLOCK_NxNUM_WARPSxBLOCK_K"); None: the
    # tiles file's or _row_config's
    oproj_tile = _parse_tile(os.environ.get("KOALA_OPROJ_TILE", ""))
    # exact mode's GEMV tiles per product shape, {(N, K, silu): LinearConfig}, from the shipped
    # koala/exact_tiles.json or the file KOALA_EXACT_TILES names (exact_tiles); None: not read yet
    tiles: dict | None = None
    # tests only: run the fused path on CPU tensors too, through Triton's interpreter
    # (Transformer.use_kernels(cpu=True) under TRITON_INTERPRET=1), so CI covers it end to end
    cpu = False


@contextmanager
def not_exact():
    """Exact mode off for forwards that no other forward has to match bit for bit: a prompt's
    prefill (plain and speculative decoding share it, so both read the same cache) and an EAGLE
    head's pass over the prompt (drafts only decide speed). Exact mode's per-row GEMV programs
    make an M-row forward cost about M one-row steps' products for M <= 128; outside it those
    rows go to cuBLAS and the attention picks its tiles by size."""
    saved = _Fast.exact
    _Fast.exact = False
    try:
        yield
    finally:
        _Fast.exact = saved


def draft_exact_default() -> bool:
    """Whether drafts run in exact mode when a decoder is not told (KOALA_DRAFT_EXACT=1; default
    off: a draft decides speed, never output, and runs faster outside it)."""
    return os.environ.get("KOALA_DRAFT_EXACT", "0") not in ("", "0")


def _fused(t) -> bool:
    """Does a tensor on t's device take the fused Triton path?"""
    return _Fast.on and (t.is_cuda or _Fast.cpu)


DEFAULT_TILES = Path(__file__).with_name("exact_tiles.json")


def _cuda_arch() -> str | None:
    """'sm_90' for an H100 or H200 (the current CUDA device's compute capability), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def _tiles_path():
    """The tiles file exact mode reads (a Path or KOALA_EXACT_TILES's string), or None for its own
    tiles: KOALA_EXACT_TILES's file; unset, the shipped koala/exact_tiles.json on a GPU of the
    architecture it was swept on (its `arch`; elsewhere it is untimed); KOALA_EXACT_TILES=none."""
    path = os.environ.get("KOALA_EXACT_TILES", "").strip()
    if path.lower() in ("none", "0", "off"):
        return None
    if path:
        return path
    import json
    try:
        arch = json.loads(DEFAULT_TILES.read_text()).get("arch")
    except (OSError, ValueError) as err:
        raise ValueError(f"the shipped exact-mode tiles {DEFAULT_TILES} are unreadable ({err}): reinstall koala, "
                         f"or set KOALA_EXACT_TILES=none") from None
    return DEFAULT_TILES if arch is None or arch == _cuda_arch() else None


def exact_tiles_source() -> str | None:
    """Which tiles file exact mode uses in this process (result files record it), None for its own."""
    path = _tiles_path()
    return "koala/exact_tiles.json" if path == DEFAULT_TILES else path


def exact_tiles() -> dict:
    """Exact mode's tiles per product shape (see _tiles_path for which file). The shipped ones
    were swept on an H200 for SmolLM2's shapes: chain verifies 4 to 9% faster
    (bench/results/scale_smollm2_tiles_7c09695.json). Shapes a file does not name keep exact
    mode's per-row programs."""
    path = _tiles_path()
    return {} if path is None else load_tiles(path)


def load_tiles(path) -> dict:
    """{(N, K, silu): LinearConfig} from a bench/linear_rows.py result file's `tiles` list (an
    entry with config null keeps exact mode's own tile for that shape). Any tile serves exact
    mode: every GEMV path gives a row the same bits at every M, so one tile per shape is enough."""
    import json
    from kernels.linear import LinearConfig
    try:
        entries = json.loads(open(path).read())["tiles"]
        out = {}
        for e in entries:
            if e.get("config") is not None:
                out[(int(e["N"]), int(e["K"]), bool(e["silu"]))] = LinearConfig(**e["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"exact-mode tiles {path} (KOALA_EXACT_TILES): not a bench/linear_rows.py result with a "
                         f"`tiles` list ({type(err).__name__}: {err}); point KOALA_EXACT_TILES at linear_rows.json, "
                         f"or set it to none for exact mode's per-row programs") from None
    return out


def argmax_last(x, out=None):
    """torch.argmax(x, dim=-1); on the fused path kernels/argmax.py's two short launches (torch
    gives a 49,152-wide row to one block: 15 us on the H100, 3% of a SmolLM2 decode step).
    Same result, ties and NaN included. out: an int64 tensor of x.shape[:-1] to write into."""
    if _fused(x):
        from kernels.argmax import argmax
        return argmax(x, out=out)
    if out is None:
        return x.argmax(dim=-1)
    out.copy_(x.argmax(dim=-1).view(out.shape))
    return out


def _row_config(W, M, silu=False):
    """The GEMV configuration for M rows, exact mode's: the tiles a single row gets
    (kernels/linear.py: a row's output does not depend on how many rows a program takes).
    Forwards of up to SMALL_M rows take them outside exact mode too (an EAGLE head's draft, a
    batch's step), where they beat kernels.linear._config's one program row of ROWS = M (on the
    H100 at M = 2, 1.87 against 2.20 us for wqkv, 3.29 against 3.72 for w13;
    bench/results/linear_rows_7c09695.json, gemv1 against gemv2).
    A layer's weights (a few MB) stay in the 50 MB L2, so each row gets programs of its own
    (ROWS=1) and the re-reads come from L2: on the H100 at M = 5 that is 2.2 against 3.7 us for
    wo, 3.7 against 4.6 for w2 (bench/results/linear_sweep.json). The 57 MB LM head does not fit:
    its programs take 8 rows each, so it leaves HBM once (47 against 100 us at M = 5)."""
    from kernels.linear import GEMV_MAX_M, _config, vec_config
    n = W.shape[0] // 2 if silu else W.shape[0]
    if _Fast.tiles is None:
        _Fast.tiles = exact_tiles()
    if _Fast.row_tile:   # KOALA_ROW_TILE asks for one row tile everywhere: it overrides any tiles file
        return vec_config(n, W.shape[1], _Fast.row_tile, silu)
    if (n, W.shape[1], silu) in _Fast.tiles:
        return _Fast.tiles[(n, W.shape[1], silu)]
    cfg = _config(min(M, GEMV_MAX_M), n, W.shape[1])
    return cfg._replace(ROWS=1) if W.numel() * W.element_size() <= _L2_RESIDENT else cfg


_L2_RESIDENT = 16 << 20   # bytes of W up to which exact mode spreads rows over programs


def _linear_residual(x, y, lin: nn.Linear):
    """x + lin(y) as one GEMM with the residual as its addend (cuBLAS beta=1): one launch, not two."""
    D = x.shape[-1]
    return torch.addmm(x.reshape(-1, D), y.reshape(-1, y.shape[-1]), lin.weight.t()).view(x.shape)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., D)
        if _fused(x):
            from kernels.rmsnorm import rms_norm
            return rms_norm(x.contiguous(), self.weight, self.eps)
        # computed in fp32 as transformers does, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class KVCache(nn.Module):
    """Static cache; slot s of every layer holds the key/value of one token."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)  # (B, nkv, S, hd)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)  # (B, nkv, S, hd)

    def write(self, slots, k, v):
        # slots: (T,) cache positions shared by the batch; k, v: (B, nkv, T, hd)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v

    def keep(self, src, dst):
        """Move the entries at slots src (n,) to slots dst (n,): the accepted path's compaction."""
        self.k.index_copy_(2, dst, self.k.index_select(2, src))
        self.v.index_copy_(2, dst, self.v.index_select(2, src))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, q + 2 * kv, bias=cfg.attention_bias)
        self.wo = nn.Linear(q, cfg.dim, bias=False)
        # Qwen3: RMSNorm over each q and k head (head_dim wide, weights shared by the heads)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.kv_cache: KVCache | None = None

    def norm_qk(self, q, k):
        """q (B, T, h, hd), k (B, T, nkv, hd) -> both head-normed where the model has qk_norm."""
        if self.q_norm is None:
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def forward(self, x, cos, sin, slots=None, mask=None, residual=None, tail=None):
        # x: (B, T, D); cos, sin: (B, T, hd); slots: (T,) or None; mask: (B|1, T, S) bool or None;
        # tail: a tree verification's ExactTail (kernels/tree_attention.py), read by exact mode's
        # fused attention only (the mask says the same visibility)
        B, T, _ = x.shape
        h, nkv, hd = self.n_heads, self.n_kv, self.hd
        if _fused(x) and slots is not None:
            return self._forward_fused(x, cos, sin, slots, mask, residual, tail)
        q, k, v = self.wqkv(x).split([h * hd, nkv * hd, nkv * hd], dim=-1)
        q, k = self.norm_qk(q.view(B, T, h, hd), k.view(B, T, nkv, hd))
        q = q.transpose(1, 2)                        # (B, h, T, hd)
        k = k.transpose(1, 2)                        # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        g = h // nkv
        if slots is None:  # training / reference path: causal over the sequence itself
            if g > 1:
                k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = self.kv_cache.write(slots, k, v)  # whole cache: (B, nkv, S, hd)
            L = mask.shape[-1]                       # the mask's width is the window attended:
            if L < k.shape[2]:                       # graphs for short contexts read less cache
                k, v = k[:, :, :L], v[:, :, :L]
            # GQA without copying the cache: fold each group's query heads into the time axis
            qf = q.reshape(B, nkv, g * T, hd)
            m = mask.unsqueeze(1)
            if g > 1:
                m = m.repeat(1, 1, g, 1)             # (B|1, 1, g*T, S), rows ordered (group, t)
            y = F.scaled_dot_product_attention(qf, k, v, attn_mask=m).reshape(B, h, T, hd)
        out = self.wo(y.transpose(1, 2).reshape(B, T, h * hd))
        return out if residual is None else residual + out

    def attend(self, qkv, cos, sin, slots, mask, tail=None, defer=False):
        """Fused path from the q|k|v projection: RoPE + cache write, then masked attention over
        the first mask.shape[-1] slots. qkv (B, T, (h+2nkv)*hd) -> (B, T, h*hd). With
        _Fast.rope_attn, forwards of up to ROPE_MAX_T tokens do both in the attention's launches
        (kernels/tree_attention.py, rope_tree_attention: the same bits, one launch a layer fewer);
        per-head q/k norms (Qwen3) and exact trees' tails keep the RoPE launch. defer: a split
        attention returns its uncombined SplitParts (for kernels.linear.linear_combine)."""
        from kernels.rope_cache import rope_and_cache_write
        c = self.kv_cache
        if _Fast.rope_attn and self.q_norm is None and tail is None:
            from kernels.tree_attention import ROPE_MAX_T, SplitParts, exact_tiles, rope_tree_attention
            B, T = qkv.shape[0], qkv.shape[1]
            if T <= ROPE_MAX_T:
                L = mask.shape[-1]
                tiles = exact_tiles(B * self.n_kv, L) if _Fast.exact else {}
                y = rope_tree_attention(qkv, cos, sin, slots, c.k, c.v, self.n_heads, mask,
                                        defer_combine=defer, **tiles)
                return y if isinstance(y, SplitParts) else y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        qk = {} if self.q_norm is None else dict(q_norm=self.q_norm.weight, k_norm=self.k_norm.weight,
                                                 eps=self.q_norm.eps)
        return self.attend_rotated(rope_and_cache_write(qkv, cos, sin, slots, c.k, c.v, self.n_heads,
                                                        self.n_kv, **qk), mask, tail, defer)

    def attend_rotated(self, q, mask, tail=None, defer=False):
        """The fused path's attention of the rotated q (B, h, T, hd), its k and v already in the
        cache, over the first mask.shape[-1] slots -> (B, T, h*hd). tail (exact mode): a tree's
        nodes attend as plain decoding would (kernels/tree_attention.py, exact_tree_attention).
        defer: a split attention returns its uncombined SplitParts instead (exact trees' tails
        never: their combine runs on partials gathered from two launches); the combine in the
        output projection has the combine launch's bits."""
        from kernels.tree_attention import SplitParts, exact_tiles, exact_tree_attention, tree_attention
        B, _, T, _ = q.shape
        c = self.kv_cache
        L = mask.shape[-1]
        # exact mode: the plain step and a verify forward read through different windows L and
        # must still give a query the same bits: 128-slot splits whatever L is (exact_tiles)
        tiles = exact_tiles(B * self.n_kv, L) if _Fast.exact else {}
        if tail is not None and _Fast.exact:
            y = exact_tree_attention(q, c.k[:, :, :L], c.v[:, :, :L], tail, **tiles)
        else:
            y = tree_attention(q, c.k[:, :, :L], c.v[:, :, :L], mask, defer_combine=defer,
                               **tiles)                                              # (B, h, T, hd)
            if isinstance(y, SplitParts):
                return y
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)

    def _forward_fused(self, x, cos, sin, slots, mask, residual, tail=None):
        y = self.attend(self.wqkv(x), cos, sin, slots, mask, tail)
        if residual is None:
            return self.wo(y)
        return _linear_residual(residual, y, self.wo)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)  # gate | up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x, residual=None):
        if _fused(x):
            from kernels.swiglu import silu_mul
            a = silu_mul(self.w13(x))
            return self.w2(a) if residual is None else _linear_residual(residual, a, self.w2)
        gate, up = self.w13(x).split(self.inter, dim=-1)
        out = self.w2(F.silu(gate) * up)
        return out if residual is None else residual + out


class Block(nn.Module):
    """One decoder layer; EAGLE heads reuse it so their layers are the target's own kind."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, slots=None, mask=None, tail=None):
        if _fused(x) and slots is not None and x.shape[0] * x.shape[1] <= _small_m():
            return self._forward_small(x, cos, sin, slots, mask, tail)
        x = self.attention(self.attention_norm(x), cos, sin, slots, mask, residual=x, tail=tail)
        return self.feed_forward(self.ffn_norm(x), residual=x)


    def _forward_small(self, x, cos, sin, slots, mask, tail=None):
        """Decode/verify with few tokens: 6-7 launches a layer. The norms run as prologues of
        the projections and the residuals and SwiGLU as their epilogues (kernels/linear.py),
        where cuBLAS took 5-8 us per tiny GEMM plus separate norm and activation launches."""
        from kernels.linear import linear, linear_combine, linear_silu
        from kernels.tree_attention import SplitParts
        a, f, n1, n2 = self.attention, self.feed_forward, self.attention_norm, self.ffn_norm
        M = x.shape[0] * x.shape[1]

        def cf(W, silu=False):
            # exact mode's tiles in and out of it: a row's bits do not depend on M, and they are
            # also the fastest measured at M = 1, 2, 4 (_row_config, bench/results/linear_rows_*)
            return _row_config(W, M, silu)
        cq = cf(a.wqkv.weight)
        co = _Fast.oproj_tile or cf(a.wo.weight)
        # the attention's combine in wo's prologue: one row (each program of a row combines the
        # whole row, so the work grows with the rows), GEMV tiles only (not the row-tile path)
        defer = _Fast.oproj_combine and M == 1 and not co.use_dot and not co.vec
        # GEMV tiles only, and no per-head q/k norm (Qwen3: the RoPE kernel applies it instead)
        if _Fast.fused_rope and not (cq is not None and cq.vec) and a.q_norm is None:
            from kernels.linear_rope import linear_rope_cache
            c = a.kv_cache
            q = linear_rope_cache(x, a.wqkv.weight, a.wqkv.bias, n1.weight, n1.eps, cos, sin, slots,
                                  c.k, c.v, a.n_heads, a.n_kv, config=cq)
            y = a.attend_rotated(q, mask, tail, defer)
        else:
            qkv = linear(x, a.wqkv.weight, a.wqkv.bias, norm_weight=n1.weight, eps=n1.eps, config=cq)
            y = a.attend(qkv, cos, sin, slots, mask, tail, defer)
        if isinstance(y, SplitParts):
            x = linear_combine(y, a.wo.weight, a.wo.bias, residual=x, config=co)
        else:
            x = linear(y, a.wo.weight, a.wo.bias, residual=x, config=co)
        g = linear_silu(x, f.w13.weight, n2.weight, n2.eps, config=cf(f.w13.weight, True))
        return linear(g, f.w2.weight, residual=x, config=cf(f.w2.weight))


# rows up to which kernels/linear.py replaces cuBLAS outside exact mode. Its GEMV takes exact
# mode's tiles there too (_row_config: each row its own programs, W re-read from L2). With one
# program row of ROWS = M (kernels.linear._config, until 839716e) a SmolLM2 layer's four products
# took, summed over 30 layers, 0.26 / 0.37 / 0.57 / 0.70 / 1.06 ms at M = 1 / 2 / 4 / 5 / 8
# against 0.72 for cuBLAS with its separate norm and SwiGLU launches at any of these M (H100,
# bench/results/linear.json, f13d795), so the GEMV stopped at 4 rows. With the tiles they take
# 0.46 ms at M = 5 and 0.65 at M = 8 (H200, linear_rows_7c09695.json), so it goes on to 8: on the
# H100 at 839716e an EAGLE draft at depth 4 (a 5-row catch-up) outside exact mode cost 0.075 ms
# a layer with cuBLAS there against 0.069 in exact mode (spec_cost_draft_exact*_839716e.json).
# The LM head (49152 x 576) is a bandwidth-bound 57 MB read where cuBLAS already reaches 80% of
# the ceiling; the GEMV matches it at M = 1 (22.2 vs 22.9 us) and loses from M = 2 (29.6 vs
# 23.1), so only one-row LM heads use it. In exact mode every forward of up to 128 tokens runs
# through the GEMV program (8 rows per program), bitwise as one row alone, whatever it costs.
SMALL_M = 8
LM_HEAD_M = 1
EXACT_M = 128  # the largest tree SpeculativeDecoder accepts


def _small_m():
    return EXACT_M if _Fast.exact else SMALL_M


class Rotary(nn.Module):
    """cos/sin tables (S, hd) in fp32, gathered by position."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        inv = rope_inv_freq(cfg)
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)  # (S, hd)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions, dtype):  # positions: (B, T) -> (B, T, hd) each
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


class CachedStack:
    """Static-cache management shared by the target and the EAGLE head: a module with
    `layers` (Blocks), `rotary`, `device`, `dtype` and the ModelConfig its layers follow."""

    def stack_config(self) -> ModelConfig:
        return self.config

    def setup_cache(self, max_batch: int, max_len: int):
        """Allocate (or reallocate) the static KV cache of max_len slots per sequence."""
        cfg = self.stack_config()
        if max_len > self.rotary.cos.shape[0]:
            self.rotary = Rotary(cfg, max_len).to(self.device)
        if (max_batch, max_len) == (self.max_batch, self.max_len):
            return
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch, cfg.n_kv_heads, max_len, cfg.head_dim,
                                               self.dtype, self.device)
        self.max_batch, self.max_len = max_batch, max_len

    def keep_cache(self, src, dst):
        """Keep cache entries src (n,) at slots dst (n,) in every layer."""
        for layer in self.layers:
            layer.attention.kv_cache.keep(src, dst)


class Transformer(CachedStack, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = Rotary(cfg, cfg.max_position_embeddings)
        self.max_batch = self.max_len = 0

    @property
    def device(self):
        return self.tok_embeddings.weight.device

    @staticmethod
    def use_kernels(on: bool = True, exact: bool | None = None, cpu: bool = False):
        """Switch the fused Triton path (CUDA tensors only) on or off for every model; exact
        selects batch-invariant verification (see _Fast). cpu=True (tests, TRITON_INTERPRET=1
        only) runs it on CPU tensors too, through Triton's interpreter."""
        if cpu and on:
            from kernels._common import interpreting
            if not interpreting():
                raise RuntimeError("use_kernels(cpu=True) runs the kernels in Triton's interpreter: "
                                   "set TRITON_INTERPRET=1 before importing triton")
        _Fast.on = on
        _Fast.cpu = cpu and on
        if exact is not None:
            _Fast.exact = exact

    @property
    def dtype(self):
        return self.tok_embeddings.weight.dtype

    def forward(self, tokens, positions=None, slots=None, mask=None, logits_index=None, tail=None):
        """tokens (B, T); positions (B, T) RoPE positions; slots (T,) cache slots to write;
        mask (B|1, T, L) bool, True where a query may attend a cache slot; only the first L <= S
        slots are read, so short contexts can use a narrower mask.
        With slots=None: no cache, causal attention, positions default to 0..T-1.
        logits_index (n,): compute logits only at these time indices (saves the LM head).
        tail: a tree verification's ExactTail (exact_tree_tail), which exact mode's attention
        reads so that every node gets the bits plain decoding would give it.
        Returns logits (B, T|n, V) and hidden (B, T, D), the final-norm hidden state."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if _fused(tokens) and slots is not None:   # the gathers and casts in one launch (kernels/embed.py)
            from kernels.embed import embed_rope
            x, cos, sin = embed_rope(tokens, positions, self.tok_embeddings.weight, self.rotary.cos,
                                     self.rotary.sin)
        else:
            x = self.tok_embeddings(tokens)
            cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, slots, mask, tail)
        hidden = self.norm(x)
        h = hidden if logits_index is None else hidden.index_select(1, logits_index)
        lm_m = EXACT_M if _Fast.exact else LM_HEAD_M
        if _fused(h) and h.shape[0] * h.shape[1] <= lm_m and slots is not None:
            from kernels.linear import linear
            cfg = _row_config(self.output.weight, h.shape[0] * h.shape[1]) if _Fast.exact else None
            return linear(h, self.output.weight, config=cfg), hidden
        return self.output(h), hidden


def causal_mask(slots, max_len: int):
    """(1, T, S) mask for a linear sequence written at slots (T,): slot j visible if j <= slot."""
    return (torch.arange(max_len, device=slots.device)[None, :] <= slots[:, None]).unsqueeze(0)


def exact_tree_tail(prefix_len, slots, depth, ancestors, max_len: int):
    """The ExactTail of a drafted tree (kernels/tree_attention.py): with it, exact mode's
    attention gives every node the bits plain decoding would. prefix_len: the root's slot L (int
    or 0-d tensor); slots (N,) the nodes' cache slots, the root's L; depth (N,) int; ancestors
    (N, N) bool ancestor-or-self; max_len: the window. Device ops only (builds in a CUDA graph)."""
    from kernels.tree_attention import TAIL, ExactTail
    N, dev = depth.shape[0], depth.device
    key = torch.where(ancestors, depth[None, :], N + 1)                  # a node's path by depth
    path_slots = slots[key.argsort(dim=1)]                               # (N, N): column j, depth j
    k0 = prefix_len // 128                                               # the root's split
    v = k0 * 128 + torch.arange(TAIL, device=dev)                        # (TAIL,) private slots
    j = v - prefix_len                                                   # depth in plain order
    in_prefix = (v < prefix_len)[None, :].expand(N, TAIL)
    in_path = (j >= 0)[None, :] & (j[None, :] <= depth[:, None])
    on_path = path_slots.gather(1, j.clamp(0, N - 1)[None, :].expand(N, TAIL))
    idx = torch.where(in_prefix, v[None, :].expand(N, TAIL), torch.where(in_path, on_path, 0))
    prefix = (torch.arange(max_len, device=dev) < k0 * 128)[None, None, :].expand(1, N, max_len)
    return ExactTail(prefix, idx, (in_prefix | in_path)[:, None, :],
                     k0 + torch.arange(2, device=dev))


def tree_mask(prefix_len, slots, ancestors, max_len: int):
    """(1, R, S) mask for R query tokens after a prefix of prefix_len cached tokens: every query
    sees the prefix, and query i sees slot slots[j] where ancestors[i, j] (slots (C,), ancestors
    (R, C) bool; for a drafted tree R = C and ancestors is ancestor-or-self).
    prefix_len may be an int or a 0-d tensor (so the mask builds inside a CUDA graph)."""
    ar = torch.arange(max_len, device=slots.device)
    m = (ar < prefix_len).unsqueeze(0).expand(ancestors.shape[0], max_len).clone()  # (R, S)
    m[:, slots] = ancestors
    return m.unsqueeze(0)
