"""One phase of the benchmark: load, train warm-up and timed steps, measure."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from job.bench.recipes import Phase
from job.bench.workload import _params, dataset, job_settings, log


@dataclass
class Result:
    name: str
    recipe: str
    cap_gib: float = 0.0
    ok: bool = False
    error: str | None = None
    tokens_per_s: float = 0.0
    step_s: float = 0.0
    tokens_per_step: float = 0.0
    peak_reserved_gib: float = 0.0
    peak_allocated_gib: float = 0.0
    mfu: float = 0.0
    load_s: float = 0.0
    steps: int = 0
    levers: dict | None = None
    installed: dict | None = None    # what the job's path installed (fused layers, long-context mode)
    rows_per_step: int = 0           # packed rows per optimizer step (batch x accumulation)
    gc_s_per_step: float = 0.0       # host time in Python's garbage collector per timed step
    alloc_retries_per_step: float = 0.0  # the caching allocator freeing its cache to retry (a device sync each)


class _TokenCount:
    """Counts useful tokens per micro-batch without synchronizing: padded batches sum their attention mask on
    the GPU; padding-free rows have no pad at all, so their size is the count."""

    def __init__(self):
        self.masked = None
        self.plain = 0

    def add(self, inputs):
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.masked = mask.sum() if self.masked is None else self.masked + mask.sum()
        else:
            self.plain += inputs["input_ids"].numel()

    def snapshot(self):
        return (self.masked.clone() if self.masked is not None else None, self.plain)

    @staticmethod
    def between(first, last) -> float:
        masked = float(last[0] - first[0]) if last[0] is not None else 0.0
        return masked + (last[1] - first[1])


def _timed_trainer(base_class, counter: _TokenCount):
    class Timed(base_class):
        def training_step(self, model, inputs, *args, **kwargs):
            counter.add(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    return Timed


def _step_timer(warmup: int, counter: _TokenCount):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Marks where the timed steps start (after warm-up) and where they end, the GPU synchronized there only:
        a sync after every step would keep the host from queueing the next step while the GPU finishes this one,
        which training itself does not do."""

        def __init__(self):
            # (optimizer step, time, tokens so far, seconds in Python's garbage collector so far, allocator retries)
            self.marks = []
            self.gc_seconds, self._gc_started = 0.0, 0.0

        def collecting(self, phase, info):  # a gc.callbacks entry
            # a collection stalls the host and so the GPU's queue: long ones would hide behind a tokens/s figure
            if phase == "start":
                self._gc_started = time.perf_counter()
            else:
                self.gc_seconds += time.perf_counter() - self._gc_started

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step not in (warmup, state.max_steps) and not control.should_training_stop:
                return
            retries = 0
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                # near a memory cap the allocator may free its cache and retry, syncing the device each time
                retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            self.marks.append((state.global_step, time.perf_counter(), counter.snapshot(), self.gc_seconds, retries))
            if state.global_step == warmup:
                log(f"  warm-up done ({warmup} steps)")

    return StepTimer()


def _profiler(warmup: int, steps: int = 2):
    """Kernel time against wall time over `steps` steps after warm-up: is the GPU kept busy?"""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof, self.summary = None, {}

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.start()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == warmup + steps:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.started
                self.prof.stop()
                events = self.prof.key_averages()
                kernel = sum(e.self_device_time_total for e in events
                             if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6  # kernels, once each
                self.summary = {"wall_s": round(wall, 3), "kernel_s": round(kernel, 3),
                                "gpu_busy": round(kernel / wall, 3)}
                log(f"  profile over {steps} steps: {self.summary}")
                print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60),
                      file=sys.stderr, flush=True)
                self.prof = None

    return Profile()


@contextlib.contextmanager
def _isolated_patches():
    """Liger patches module globals of transformers' model files (RoPE function, RMSNorm and MLP classes);
    restore them after each phase so that a phase without liger really runs without it."""
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.mistral.modeling_mistral as mistral

    saved = {module: dict(vars(module)) for module in (llama, mistral)}
    try:
        yield
    finally:
        for module, values in saved.items():
            for name, value in values.items():
                if getattr(module, name, None) is not value:
                    setattr(module, name, value)


