"""Device timing helpers shared by the speed and cost benchmarks."""

from __future__ import annotations

import torch


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def busy_s(fn, device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` keeps the device busy, read with ``torch.profiler``: on CUDA the summed kernel and
    copy time (the GPU runs them one after another on one stream), on the CPU the summed self time of the torch ops
    (``record_function`` ranges left out). Wall time minus this is the Python and kernel-launch overhead, so the
    ratio of two such numbers is what a wall-time ratio tends to once that overhead is gone (CUDA graphs, a
    compiler, larger batches)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    return sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in prof.events()
               if e.device_type == kind and not getattr(e, "is_user_annotation", False)) / 1e6
