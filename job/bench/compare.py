"""`job bench`: every phase in one process, each memory cap's stock recipes, and the report."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from job.bench.checks import self_check
from job.bench.phase import run_phase
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
    import torch

    if not torch.cuda.is_available():
        from job.errors import ConfigError

        raise ConfigError("job bench needs a CUDA GPU (it times training of a 7-8B model); none is visible")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(opts.workdir or Path(tempfile.gettempdir()) / "job-bench")
    root.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.cuda.get_device_name()
    log(f"device: {device}, {torch.cuda.mem_get_info()[1] / 2**30:.1f} GiB; torch {torch.__version__}")
    checks = self_check()
    log(f"self-check: {checks}")
    _, nf4_dir = build_model(opts.model, root)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(nf4_dir).vocab_size
    rows = make_rows(opts.rows, vocab, opts.max_length)
    lengths = sorted(len(r) for r in rows["input_ids"])
    log(f"data: {len(lengths)} rows, median {lengths[len(lengths) // 2]} tokens, max {lengths[-1]}")
    results = []
    phases = plan_phases(opts)

    def report() -> dict:
        out = {"device": device, "model": opts.model, "max_length": opts.max_length, "warmup_steps": opts.warmup,
               "timed_steps": opts.steps, "torch": torch.__version__, "checks": checks,
               "results": [dataclasses.asdict(r) for r in results], "ratios": ratios(results)}
        if opts.out:  # rewritten after every phase, so a run cut short still leaves its figures
            Path(opts.out).write_text(json.dumps(out, indent=2))
        return out

    for number, phase in enumerate(phases, 1):
        log(f"phase {number}/{len(phases)}: {phase.name}")
        results.append(run_phase(phase, nf4_dir, rows, opts))
        report()
    for cap in opts.memory_caps:
        log(f"memory cap {cap:g} GiB: the job's choice")
        results.append(run_phase(Phase(job_phase_name(cap), "job", cap_gib=cap), nf4_dir, rows, opts))
        report()
        tried = 0
        for recipe in STOCK_UNDER_CAP:
            if recipe.predicted_gib(opts.max_length) > cap or tried >= opts.stock_tries:
                continue
            log(f"memory cap {cap:g} GiB: stock {recipe.describe(opts.max_length)}")
            result = run_phase(Phase(f"stock@{cap:g}GiB", "stock", recipe, cap_gib=cap), nf4_dir, rows, opts)
            results.append(result)
            report()
            tried += result.ok
        if not any(r.ok for r in results if r.cap_gib == cap and r.name.startswith("stock")):
            log(f"memory cap {cap:g} GiB: no stock recipe fits")
        job_rows = next((r.rows_per_step for r in results if r.cap_gib == cap and r.name.startswith("job")), 0)
        if job_rows and not any(r.ok and r.rows_per_step == job_rows for r in results
                                if r.cap_gib == cap and r.name.startswith("stock")):
            for recipe in same_rows_recipes(job_rows):
                if recipe.predicted_gib(opts.max_length) > cap:
                    continue
                log(f"memory cap {cap:g} GiB: stock at the job's {job_rows} rows a step, "
                    f"{recipe.describe(opts.max_length)}")
                result = run_phase(Phase(f"stock@{cap:g}GiB {job_rows} rows", "stock", recipe, cap_gib=cap),
                                   nf4_dir, rows, opts)
                results.append(result)
                report()
                if result.ok:
                    break
    return report()
