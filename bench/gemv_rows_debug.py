"""Probe of the fp32 GEMV rows that are not bitwise the same alone on the GPU (README, "Known
failures on the GPU"): for each setting, how many outputs of each row differ from the row
computed alone, and by how much. GPU only: python bench/gemv_rows_debug.py"""
import torch
from kernels import linear as L
torch.manual_seed(0)
dev = "cuda"
def inputs(M, N, K):
    x = torch.randn(M, K, device=dev) * 3; W = torch.randn(N, K, device=dev) / K ** 0.5
    b = torch.randn(N, device=dev) * 0.1; r = torch.randn(M, N, device=dev); nw = 1 + 0.2 * torch.randn(K, device=dev)
    return x, W, b, r, nw
def check(M, N, K, rows, norm=True, bias=True, res=True, cfg1_rows=1):
    x, W, b, r, nw = inputs(M, N, K)
    base = L._config(1, N, K)
    cm = base._replace(ROWS=rows); c1 = base._replace(ROWS=cfg1_rows)
    args = lambda xs, rs: (xs, W, b if bias else None, rs if res else None, nw if norm else None, 1e-5)
    many = L.linear(*args(x, r), config=cm)
    out = []
    for i in range(M):
        one = L.linear(*args(x[i:i+1].clone(), r[i:i+1].clone()), config=c1)
        d = (many[i:i+1] - one).abs()
        out.append((int((d > 0).sum()), float(d.max())))
    print(f"M={M} N={N} K={K} ROWS={rows} vs {cfg1_rows} norm={norm} bias={bias} res={res}: {out}", flush=True)
check(5, 4096, 4100, 8)
check(5, 4096, 4100, 8, norm=False)
check(5, 4096, 4100, 8, norm=False, bias=False, res=False)
check(5, 4096, 4100, 4)
check(5, 4096, 4100, 2)
check(2, 4096, 4100, 2)
check(5, 4096, 4096, 8)
check(5, 4096, 4100, 8, cfg1_rows=8)
check(5, 576, 4100, 8)
check(5, 4096, 1536, 8)
# second round (appended; the lines above are unchanged, so their RNG draws are too): do the
# multi-row programs agree with each other, and which K are affected (masked last block or not)
check(5, 4096, 4100, 8, cfg1_rows=2)
check(5, 4096, 4100, 4, cfg1_rows=2)
check(8, 4096, 4100, 8, cfg1_rows=4)
for K in (4104, 4160, 4608, 1540, 600):
    check(8, 4096, K, 8)
for _ in range(3):
    check(8, 4096, 4100, 8)
