"""`job bench`: every phase in one process, each memory cap's stock recipes, and the report."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from job.bench.checks import self_check
from job.bench.phase import Result, run_phase
from job.bench.recipes import (
    STOCK_UNDER_CAP,
    Options,
    Phase,
    job_phase_name,
    plan_phases,
    same_rows_recipes,
)
from job.bench.report import ratios
from job.bench.workload import build_model, log, make_rows


def run(opts: Options) -> dict:
    """Every phase of `opts`, then each memory cap's phases; the report is rewritten to `opts.out` after each."""
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    if not torch.cuda.is_available():
        from job.errors import ConfigError

        raise ConfigError("job bench needs a CUDA GPU (it times training of a 7-8B model); none is visible")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(opts.workdir or Path(tempfile.gettempdir()) / "job-bench")
    root.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()
    device = torch.cuda.get_device_name()
    log(f"device: {device}, {torch.cuda.mem_get_info()[1] / 2**30:.1f} GiB; torch {torch.__version__}")
    checks = self_check()
    log(f"self-check: {checks}")
    _, nf4_dir = build_model(opts.model, root)
    rows = make_rows(opts.rows, AutoConfig.from_pretrained(nf4_dir).vocab_size, opts.max_length)
    lengths = sorted(len(r) for r in rows["input_ids"])
    log(f"data: {len(lengths)} rows, median {lengths[len(lengths) // 2]} tokens, max {lengths[-1]}")
    results = []
    meta = {"device": device, "model": opts.model, "max_length": opts.max_length, "warmup_steps": opts.warmup,
            "timed_steps": opts.steps, "torch": torch.__version__, "checks": checks}

    def report() -> dict:
        return {**meta, "results": [dataclasses.asdict(r) for r in results], "ratios": ratios(results)}

    def timed(phase: Phase) -> Result:
        results.append(run_phase(phase, nf4_dir, rows, opts))
        if opts.out:  # rewritten after every phase, so a run cut short still leaves its figures
            Path(opts.out).write_text(json.dumps(report(), indent=2))
        return results[-1]

    phases = plan_phases(opts)
    for number, phase in enumerate(phases, 1):
        log(f"phase {number}/{len(phases)}: {phase.name}")
        timed(phase)
    for cap in opts.memory_caps:
        _under_cap(cap, opts, timed)
    return report()


def _under_cap(cap: float, opts: Options, timed) -> None:
    """The job's plan under `cap`, the fastest stock recipes that fit, and stock at the job's rows a step."""
    log(f"memory cap {cap:g} GiB: the job's choice")
    job = timed(Phase(job_phase_name(cap), "job", cap_gib=cap))
    stock, tried = [], 0
    for recipe in STOCK_UNDER_CAP:
        if recipe.predicted_gib(opts.max_length) > cap or tried >= opts.stock_tries:
            continue
        log(f"memory cap {cap:g} GiB: stock {recipe.describe(opts.max_length)}")
        stock.append(timed(Phase(f"stock@{cap:g}GiB", "stock", recipe, cap_gib=cap)))
        tried += stock[-1].ok
    if not any(r.ok for r in stock):
        log(f"memory cap {cap:g} GiB: no stock recipe fits")
    rows = job.rows_per_step
    if not rows or any(r.ok and r.rows_per_step == rows for r in stock):
        return
    for recipe in same_rows_recipes(rows):
        if recipe.predicted_gib(opts.max_length) > cap:
            continue
        log(f"memory cap {cap:g} GiB: stock at the job's {rows} rows a step, {recipe.describe(opts.max_length)}")
        if timed(Phase(f"stock@{cap:g}GiB {rows} rows", "stock", recipe, cap_gib=cap)).ok:
            return