def run_phase(phase: Phase, nf4_dir: Path, rows, opts) -> Result:
    """Load, train warm-up + timed steps, measure; an out-of-memory error is a result, not a crash."""
    import torch
    from transformers import AutoConfig, PrinterCallback
    from trl import SFTTrainer

    from job.trainer import JobTrainer

    recipe = phase.stock.describe(opts.max_length) if phase.stock else "job defaults"
    result = Result(phase.name, recipe, phase.cap_gib)
    cuda = torch.cuda.is_available()  # CPU only in the tests of this plumbing, on the tiny model
    _start_on_gpu(phase.cap_gib if cuda else None)
    counter = _TokenCount()
    timer = _step_timer(opts.warmup, counter)
    callbacks = [timer] + ([_profiler(opts.warmup)] if phase.profile and cuda else [])
    trainer_class = _timed_trainer(JobTrainer if phase.kind == "job" else SFTTrainer, counter)
    cfg = AutoConfig.from_pretrained(nf4_dir)
    started = time.time()
    trainer = None
    gc.callbacks.append(timer.collecting)
    try:
        with _isolated_patches(), tempfile.TemporaryDirectory() as scratch:
            trainer = _trainer(phase, nf4_dir, cfg, rows, opts, scratch, result, trainer_class, callbacks)
            result.load_s = round(time.time() - started, 1)
            log(f"{phase.name}: model loaded in {result.load_s}s; training {opts.warmup} warm-up + {opts.steps} timed steps")
            trainer.remove_callback(PrinterCallback)  # its log lines would mix into the report on stdout
            trainer.train()
        _measure(result, timer.marks, opts, cfg)
    except Exception as error:  # a broken phase is reported; the others still run  # noqa: BLE001
        _failed(result, error)
    finally:
        gc.callbacks.remove(timer.collecting)
        del trainer
        gc.collect()
        if cuda:
            result.peak_reserved_gib = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            result.peak_allocated_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)
    if result.ok:
        log(f"{phase.name}: {result.tokens_per_s:,.0f} tokens/s, {result.step_s:.3f} s/step, "
            f"{result.tokens_per_step:,.0f} tokens/step, peak {result.peak_reserved_gib} GiB, MFU {result.mfu:.1%}, "
            f"gc {result.gc_s_per_step * 1e3:.0f} ms/step, allocator retries {result.alloc_retries_per_step:g}/step")
    return result


def _start_on_gpu(cap_gib: float | None) -> None:
    """A clean allocator for the phase, capped at `cap_gib` (0: uncapped; None: no GPU)."""
    import torch

    gc.collect()
    if cap_gib is None:
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total) if cap_gib else 1.0)


def _trainer(phase: Phase, nf4_dir: Path, cfg, rows, opts, scratch: str, result: Result, trainer_class, callbacks):
    """The phase's trainer: the job's (its levers planned for this card and cap) or a stock recipe's."""
    import torch
    from transformers import AutoTokenizer

    from job import speed
    from job.speed.planner import StepModel
    from job.trainer import build_trainer, fixed_steps, stock_trainer

    tokenizer = AutoTokenizer.from_pretrained(nf4_dir)
    common = fixed_steps(scratch, opts.warmup + opts.steps, logging_steps=opts.warmup + opts.steps)
    if phase.kind != "job":
        result.rows_per_step = phase.stock.rows
        return stock_trainer(phase.stock, nf4_dir, tokenizer, dataset(rows), max_length=opts.max_length,
                             trainer_class=trainer_class, callbacks=callbacks, **common)
    s = job_settings(nf4_dir, scratch, max_length=opts.max_length, gpu_memory_gib=phase.cap_gib, **phase.overrides)
    levers = speed.plan(s, cfg, step=dataclasses.replace(StepModel(), **phase.step_model))
    result.levers = levers.summary()
    result.rows_per_step = levers.micro_batch_size * levers.grad_accum
    log(f"{phase.name}: levers " + ", ".join(f"{k}={v}" for k, v in result.levers.items()
                                             if k not in ("why", "device", "budget_gib")))
    trainer, result.installed = build_trainer(s, str(nf4_dir), cfg, levers, tokenizer, dataset(rows),
                                              device_map={"": 0} if torch.cuda.is_available() else None,
                                              trainer_class=trainer_class, callbacks=callbacks, **common)
    log(f"{phase.name}: installed {result.installed}")
    return trainer


def _measure(result: Result, marks: list, opts, cfg) -> None:
    """Tokens/s, seconds a step, MFU, collector time and allocator retries between the two timing marks."""
    import torch

    from job import speed

    if len(marks) < 2 or marks[0][0] != opts.warmup:
        raise RuntimeError("training stopped before the timed steps (too few rows?)")
    (s0, t0, n0, gc0, r0), (s1, t1, n1, gc1, r1) = marks[0], marks[-1]
    timed = s1 - s0
    result.gc_s_per_step = round((gc1 - gc0) / timed, 4)
    result.alloc_retries_per_step = round((r1 - r0) / timed, 2)
    tokens = _TokenCount.between(n0, n1)
    seconds = t1 - t0
    result.ok, result.steps = True, timed
    result.tokens_per_s = tokens / seconds
    result.step_s = seconds / timed
    result.tokens_per_step = tokens / timed
    peak = speed.peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else 0.0
    result.mfu = 4 * _params(cfg) * result.tokens_per_s / (peak * 1e12) if peak else 0.0


def _failed(result: Result, error: Exception) -> None:
    if "out of memory" in str(error).lower():  # torch.OutOfMemoryError, or a kernel's own wording of it
        result.error = "out of memory"
        log(f"{result.name}: out of memory ({str(error).splitlines()[0][:160]})")
        return
    import traceback

    traceback.print_exc(file=sys.stderr)
    result.error = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    log(f"{result.name}: failed: {result.error}")
