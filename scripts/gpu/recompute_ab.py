"""Same-process A/B of the job's levers (issue 11), on the GPU machine, through job.bench's phases:

    down      the down projection's matmul skipped in a recompute (job.speed.SKIP_MLP_FAMILIES) vs run again
    offload   checkpoints offloaded by job.longctx's asynchronous offloader vs transformers' save_on_cpu
    alloc     (with `alloc` as the second argument) the caching allocator's expandable segments on vs off, and
              the job uncapped with and without recomputing every layer
    host      (with `host` as the second argument) uncapped, alternating: the job; the job before
              speed.count_flops_once (transformers' FLOP count walking the model every micro-step); the job with
              gc.freeze() after the trainer is built (is Python's collector a stall?); stock's best recipe
    sync      (with `sync` as the second argument) uncapped: the job as it is and the job without the GPU read-backs
              of every micro-step (run 8 measured that 10% slower and could not say why), timed, then each traced
              (kernels only, 3 steps) to see whether the kernels or the gaps change; stock's best recipe last.
              Run it beside an nvidia-smi sampler: the phases print their wall-clock start and end
    rows      (with `rows` as the second argument) under each cap: the job at its 4 rows a step, the job told to train
              8 rows a step (GRAD_ACCUM=2), and stock's fastest recipe there, which trains 8 (batch 8, recompute)

The "before" side is the previous code path, restored for one phase by patching this process only.
Usage: python3 scripts/gpu/recompute_ab.py CAP[,CAP...] [alloc|host|sync|rows] > ab.jsonl   (one JSON line per phase)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from job import bench, longctx, speed


@contextlib.contextmanager
def previous(lever: str):
    """The code path before the lever, for one phase."""
    saved = (speed.SKIP_MLP_FAMILIES, longctx.offload_checkpoints, speed.sft_arguments, speed.count_flops_once)
    if lever == "flops":
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
        speed.SKIP_MLP_FAMILIES, longctx.offload_checkpoints, speed.sft_arguments, speed.count_flops_once = saved


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


@contextlib.contextmanager
def without_syncs():
    """For one phase, the job without its three read-backs a micro-step: transformers' check whether the row is
    packed at every forward (masking_utils.find_packed_sequence_indices), TRL's metrics after every forward (kept
    on the GPU here until the log step) and transformers' NaN filter after every backward (off)."""
    import torch
    import trl
    from transformers import masking_utils

    class DeferredMetrics(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)  # TRL's plain loss, as sft_trainer.compute_loss has it
            count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
            self.__dict__.setdefault("pending", []).append(torch.stack(
                [outputs.entropy.detach().sum().float(), outputs.is_top1.sum().float(), outputs.label_mask.sum().float()]))
            self._total_train_tokens += inputs["position_ids"].size(1)
            return loss

        def log(self, logs, start_time=None):
            pending = self.__dict__.pop("pending", [])
            if pending:
                entropy, correct, valid = torch.stack(pending).sum(0).tolist()
                logs.update(entropy=entropy / max(valid, 1), mean_token_accuracy=correct / max(valid, 1))
            return super().log(logs, start_time)

    def packed_unchecked(position_ids):
        return (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)

    saved = trl.SFTTrainer, speed.sft_arguments, masking_utils.find_packed_sequence_indices
    trl.SFTTrainer = DeferredMetrics
    speed.sft_arguments = lambda levers: {**saved[1](levers), "logging_nan_inf_filter": False}
    masking_utils.find_packed_sequence_indices = packed_unchecked
    try:
        yield
    finally:
        trl.SFTTrainer, speed.sft_arguments, masking_utils.find_packed_sequence_indices = saved


def sync_ab(nf4_dir, rows, out: Path) -> None:
    import host_profile

    def timed(phase, context, opts):
        started = time.time()
        with context:
            result = bench.run_phase(phase, nf4_dir, rows, opts)
        print(json.dumps({**dataclasses.asdict(result), "t_start": started, "t_end": time.time()}), flush=True)

    timing, traced = bench.Options(warmup=3, steps=8), bench.Options(warmup=3, steps=3)
    timed(bench.Phase("job", "job"), contextlib.nullcontext(), timing)
    timed(bench.Phase("job no syncs", "job"), without_syncs(), timing)
    for name, context in (("job-nosync", without_syncs()), ("job-as-is", contextlib.nullcontext())):
        bench._profiler = lambda warmup, steps=2, n=name: host_profile.traced_profiler(out, n, stacks=False, steps=3)
        timed(bench.Phase(f"{name} traced", "job", profile=True), context, traced)
    timed(bench.Phase("stock", "stock", bench.Stock()), contextlib.nullcontext(), timing)


def main(caps: list[float], mode: str = "levers") -> None:
    _, nf4_dir = bench.build_model("llama-3-8b", Path("/tmp/job-bench"))
    rows = bench.make_rows(3000, 128256, 2048)
    opts = bench.Options(warmup=3, steps=8)
    if mode == "sync":
        return sync_ab(nf4_dir, rows, Path(os.environ.get("OUT", "/tmp")))
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
