"""One profiled forward per mode (bare, critique, steer) of the Flux-width blocks that ``critic.cost`` times (2 double
+ 4 single, bf16, ``l_in = 0``): median wall time of 10, the device's busy time, and torch.profiler's table sorted by
device time. ``profile-before.txt`` (code at 5e4ab83) and ``profile-after.txt`` come from an earlier form of this
script that also counted device events; made on one H100 as::

    PYTHONPATH=$PWD python docs/results/critic/cost-gpu-h100/profile_critic.py cuda 1024 > profile-after.txt
"""

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from diffusers_ext.bench.timing import busy_s, sync
from diffusers_ext.critic.apply import apply_inline_critic, critic_config_for, remove_inline_critic
from diffusers_ext.critic.cost import flux_full_width, flux_inputs
from diffusers_ext.critic.module import InlineCritic

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
side = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
t = flux_full_width(2, 4, dtype=torch.bfloat16, device=device)
inputs, _ = flux_inputs(t, side, 512, 1, torch.bfloat16, device)
torch.manual_seed(0)
critic = InlineCritic(critic_config_for(t, n_tokens=4, l_in=0, adapter_rank=8, steer_rank=8))


def forward():
    with torch.no_grad():
        t(**inputs)
    sync(device)


for mode in ("bare", "critique", "steer"):
    handle = None if mode == "bare" else apply_inline_critic(t, critic, mode=mode)
    for _ in range(3):
        forward()
    walls = []
    for _ in range(10):
        t0 = time.perf_counter()
        forward()
        walls.append(time.perf_counter() - t0)
    busy = busy_s(forward, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        forward()
    print(f"== {mode}: wall median {statistics.median(walls) * 1e3:.2f} ms, busy {busy * 1e3:.2f} ms")
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70))
    if handle is not None:
        remove_inline_critic(t)
