"""Compile every kernel for an H100 (sm_90) without a GPU: catches what the interpreter cannot
(type errors in lowering, layouts, too much shared memory). Run with TRITON_INTERPRET unset;
test_compile.py runs it in a subprocess. Prints one line per kernel, exits 1 on a failure,
2 when this Triton cannot compile offline at all. Each kernel is compiled with USE_GDC off and
on (PDL, kernels/_common.py)."""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import accept, argmax, chain_index, medusa, rmsnorm, rope_cache, spec_sample, swiglu, tree_attention  # noqa: E402
from kernels import linear, linear_rope, topk, tree_draft  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, types, constexprs, num_warps=4, asm=False, aligned=(), num_stages=None):
    """Compile fn for sm_90. types: the non-constexpr arguments' types, in order. aligned: names
    of arguments to compile as the runtime specialises them when aligned (pointers 16-byte,
    integers multiples of 16). Returns the shared memory in bytes, or the PTX (asm=True), or the
    IR of that name (asm="ttgir")."""
    names = fn.arg_names
    sig, const, attrs = {}, {}, {}
    ti = iter(types)
    for i, n in enumerate(names):
        if n in constexprs:
            sig[n] = "constexpr"
            const[(i,)] = constexprs[n]
        else:
            sig[n] = next(ti)
            if n in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    assert next(ti, None) is None, "too many types"
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    k = triton.compile(src, target=TARGET, options=options)
    if asm:
        return k.asm["ptx" if asm is True else asm]
    return k.metadata.shared

def LINEAR_TYPES(dt, ints=("i32",) * 3):
    """_linear_kernel's argument types: 7 pointers of dt, the combine's fp32 lse, M N K (ints),
    eps, 4 strides, T, n_splits and the partials' 7 strides."""
    return [f"*{dt}"] * 7 + ["*fp32"] + list(ints) + ["fp32"] + ["i32"] * 4 + ["i32"] * 9


def check_prefetch():
    """The GEMV's PDL variant loads its W tile before griddepcontrol.wait (the point of PDL
    here) and every USE_GDC=True kernel has the wait and the trigger."""
    c = linear._config(1, 576, 576)
    ptx = compile_one(linear._linear_kernel, LINEAR_TYPES("bf16"),
                      dict(HAS_NORM=True, HAS_BIAS=False, HAS_RESIDUAL=True, SILU=False, USE_DOT=False,
                           VEC=False, EVEN_K=False, DOT_PRECISION="tf32", UPCAST=False, BLOCK_M=1,
                           BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, ROWS=c.ROWS, COMBINE=False, HD=1,
                           USE_GDC=True), c.num_warps, asm=True)
    wait = ptx.find("griddepcontrol.wait")
    if wait < 0 or "griddepcontrol.launch_dependents" not in ptx:
        return "no griddepcontrol.wait / launch_dependents in the GEMV's PTX"
    if "ld.global" not in ptx[:wait]:
        return "the GEMV loads no weights before griddepcontrol.wait"
    return None


def _ss_layouts(rows, K, N=4096):
    """sizePerThread of the tiles over which a GEMV program of ROWS rows (fp32, norm on) sums
    each row's squares, compiled with the alignment the runtime specialises on: 16-byte aligned
    pointers, N and the output strides multiples of 16, K and x's stride too when they are, and
    M = 1 (a constant at runtime) for one row."""
    import re
    c = linear._config(rows, N, K)._replace(ROWS=rows)
    cx = dict(HAS_NORM=True, HAS_BIAS=True, HAS_RESIDUAL=True, SILU=False, USE_DOT=False, VEC=False,
              EVEN_K=K % c.BLOCK_K == 0, DOT_PRECISION="ieee", UPCAST=False, BLOCK_M=1, BLOCK_N=c.BLOCK_N,
              BLOCK_K=c.BLOCK_K, ROWS=rows, COMBINE=False, HD=1, USE_GDC=False) | ({"M": 1} if rows == 1 else {})
    ints = ("i32",) * (2 if rows == 1 else 3)                    # M, N, K (M a constant at one row)
    aligned = {"x_ptr", "w_ptr", "wu_ptr", "b_ptr", "r_ptr", "nw_ptr", "y_ptr", "N", "stride_rm", "stride_ym"}
    if K % 16 == 0:
        aligned |= {"K", "stride_xm", "stride_wn"}
    ir = compile_one(linear._linear_kernel, LINEAR_TYPES("fp32", ints), cx,
                     c.num_warps, asm="ttgir", aligned=aligned, num_stages=c.num_stages)
    spt = dict(re.findall(r"(#blocked\d*) = #ttg\.blocked<\{sizePerThread = (\[[^]]*\])", ir))
    used = re.findall(rf"\}}\) : \(tensor<1x{c.BLOCK_K}xf32, (#blocked\d*)>\)", ir)
    return [spt[u] for u in used]


