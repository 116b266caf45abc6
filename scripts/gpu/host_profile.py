"""Where the host time of a micro-step goes (issue 11), on the GPU machine, through job.bench's phases.

The capped plans are limited by ~0.47 s of host work per micro-step (docs/performance.md, "What limits the capped
runs"). This profiles one whole optimizer step of the job's path (from the end of the step before, so the logging
and the batch fetch between steps are inside) with Python stacks, once at 4 rows a micro-step and once at 1 row x 4
micro-steps (host-bound), and prints: wall vs kernel time, CUDA runtime calls (launches, syncs), the self time of
every Python function and operator summed over all threads (autograd's backward thread too, which cProfile would
miss), and what the host ran inside the longest GPU gaps. Kernels-only runs print the GPU time by kind of kernel.
The Chrome traces go to $OUT (gzipped) for a closer look.

Usage: python3 scripts/gpu/host_profile.py OUT_DIR [PHASE,...] [kernels]
    PHASE: 4x1 (default), 1x4, 16 (a 16 GiB cap), stock (the best stock recipe); `kernels` records kernels only, so the host runs at full speed
    and the idle gaps are the real ones
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

from job import bench


def self_times(trace: dict) -> dict:
    """{(category, name): [calls, self microseconds, total microseconds]} from a Chrome trace: self is each
    event's duration minus that of the events nested directly in it on the same thread."""
    by_thread = collections.defaultdict(list)
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("python_function", "cpu_op", "cuda_runtime", "cuda_driver"):
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    totals = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list = []  # [event, child time]
        def close(entry):
            event, child = entry
            key = (event["cat"], event["name"])
            totals[key][0] += 1
            totals[key][1] += event["dur"] - child
            totals[key][2] += event["dur"]
            if stack:
                stack[-1][1] += event["dur"]
        for e in events:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                close(stack.pop())
            stack.append([e, 0.0])
        while stack:
            close(stack.pop())
    return totals


