"""Same-process A/B of the recomputation levers (issue 11), on the GPU machine, through job.bench's phases:

    down      the down projection's matmul skipped in a recompute (job.speed.SKIP_MLP_FAMILIES) vs run again
    offload   checkpoints offloaded by job.longctx's asynchronous offloader vs transformers' save_on_cpu
    alloc     (with `alloc` as the second argument) the caching allocator's expandable segments on vs off, and
              the job uncapped with and without recomputing every layer

The "before" side is the previous code path, restored for one phase by patching this process only.
Usage: python3 scripts/gpu/recompute_ab.py CAP[,CAP...] [alloc] > ab.jsonl   (one JSON line per phase)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from job import bench, longctx, speed


@contextlib.contextmanager
def previous(lever: str):
    """The code path before the lever, for one phase."""
    saved = (speed.SKIP_MLP_FAMILIES, longctx.offload_checkpoints, speed.sft_arguments)
    if lever == "down":
        speed.SKIP_MLP_FAMILIES = set()
    elif lever == "offload":
        def transformers_offload(levers):
            args = saved[2](levers)
            if levers.checkpointing == "offload":
                args["activation_checkpointing_kwargs"] = {"use_reentrant": False, "offload": True}
            return args

        speed.sft_arguments = transformers_offload
        longctx.offload_checkpoints = lambda model, tokens: SimpleNamespace(
            store=SimpleNamespace(device=SimpleNamespace(type="transformers save_on_cpu")))
    try:
        yield
    finally:
        speed.SKIP_MLP_FAMILIES, longctx.offload_checkpoints, speed.sft_arguments = saved


@contextlib.contextmanager
def expandable(on: bool):
    import torch

    torch.cuda.empty_cache()
    torch.cuda.memory._set_allocator_settings(f"expandable_segments:{on}")
    try:
        yield
    finally:
        torch.cuda.empty_cache()
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")


def main(caps: list[float], mode: str = "levers") -> None:
    _, nf4_dir = bench.build_model("llama-3-8b", Path("/tmp/job-bench"))
    rows = bench.make_rows(3000, 128256, 2048)
    opts = bench.Options(warmup=3, steps=8)
    # flex_attention compiles in the first phase that uses it: a stock phase first, untimed for the A/B
    bench.run_phase(bench.Phase("warm", "stock", bench.Stock(recompute=True, batch=2)), nf4_dir, rows, opts)
    phases = []
    if mode == "alloc":
        phases += [(bench.Phase("job", "job"), False), (bench.Phase("job recompute all", "job", overrides={
            "gradient_checkpointing": "true"}), False), (bench.Phase("job recompute all expandable", "job", overrides={
                "gradient_checkpointing": "true"}), True)]
        for cap in caps:
            phases += [(bench.Phase(f"job@{cap:g}", "job", cap_gib=cap), False),
                       (bench.Phase(f"job@{cap:g} expandable", "job", cap_gib=cap), True)]
        for phase, segments in phases:
            with expandable(segments):
                result = bench.run_phase(phase, nf4_dir, rows, opts)
            print(json.dumps(dataclasses.asdict(result)), flush=True)
        return
    for cap in caps:
        for lever in (None, "down") + (("offload",) if cap <= 8 else ()):
            name = f"job@{cap:g}" + (f" before {lever}" if lever else "")
            with previous(lever) if lever else contextlib.nullcontext():
                result = bench.run_phase(bench.Phase(name, "job", cap_gib=cap), nf4_dir, rows, opts)
            print(json.dumps(dataclasses.asdict(result)), flush=True)

if __name__ == "__main__":
    main([float(c) for c in sys.argv[1].split(",")], *sys.argv[2:])