def check_row_layouts():
    """A GEMV row's sum of squares (its rstd) must not depend on how many rows its program
    holds (exact mode's batch invariance): at K = 4100, whose rows are only 4-byte aligned, the
    1-, 2- and 8-row programs once loaded x in vectors of 1, 2 and 4 (pid * ROWS is a multiple of
    ROWS), so they reduced over different tiles and differed by an ulp on the H200."""
    for K in (4100, 4096):
        got = {rows: _ss_layouts(rows, K) for rows in (1, 2, 8)}
        if not all(got.values()):
            return f"K={K}: found no sum-of-squares reduction in the TTGIR ({got})"
        if len({x for v in got.values() for x in v}) != 1:
            return f"K={K}: the sum-of-squares tiles differ with ROWS: {got}"
    return None


def cases(dt):
    p = f"*{dt}"
    yield "rms_norm", rmsnorm._rms_norm_kernel, [p, p, p, "i32", "fp32", "i32", "i32"], dict(BLOCK_D=4096), 8
    yield "add_rms_norm", rmsnorm._add_rms_norm_kernel, [p] * 5 + ["i32", "fp32"] + ["i32"] * 4, dict(BLOCK_D=1024), 4
    yield "silu_mul", swiglu._silu_mul_kernel, [p, p, "i32", "i32", "i32"], dict(BLOCK=1024), 4
    for qk in (False, True):   # QK_NORM: Qwen3's per-head q/k norms before RoPE
        yield (f"rope_cache QK_NORM={qk}", rope_cache._rope_cache_kernel,
               [p, p, p, "*i64", p, p, p, p, p] + ["i32"] * 4 + ["fp32"] + ["i32"] * 15,
               dict(HALF=32, BLOCK_H=32, QK_NORM=qk), 1)
    for bm, bk in ((16, 64), (64, 32)):
        yield (f"medusa BLOCK_M={bm}", medusa._resblock_layer_kernel, [p if bm == 16 else "*fp32", p, p, p] + ["i32"] * 9,
               dict(HAS_BIAS=True, DOT_PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False,
                    BLOCK_M=bm, BLOCK_N=32, BLOCK_K=bk), 4)
    yield ("accept", accept._accept_greedy_kernel, ["*i64", "*i32", "*i64", "*i64", "*i64", "*i64", "*i64", "*i64"] + ["i32"] * 7,
           dict(MAX_DEPTH=6, BLOCK_N=64, BLOCK_P=8), 1)
    yield ("compact_kv", accept._compact_kv_kernel, ["*i64", p, "*i64", "*i64", "*i64"] + ["i32"] * 6,
           dict(P=7, BLOCK_D=128), 1)
    for hd, single, fused in ((64, False, False), (64, False, True), (128, True, False)):
        yield (f"attention hd={hd} single={single} fused={fused}", tree_attention._attn_split_kernel,
               [p, p, p, "*u8", "*i32", p if single else "*fp32", "*fp32", p, "*i32"] + ["i32"] * 5 + ["fp32"]
               + ["i32"] * 21,
               dict(HD=hd, BLOCK_D=hd, BLOCK_M=64, BLOCK_N=32 if dt == "fp32" else 64, SINGLE=single, HAS_KV_LEN=single,
                    FUSED=fused, DOT_PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False), 4)
    # the same with RoPE and the cache write first (rope_tree_attention): a decode step, a chain
    for hd, single, bt in ((64, False, 2), (64, True, 8), (128, False, 64)):
        yield (f"rope attention hd={hd} single={single} T<={bt}", tree_attention._attn_rope_split_kernel,
               [p, p, p, "*i64", p, p, "*u8", "*i32", p if single else "*fp32", "*fp32", p, "*i32"]
               + ["i32"] * 6 + ["fp32"] + ["i32"] * 24,
               dict(HD=hd, HALF=hd // 2, BLOCK_D=hd, BLOCK_M=64, BLOCK_N=32 if dt == "fp32" else 64,
                    BLOCK_T=bt, SINGLE=single, HAS_KV_LEN=False, FUSED=False,
                    DOT_PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False), 4)
    # the q|k|v projection with RoPE and the cache write: SmolLM2's tiles (one pair a program)
    # and a 7B's (eight), several rows a program
    for p_, bk, rows in ((1, 1024, 1), (8, 512, 4)):
        yield (f"linear_rope P={p_} ROWS={rows}", linear_rope._linear_rope_kernel,
               [p] * 6 + ["*i64", p, p, p] + ["i32"] * 6 + ["fp32"] + ["i32"] * 15,
               dict(HALF=32 if p_ == 1 else 64, P=p_, HAS_NORM=True, HAS_BIAS=rows > 1, EVEN_K=False,
                    BLOCK_K=bk, ROWS=rows), 4)
    yield ("chain indices", chain_index._chain_indices_kernel,
           ["*i64"] * 4 + ["*i1", "*i64", "*i1", "*i64", "*i64"] + ["i32"] * 3,
           dict(HAS_CU=True, HAS_ROOT=True, BLOCK_W=1024), 4)
    for gumbel in (False, True):
        yield (f"argmax partial gumbel={gumbel}", argmax._argmax_partial_kernel,
               [p, "*fp32", "*fp32", "*fp32", "*i32", "i32", "i32", "i32", "i32"], dict(GUMBEL=gumbel, BLOCK=1024), 4)
    # speculative sampling's acceptance, with q as probabilities and as draft logits
    for q in (p, "*fp32", "*bf16"):   # q: the draft's logits (any float) or fp32 probabilities
        yield (f"spec_sample row stats q={q}", spec_sample._row_stats_kernel, [p, q, "*fp32", "*fp32", "*fp32"] + ["i32"] * 6,
               dict(BLOCK=spec_sample.BLOCK), 4)
    for q_logits in (False, True):
        for q_ids in (False, True):   # q over all V tokens, or over a draft vocabulary through its map
            yield (f"spec_sample race q_logits={q_logits} q_ids={q_ids}", spec_sample._race_kernel,
                   [p, p if q_logits else "*fp32", "*i64", "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", "*i64", "*fp32",
                    "*i32", "*fp32", "*fp32", "*i32", "*i32" if q_ids else "*i64"] + ["i32"] * 6,
                   dict(Q_LOGITS=q_logits, Q_IDS=q_ids, BLOCK=spec_sample.BLOCK, BLOCK_N=8, BLOCK_P=32), 4)
    yield ("spec_sample pick", spec_sample._pick_kernel, ["*fp32", "*i32", "*fp32", "*fp32", "*i32", "*i64", "i32"],
           dict(BLOCK_P=32), 1)
    yield "argmax final", argmax._argmax_final_kernel, ["*fp32", "*i32", "*i64", "i32"], dict(BLOCK_P=64), 1
    # a greedy EAGLE tree's ranking (top-k with log-probabilities) and bookkeeping
    for k in (3, 16):
        kp = linear.next_pow2(k)
        yield (f"topk partial k={k}", topk._topk_partial_kernel, [p, "*fp32", "*i32", "*fp32", "*fp32"] + ["i32"] * 3,
               dict(K=k, KP=kp, BLOCK=topk.BLOCK), 4)
        yield (f"topk final k={k}", topk._topk_final_kernel, ["*fp32", "*i32", "*fp32", "*fp32", "*i64", "*fp32", "i32"],
               dict(K=k, KP=kp, BLOCK_P=64, BLOCK_C=linear.next_pow2(48 * kp)), 4)
    for root, nxt in ((True, True), (False, True), (False, False)):
        yield (f"tree_expand root={root} next={nxt}", tree_draft._tree_expand_kernel,
               ["*i64", "*fp32", p, "*i64", "*i64", "*i64", "*fp32", "*i64", "*i64", "*i1",
                "*i64", "*i64", p, "*i64", "*i64", "*i1"] + ["i32"] * 7,
               dict(K=8, C=8 if root else 64, KK=8 if root else 64, KP=8, BLOCK_W=tree_draft.BLOCK_W,
                    BLOCK_P=tree_draft.BLOCK_P, BLOCK_D=tree_draft.BLOCK_D, ROOT=root, NEXT=nxt), 4)
    yield ("tree_select", tree_draft._tree_select_kernel,
           ["*i64", "*fp32", "*i64", "*i64", "*i1", "*i64", "*i64", "*i64", "*i64", "*i1", "*i32", "*i32", "i32", "i32"],
           dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_N=32), 4)
    yield ("attention combine", tree_attention._attn_combine_kernel, ["*fp32", "*fp32", p] + ["i32"] * 13,
           dict(HD=64, BLOCK_D=64), 1)
    # linear: the GEMV path (M <= 8: ROWS 1, 4 and 8, one and several K blocks) and the MMA path
    # at the BLOCK_M extremes, norm/residual/silu
    for (M, N, K), silu in (((1, 1728, 576), False), ((1, 4096, 4096), True), ((8, 576, 576), True),
                            ((3, 1728, 576), False), ((8, 4096, 4096), False), ((16, 576, 576), True),
                            ((64, 576, 1536), False)):
        for c in (linear._config(M, N, K), linear.vec_config(N, K, min(8, linear.next_pow2(M)), silu)):
            yield (f"linear M={M} N={N} K={K} silu={silu}{' vec' if c.vec else ''}", linear._linear_kernel,
                   LINEAR_TYPES(dt),
                   dict(HAS_NORM=True, HAS_BIAS=not silu, HAS_RESIDUAL=not silu, SILU=silu, USE_DOT=c.use_dot,
                        VEC=c.vec, EVEN_K=False, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                        UPCAST=False, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, ROWS=c.ROWS,
                        COMBINE=False, HD=1),
                   c.num_warps)
    # the output projection with the attention's combine in its prologue (linear_combine)
    for M in (1, 5):
        c = linear._config(M, 576, 576)._replace(ROWS=1)
        yield (f"linear_combine M={M}", linear._linear_kernel, LINEAR_TYPES(dt),
               dict(HAS_NORM=False, HAS_BIAS=False, HAS_RESIDUAL=True, SILU=False, USE_DOT=False, VEC=False,
                    EVEN_K=False, DOT_PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False, BLOCK_M=1,
                    BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, ROWS=c.ROWS, COMBINE=True, HD=64),
               c.num_warps)