def report(name: str, trace: dict, wall_s: float) -> None:
    totals = self_times(trace)
    kernels = sum(e["dur"] for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") == "kernel")
    print(f"\n=== {name}: wall {wall_s:.3f} s, kernels {kernels / 1e6:.3f} s (busy {kernels / 1e6 / wall_s:.0%})")
    runtime = sorted(((k[1], v) for k, v in totals.items() if k[0] in ("cuda_runtime", "cuda_driver")),
                     key=lambda kv: -kv[1][1])
    print("CUDA runtime/driver calls (calls, self ms):")
    for n, (calls, us, _) in runtime[:12]:
        print(f"  {calls:7d} {us / 1e3:9.1f}  {n}")
    for category in ("python_function", "cpu_op"):
        rows = sorted(((k[1], v) for k, v in totals.items() if k[0] == category), key=lambda kv: -kv[1][1])
        whole = sum(v[1] for _, v in rows)
        print(f"{category}: {whole / 1e3:.1f} ms self time in all; top 45 (calls, self ms, name):")
        for n, (calls, us, _) in rows[:45]:
            print(f"  {calls:7d} {us / 1e3:9.1f}  {n[:150]}")
    rows = sorted(((k[1], v) for k, v in totals.items() if k[0] == "python_function"), key=lambda kv: -kv[1][2])
    print("python_function by total time (calls, total ms, name), top 60:")
    for n, (calls, _, us) in rows[:60]:
        print(f"  {calls:7d} {us / 1e3:9.1f}  {n[:150]}")


def gaps(trace: dict, wall_s: float) -> None:
    """Where the GPU waits, from a kernels-only trace: idle time in each 5% of the step, and the kernels that
    follow the longest waits (what the host was late to launch)."""
    kernels = sorted((e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    if not kernels:
        return
    start, end = kernels[0]["ts"], kernels[-1]["ts"] + kernels[-1]["dur"]
    span = end - start
    idle = [0.0] * 20
    waits = collections.Counter()
    longest = []  # (gap, offset from the start, the kernel that ended it)
    last = start
    for e in kernels:
        if e["ts"] > last:
            idle[min(19, int((last - start) / span * 20))] += e["ts"] - last
            if e["ts"] - last > 30:
                waits[e["name"][:80]] += e["ts"] - last
                longest.append((e["ts"] - last, last - start, e["name"][:80]))
        last = max(last, e["ts"] + e["dur"])
    print(f"kernels span {span / 1e3:.1f} ms of {wall_s * 1e3:.1f} ms wall; GPU idle {sum(idle) / 1e3:.1f} ms inside it")
    print("idle ms per 5% of the span: " + " ".join(f"{v / 1e3:.0f}" for v in idle))
    for name, us in waits.most_common(12):
        print(f"  {us / 1e3:7.1f} ms waited before {name}")
    print("longest gaps (ms, at +ms, before):")
    for gap, offset, name in sorted(longest, reverse=True)[:15]:
        print(f"  {gap / 1e3:7.1f} at +{offset / 1e3:7.1f}  {name}")


KERNEL_KINDS = (("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas")), ("flash attention", ("flash", "fmha")),
                ("lora triton", ("_lora_",)), ("liger", ("_rms_norm", "_swiglu", "_rope", "_triton_rope")),
                ("bnb dequant", ("kDequantize", "dequant")), ("chunked head", ("logprob", "_chunked")),
                ("copy/cast", ("copy", "cast", "Copy")), ("elementwise", ("elementwise", "Elementwise")),
                ("reduce", ("reduce", "Reduce")))


def kernel_breakdown(trace: dict) -> None:
    """GPU time by kind of kernel and the top kernels by name: what the GPU spends a step on."""
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            by_name[e["name"]][0] += 1
            by_name[e["name"]][1] += e["dur"]
    kinds = collections.Counter()
    for name, (_, us) in by_name.items():
        kinds[next((kind for kind, keys in KERNEL_KINDS if any(k in name for k in keys)), "other")] += us
    whole = sum(kinds.values())
    print("GPU time by kind (ms, share): " + ", ".join(f"{k} {v / 1e3:.1f} ({v / whole:.0%})"
                                                       for k, v in kinds.most_common()))
    for name, (calls, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:30]:
        print(f"  {calls:6d} {us / 1e3:8.1f} ms  {name[:140]}")


def host_in_gaps(trace: dict, count: int = 5) -> None:
    """What the host was doing while the GPU sat idle: the Python functions with the most self time inside each of
    the longest GPU gaps (a gap between kernels is host work the GPU waited for)."""
    events = trace.get("traceEvents", [])
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    windows, last = [], None
    for e in kernels:
        if last is not None and e["ts"] - last > 1000:
            windows.append((last, e["ts"]))
        last = e["ts"] + e["dur"] if last is None else max(last, e["ts"] + e["dur"])
    for start, end in sorted(windows, key=lambda w: w[0] - w[1])[:count]:
        clipped = []
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in ("python_function", "cpu_op", "cuda_runtime"):
                a, b = max(e["ts"], start), min(e["ts"] + e["dur"], end)
                if b > a:
                    clipped.append({**e, "ts": a, "dur": b - a})
        rows = sorted(((k, v) for k, v in self_times({"traceEvents": clipped}).items()), key=lambda kv: -kv[1][1])
        print(f"GPU idle {(end - start) / 1e3:.1f} ms at +{(start - kernels[0]['ts']) / 1e3:.0f} ms; host self time there:")
        for (category, fn), (calls, us, _) in rows[:14]:
            print(f"  {us / 1e3:7.1f} ms {calls:5d}x {category[:6]} {fn[:130]}")


def traced_profiler(out: Path, name: str, stacks: bool = True, steps: int = 1):
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        """`steps` whole optimizer steps after warm-up, end to end: from the end of step 3 (so the logging and the
        batch fetch between steps are inside) to the end of step 3 + steps."""

        def __init__(self):
            self.prof = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None and state.global_step == 3:
                torch.cuda.synchronize()
                activities = [torch.profiler.ProfilerActivity.CUDA]
                if stacks:
                    activities.append(torch.profiler.ProfilerActivity.CPU)
                self.prof = torch.profiler.profile(activities=activities, with_stack=stacks)
                self.prof.start()
                self.started = time.perf_counter()
            elif self.prof is not None and state.global_step == 3 + steps:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.started
                self.prof.stop()
                path = out / f"{name}.json"
                self.prof.export_chrome_trace(str(path))
                trace = json.loads(path.read_text())
                if stacks:
                    report(name, trace, wall)
                    host_in_gaps(trace)
                else:
                    print(f"\n=== {name} (kernels only: the host runs at full speed)")
                    kernel_breakdown(trace)
                gaps(trace, wall)
                with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                path.unlink()
                self.prof = None

    return Profile()


PHASES = {"4x1": ({}, 0.0), "1x4": ({"micro_batch_size": 1, "grad_accum": 4}, 0.0), "16": ({}, 16.0),
          "stock": (None, 0.0)}


def main(out: Path, phases: list[str], stacks: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _, nf4_dir = bench.build_model("llama-3-8b", Path("/tmp/job-bench"))
    rows = bench.make_rows(3000, 128256, 2048)
    opts = bench.Options(warmup=3, steps=4)
    for key in phases:
        overrides, cap = PHASES[key]
        name = f"job-{key}" + ("" if stacks else "-kernels")
        # plain timing first, then the same phase profiled
        phase = (bench.Phase(name, "stock", stock=bench.Stock(), cap_gib=cap) if overrides is None else
                 bench.Phase(name, "job", overrides=overrides, cap_gib=cap))
        result = bench.run_phase(phase, nf4_dir, rows, opts)
        print(f"{name}: {result.tokens_per_s:,.0f} tokens/s, {result.step_s:.3f} s/step", flush=True)
        bench._profiler = lambda warmup, steps=2, n=name: traced_profiler(out, n, stacks)
        bench.run_phase(dataclasses.replace(phase, profile=True), nf4_dir, rows, bench.Options(warmup=3, steps=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp/host-profile")),
         (sys.argv[2] if len(sys.argv) > 2 else "4x1,1x4").split(","), "kernels" not in sys.argv[3:])
