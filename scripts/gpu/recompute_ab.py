"""Same-process A/B of the job's levers (issue 11), on the GPU machine, through job.bench's phases:

    copies    the batch copied to the GPU without waiting for it (accelerate's non_blocking, from pinned memory)
              vs a blocking copy
    syncs     TRL's metrics read back after every forward, transformers' NaN filter, its mask builder
    down      the down projection's matmul skipped in a recompute (job.speed.SKIP_MLP_FAMILIES) vs run again
    offload   checkpoints offloaded by job.longctx's asynchronous offloader vs transformers' save_on_cpu
    alloc     (with `alloc` as the second argument) the caching allocator's expandable segments on vs off, and
              the job uncapped with and without recomputing every layer
    host      (with `host` as the second argument) uncapped, alternating: the job; the job before
              speed.count_flops_once (transformers' FLOP count walking the model every micro-step); the job with
              gc.freeze() after the trainer is built (is Python's collector a stall?); stock's best recipe
    syncs, copies  (as the second argument) uncapped, ABBA: the job and the job before that lever; the job with
              both off (the product before run 17); stock's best recipe; then the two under each cap. The phases print
              their wall-clock start and end, to line up with an nvidia-smi sampler
    layers    (with `layers` as the second argument) under each cap: the job with OFFLOAD_LAYERS at 0 and more
              (the offloader's counters with each), stock's fastest recipe there; pinned copy rates first
    rows      (with `rows` as the second argument) under each cap: the job at its 4 rows a step, the job told to train
              8 rows a step (GRAD_ACCUM=2), and stock's fastest recipe there, which trains 8 (batch 8, recompute)

The "before" side is the previous code path, restored for one phase by patching this process only.
Usage: python3 scripts/gpu/recompute_ab.py CAP[,CAP...] [alloc|host|syncs|copies|rows|layers] > ab.jsonl   (one JSON line per phase)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from job import bench, longctx, speed


@contextlib.contextmanager
def previous(lever: str):
    """The code path before the lever, for one phase."""
    from trl import SFTTrainer

    from job import train

    saved = (speed.SKIP_MLP_FAMILIES, longctx.offload_checkpoints, speed.sft_arguments, speed.count_flops_once,
             train.JobTrainer, set(speed.MASK_FREE_ATTENTION))
    if lever == "copies":  # the batch copied to the GPU with a blocking copy
        speed.sft_arguments = lambda levers: {**saved[2](levers), "accelerator_config": {"non_blocking": False}}
    elif lever == "syncs":  # TRL's metrics read after every forward, the NaN filter on, transformers' mask builder
        train.JobTrainer = SFTTrainer
        speed.sft_arguments = lambda levers: {**saved[2](levers), "logging_nan_inf_filter": True}
        speed.MASK_FREE_ATTENTION.clear()
    elif lever == "flops":
        speed.count_flops_once = lambda trainer: None
    elif lever == "down":
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
        (speed.SKIP_MLP_FAMILIES, longctx.offload_checkpoints, speed.sft_arguments, speed.count_flops_once,
         train.JobTrainer) = saved[:5]
        speed.MASK_FREE_ATTENTION.update(saved[5])


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


@contextlib.contextmanager
def frozen_collector():
    """gc.freeze() once the trainer is built (the candidate lever), unfrozen after the phase so it can be freed."""
    original = speed.count_flops_once

    def count_then_freeze(trainer):
        original(trainer)
        gc.freeze()

    speed.count_flops_once = count_then_freeze
    try:
        yield
    finally:
        speed.count_flops_once = original
        gc.unfreeze()


def host_ab(nf4_dir, rows, caps, lever: str) -> None:
    """The job against the job before `lever`, ABBA after an untimed job phase (the first job phase of a process
    runs slow: runs 11 and 14-16); then the previous product path (every host lever off), stock's best recipe,
    and the two under each cap."""
    def timed(phase, context, steps=8):
        started = time.time()
        with context:
            result = bench.run_phase(phase, nf4_dir, rows, bench.Options(warmup=3, steps=steps))
        print(json.dumps({**dataclasses.asdict(result), "t_start": started, "t_end": time.time()}), flush=True)

    timed(bench.Phase("warm", "job"), contextlib.nullcontext(), steps=2)
    for name in ("job", f"job before {lever}", f"job before {lever}", "job"):
        timed(bench.Phase(name, "job"), previous(lever) if "before" in name else contextlib.nullcontext())
    with previous("syncs"), previous("copies"):
        timed(bench.Phase("job before syncs and copies", "job"), contextlib.nullcontext())
    timed(bench.Phase("stock", "stock", bench.Stock()), contextlib.nullcontext())
    for cap in caps:
        timed(bench.Phase(f"job@{cap:g}", "job", cap_gib=cap), contextlib.nullcontext())
        timed(bench.Phase(f"job@{cap:g} before {lever}", "job", cap_gib=cap), previous(lever))


def pcie_gbps(gib: float = 1.0) -> dict:
    """Pinned host <-> GPU copy rates, one direction at a time and both at once (GB/s)."""
    import torch

    n = int(gib * 2**30)
    host = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    gpu = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    rates = {}
    for name, copies in (("d2h", [(0, "out")]), ("h2d", [(0, "in")]), ("both", [(0, "out"), (1, "in")])):
        torch.cuda.synchronize()
        started = time.time()
        for _ in range(3):
            for (i, way), stream in zip(copies, streams):
                with torch.cuda.stream(stream):
                    (host[i].copy_(gpu[i], non_blocking=True) if way == "out" else
                     gpu[i].copy_(host[i], non_blocking=True))
        torch.cuda.synchronize()
        rates[name] = round(3 * n / (time.time() - started) / 1e9, 1)
    return rates


def layers_ab(nf4_dir, rows, caps) -> None:
    """OFFLOAD_LAYERS under each cap (the first recomputed layers' activations to pinned CPU memory instead), the
    job's plan before and after, stock's fastest recipe there; the offloader's counters per phase."""
    modes = []
    original = longctx.offload_layers

    def capture(*args, **kwargs):  # what the report reads, not the mode itself: it holds the phase's model
        mode = original(*args, **kwargs)
        modes.append(SimpleNamespace(counters=mode.counters, layer_bytes=mode.layer_bytes, store=mode.store,
                                     pool=mode.pool))
        return mode

    longctx.offload_layers = capture
    print(json.dumps({"pcie_gbps": pcie_gbps()}), flush=True)
    opts = bench.Options(warmup=3, steps=8)
    bench.run_phase(bench.Phase("warm", "job"), nf4_dir, rows, bench.Options(warmup=1, steps=2))
    counts = {16: (0, 4, 6, 8, 0), 24: (0, 8, 10), 40: (0, 8)}
    for cap in caps:
        for count in counts.get(int(cap), (0, 4)):
            before = len(modes)
            phase = bench.Phase(f"job@{cap:g} offload {count}", "job", overrides={"offload_layers": str(count)},
                                cap_gib=cap)
            result = dataclasses.asdict(bench.run_phase(phase, nf4_dir, rows, opts))
            if len(modes) > before:
                mode = modes[-1]
                result["offload"] = {**mode.counters, "pinned_gib": round(mode.store.pinned_bytes / 2**30, 2),
                                     "pin_s": round(mode.store.pin_seconds, 1), "pool_gib": round(mode.pool / 2**30, 2),
                                     "layer_gib": round(max(mode.layer_bytes.values(), default=0) / 2**30, 3)}
            print(json.dumps(result), flush=True)
        if cap > 24:  # no stock recipe to compare with above what the caps ask
            continue
        result = bench.run_phase(bench.Phase(f"stock@{cap:g}", "stock", bench.Stock(recompute=True, batch=8),
                                             cap_gib=cap), nf4_dir, rows, opts)
        print(json.dumps(dataclasses.asdict(result)), flush=True)


def main(caps: list[float], mode: str = "levers") -> None:
    _, nf4_dir = bench.build_model("llama-3-8b", Path("/tmp/job-bench"))
    rows = bench.make_rows(3000, 128256, 2048)
    opts = bench.Options(warmup=3, steps=8)
    if mode in ("syncs", "copies"):
        return host_ab(nf4_dir, rows, caps, mode)
    if mode == "layers":
        return layers_ab(nf4_dir, rows, caps)
    if mode == "rows":
        for cap in caps:
            for phase in (bench.Phase(f"job@{cap:g}", "job", cap_gib=cap),
                          bench.Phase(f"job@{cap:g} 8 rows", "job", overrides={"grad_accum": "2"}, cap_gib=cap),
                          bench.Phase(f"stock@{cap:g}", "stock", bench.Stock(recompute=True, batch=8), cap_gib=cap)):
                print(json.dumps(dataclasses.asdict(bench.run_phase(phase, nf4_dir, rows, opts))), flush=True)
        return
    # flex_attention compiles in the first phase that uses it: a stock phase first, untimed for the A/B
    bench.run_phase(bench.Phase("warm", "stock", bench.Stock(recompute=True, batch=2)), nf4_dir, rows, opts)
    phases = []
    if mode == "host":
        for round_ in (1, 2):
            for name, context in (("job", contextlib.nullcontext()), ("job before flops", previous("flops")),
                                  ("job gc.freeze", frozen_collector())):
                with context:
                    result = bench.run_phase(bench.Phase(f"{name} #{round_}", "job"), nf4_dir, rows, opts)
                print(json.dumps(dataclasses.asdict(result)), flush=True)
            result = bench.run_phase(bench.Phase(f"stock #{round_}", "stock", bench.Stock()), nf4_dir, rows, opts)
            print(json.dumps(dataclasses.asdict(result)), flush=True)
        return
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