def main():
    try:
        compile_one(swiglu._silu_mul_kernel, ["*fp32", "*fp32", "i32", "i32", "i32"],
                    dict(BLOCK=128, USE_GDC=False))
    except Exception as e:  # this Triton build cannot compile without a GPU: nothing to check
        print(f"cannot compile offline: {type(e).__name__}: {e}")
        return 2
    failed = 0
    for gdc in (False, True):           # without and with PDL's wait/trigger (kernels/_common.py)
        for dt in ("bf16", "fp32"):
            for name, fn, types, constexprs, nw in cases(dt):
                try:
                    shared = compile_one(fn, types, dict(constexprs, USE_GDC=gdc), nw)
                    print(f"ok   {dt} {name} USE_GDC={gdc}: {shared} B shared")
                except Exception as e:
                    failed += 1
                    print(f"FAIL {dt} {name} USE_GDC={gdc}: {type(e).__name__}: {str(e)[:2000]}")
    err = check_prefetch()
    print(f"FAIL GEMV prefetch: {err}" if err else "ok   GEMV loads W before griddepcontrol.wait")
    err2 = check_row_layouts()
    print(f"FAIL GEMV row layouts: {err2}" if err2 else "ok   GEMV rows sum their squares over one tile whatever ROWS")
    return 1 if failed or err or err2 else 0


if __name__ == "__main__":
    sys.exit(main())
