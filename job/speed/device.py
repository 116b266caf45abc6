"""The device a training process runs on: the card, its free memory under GPU_MEMORY_GIB, the host memory left to
the process, and the allocator cap that makes a large card behave as a smaller one."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

GiB = 2**30


# Dense bf16 peak (TFLOP/s, no sparsity) by card name, for MFU. Longest match wins.
PEAK_BF16_TFLOPS = {
    "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H20": 148.0, "GH200": 989.0,
    "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A800": 312.0, "A10": 125.0, "A10G": 70.0, "L40S": 362.0,
    "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "A6000": 155.0, "V100": 125.0,
    "T4": 65.0,
}


@dataclass(frozen=True)
class Device:
    type: str                         # "cuda" or "cpu"
    name: str
    capability: tuple[int, int] = (0, 0)
    total_gib: float = 0.0
    budget_gib: float = 0.0           # what the job may use: the free memory, or GPU_MEMORY_GIB when lower
    capped: bool = False
    peak_tflops: float = 0.0
    host_gib: float = math.inf        # CPU memory this process may still take (pinned buffers come out of it)

    @property
    def cuda(self) -> bool:
        return self.type == "cuda"


def peak_tflops(name: str) -> float:
    hits = [key for key in PEAK_BF16_TFLOPS if key.lower() in name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else 0.0


def probe(limit_gib: float = 0.0) -> Device:
    """The device this process trains on; the budget is its free memory, capped at limit_gib when set."""
    if not torch.cuda.is_available():
        return Device("cpu", platform.processor() or platform.machine() or "cpu")
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    budget = free / GiB
    capped = bool(limit_gib) and limit_gib < budget
    return Device("cuda", props.name, (props.major, props.minor), round(total / GiB, 2),
                  round(min(budget, limit_gib) if capped else budget, 2), capped, peak_tflops(props.name),
                  round(host_budget_gib(), 1))


# cgroup v2, then v1: (limit, usage) files of the container this process runs in
CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def host_budget_gib() -> float:
    """CPU memory this process may still take: what the machine has available, or what is left under the
    container's limit when lower (psutil reads /proc/meminfo, which shows a Kubernetes pod the whole node), shared
    by the training processes of this node (LOCAL_WORLD_SIZE)."""
    import psutil

    available = psutil.virtual_memory().available
    for limit_file, usage_file in CGROUP_MEMORY:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # v2 writes "max" when there is no limit
            available = min(available, int(limit) - usage)
        break
    return max(0, available) / GiB / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def apply_memory_cap(device: Device) -> None:
    """Make the caching allocator stop at the budget, as a smaller card would (CUDA context excluded)."""
    if device.cuda and device.capped:
        torch.cuda.set_per_process_memory_fraction(min(1.0, device.budget_gib / device.total_gib))
