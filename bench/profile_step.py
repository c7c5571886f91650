"""Kernel-level profile of one plain decode step (eager, as captured): kernels per step and
where the time goes.  python -m bench.profile_step"""
import torch
from torch.profiler import ProfilerActivity, profile

from koala import SpeculativeGenerator, load_target

lt = load_target("smollm2-135m-instruct", device="cuda", dtype=torch.bfloat16)
gen = SpeculativeGenerator(lt, max_seq_len=2048)
dec = gen.plain
with torch.inference_mode():
    dec.start(1, 300)
    for _ in range(3):
        dec.step.zero_(); dec.pos.fill_(300); dec._step(True, 512)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        dec.step.zero_(); dec.pos.fill_(300); dec._step(True, 512)
        torch.cuda.synchronize()
ev = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
print("kernels per step:", len(ev))
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
