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
    STOCK_BEST,
    STOCK_UNDER_CAP,
    Options,
    Phase,
    Stock,
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
        if phase.name == "stock":
            results.append(stock_script(nf4_dir, rows, opts, root))
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


STOCK_SCRIPT = Path(__file__).with_name("stock_script.py")


def stock_script(nf4_dir: Path, rows: dict, opts: Options, root: Path, recipe: Stock = STOCK_BEST,
                 timeout: float = 900) -> Result:
    """The stock phase's recipe run by stock_script.py, a process that does not import the job, on the same
    model and rows: the job's ratio is taken against the faster of the two stock figures."""
    import subprocess
    import sys

    result = Result("stock script", "stock_script.py: " + recipe.describe(opts.max_length))
    rows_file = root / "rows.jsonl"
    with rows_file.open("w") as out:
        for ids, labels in zip(rows["input_ids"], rows["labels"]):
            out.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    command = [sys.executable, "-P", str(STOCK_SCRIPT), "--model-dir", str(nf4_dir), "--rows", str(rows_file),
               "--max-length", str(opts.max_length), "--warmup", str(opts.warmup), "--steps", str(opts.steps),
               "--batch", str(recipe.batch), "--attn", recipe.attn]
    command += ([] if recipe.liger else ["--no-liger"]) + (["--recompute"] if recipe.recompute else [])
    log(f"stock script: {' '.join(command[2:])}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result.error = f"timed out after {timeout:.0f}s"
        return result
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or [""])[-1]
        result.error = "out of memory" if "out of memory" in done.stderr.lower() else f"exit {done.returncode}: {tail}"
        return result
    figures = json.loads(lines[-1])
    result.ok, result.steps, result.rows_per_step = True, figures["steps"], recipe.rows
    result.tokens_per_s, result.step_s = figures["tokens_per_s"], figures["step_s"]
    result.tokens_per_step = result.tokens_per_s * result.step_s
    result.peak_reserved_gib = figures["peak_reserved_gib"]
    log(f"stock script: {result.tokens_per_s:,.0f} tokens/s, {result.step_s:.3f} s/step")
    return result
