"""`job bench`: useful tokens per second of the job's training path against stock recipes, on one GPU.

It builds a random-init model of a real architecture (Llama-3-8B by default, or Mistral-7B) and saves it to local
disk, quantizes it once the way the job loads it (NF4, double quantization, bf16 compute) and keeps that copy, and
generates instruction-like rows (lognormal lengths, median ~300 tokens, at most MAX_LENGTH, loss on the answer).
Then, in this one process, each phase loads the quantized model, trains a few warm-up steps and times the next ones:

    job        the job's own path with its defaults: levers chosen by job.speed for this card and memory
    tutorial   what the tutorials do: pad every row to MAX_LENGTH, batch 4, recomputation on, sdpa
    stock      the best stock TRL settings measured here: packing (padding-free), flex_attention, liger,
               no recomputation, batch 4

Each phase reports useful (non-pad) tokens/s, seconds per optimizer step, peak GPU memory (reserved by PyTorch's
allocator; the CUDA context is not counted), and MFU against the card's dense bf16 peak at 4 x parameters FLOP a
useful token (forward, backward into the activations; no weight gradients for frozen weights; recomputation not
counted). `--memory-cap 8,16,24` repeats the comparison as on smaller cards: the allocator is capped, the job plans
within the cap, and stock is the fastest of its recipes that runs under the same cap. Progress goes to stderr, the
table (or `--json`) to stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ARCHITECTURES = {
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                   "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False},
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                   "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "sliding_window": None},
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ recipes

@dataclass(frozen=True)
class Stock:
    """A stock TRL recipe: the knobs the tutorials and TRL's docs turn, nothing of the job's own."""
    packing: bool = True
    attn: str = "flex_attention"
    liger: bool = True
    recompute: bool = False
    batch: int = 4
    pad_to_max: bool = False
    accum: int = 1                    # gradient accumulation steps: rows per optimizer step = batch x accum

    @property
    def rows(self) -> int:
        return self.batch * self.accum

    def describe(self, max_length: int) -> str:
        data = "packing (padding-free)" if self.packing else (
            f"padded to {max_length}" if self.pad_to_max else "dynamic padding")
        parts = [data, self.attn, "liger" if self.liger else "", "recompute" if self.recompute else "no recompute",
                 f"batch {self.batch}" + (f"x{self.accum}" if self.accum > 1 else "")]
        return ", ".join(p for p in parts if p)

    def predicted_gib(self, max_length: int) -> float:
        """Peak reserved memory as measured on an H100 (Llama-3-8B shape, this bench): 58.0 GiB at 4 packed rows
        without recomputation, 18.8 at 1; with recomputation 14.2 GiB at 8 rows, 10.1 at 4, 7.9 at 2, 6.9 at 1."""
        per_token = (58.0 - 5.85) / 8192 if not self.recompute else (14.2 - 5.85) / 16384
        return 5.85 + self.batch * max_length * per_token


TUTORIAL = Stock(packing=False, attn="sdpa", liger=False, recompute=True, batch=4, pad_to_max=True)
STOCK_BEST = Stock()
# Stock recipes for a memory cap, fastest first as measured on an H100 (docs/performance.md: recomputation with a
# large batch beats no recomputation with a small one); the bench runs the first `stock_tries` that are predicted to
# fit (and any further one when those run out of memory) and keeps the fastest.
STOCK_UNDER_CAP = (Stock(batch=4), Stock(batch=2), Stock(recompute=True, batch=8), Stock(recompute=True, batch=4),
                   Stock(recompute=True, batch=2), Stock(batch=1), Stock(recompute=True, batch=1))


def same_rows_recipes(rows: int) -> tuple:
    """Stock recipes that train what the job trains (`rows` packed rows per optimizer step), fastest first: the
    fastest stock recipe under a cap may take more rows a step than the job's settings, which is other training."""
    return tuple(Stock(recompute=True, batch=b, accum=rows // b) for b in range(rows, 0, -1) if rows % b == 0)


@dataclass
class Phase:
    name: str
    kind: str                                  # "job" or "stock"
    stock: Stock | None = None
    overrides: dict = field(default_factory=dict)   # job settings (field names) on top of the defaults
    cap_gib: float = 0.0
    profile: bool = False                      # profile two steps after warm-up (their timing is then not clean)
    step_model: dict = field(default_factory=dict)  # job.speed's step-model constants the plan is made with


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


# ---------------------------------------------------------------------------------------------- data

def make_rows(count: int, vocab: int, max_length: int, seed: int = 0, median: int = 300, sigma: float = 0.8):
    """Instruction-like rows: lognormal total length (median `median`), a prompt of 30-70% of it that is not
    trained on, random token ids (the model is random too; only the shapes matter)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(median), sigma, count)), 16, max_length).astype(int)
    rows = {"input_ids": [], "labels": []}
    low, high = min(1000, vocab // 4), max(vocab - 1000, vocab // 2)
    for length in lengths:
        ids = rng.integers(low, high, int(length)).tolist()
        prompt = int(length * rng.uniform(0.3, 0.7))
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * prompt + ids[prompt:])
    return rows


def dataset(rows):
    import datasets

    return datasets.Dataset.from_dict(rows)


# --------------------------------------------------------------------------------------------- model

def build_model(arch: str, root: Path) -> tuple[Path, Path]:
    """The architecture with random weights saved in bf16 (as a hub checkpoint would be), and the NF4 copy the
    job's loader makes of it, saved once so that every phase loads the same quantized weights quickly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from job import config as job_config
    from job import model as job_model

    bf16_dir, nf4_dir = root / arch, root / f"{arch}-nf4"
    if not (bf16_dir / "config.json").is_file():
        started = time.time()
        spec = dict(ARCHITECTURES[arch])
        cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        with torch.device("cuda"):
            lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        lm.save_pretrained(bf16_dir)
        _save_tokenizer(bf16_dir)
        del lm
        torch.cuda.empty_cache()
        log(f"built random-init {arch} ({_params(cfg) / 1e9:.2f}B parameters) in {time.time() - started:.0f}s: {bf16_dir}")
    if not (nf4_dir / "config.json").is_file():
        started = time.time()
        s = job_config.load({"base_model": str(bf16_dir), "output_dir": str(root / "out")}, environ={})
        lm = job_model.load_model(s, str(bf16_dir), device_map={"": 0})
        log(f"loaded and quantized it the job's way (NF4, double quant, bf16 compute) in {time.time() - started:.0f}s")
        lm.save_pretrained(nf4_dir)
        _save_tokenizer(nf4_dir)
        del lm
        torch.cuda.empty_cache()
    os.sync()  # the ~22 GB just written is flushed now, not by the kernel's writeback while phases are timed
    return bf16_dir, nf4_dir


def _save_tokenizer(target: Path) -> None:
    """The bench feeds token ids directly; SFTTrainer still wants a tokenizer for its pad token."""
    from transformers import AutoTokenizer

    from job.model import build_tiny

    AutoTokenizer.from_pretrained(build_tiny()).save_pretrained(target)


def _params(cfg) -> int:
    from job.speed import Shape

    return Shape.of(cfg).params


# ------------------------------------------------------------------------------------------ a phase

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


def _sft_common(out: Path, steps: int) -> dict:
    """The SFTConfig fields every phase shares: a fixed number of constant-rate steps, nothing saved."""
    return dict(output_dir=str(out), max_steps=steps, learning_rate=2e-4, lr_scheduler_type="constant",
                warmup_steps=0, logging_steps=steps, save_strategy="no", eval_strategy="no", report_to="none",
                disable_tqdm=True, seed=42, data_seed=42)


def run_phase(phase: Phase, nf4_dir: Path, rows, opts) -> Result:
    """Load, train warm-up + timed steps, measure; an out-of-memory error is a result, not a crash."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from job import config as job_config
    from job import model as job_model
    from job import speed
    from job.train import JobTrainer, build_trainer

    recipe = phase.stock.describe(opts.max_length) if phase.stock else "job defaults"
    result = Result(phase.name, recipe, phase.cap_gib)
    steps = opts.warmup + opts.steps
    trainer = base = None
    cuda = torch.cuda.is_available()  # CPU only in the tests of this plumbing, on the tiny model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, phase.cap_gib * 2**30 / total) if phase.cap_gib else 1.0)
    counter = _TokenCount()
    timer = _step_timer(opts.warmup, counter)
    callbacks = [timer] + ([_profiler(opts.warmup)] if phase.profile and cuda else [])
    trainer_class = _timed_trainer(JobTrainer if phase.kind == "job" else SFTTrainer, counter)
    cfg = AutoConfig.from_pretrained(nf4_dir)
    tokenizer = AutoTokenizer.from_pretrained(nf4_dir)
    started = time.time()
    gc.callbacks.append(timer.collecting)
    try:
        with _isolated_patches(), tempfile.TemporaryDirectory() as scratch:
            common = _sft_common(Path(scratch), steps)
            if phase.kind == "job":
                flags = {"base_model": str(nf4_dir), "output_dir": scratch, "max_length": opts.max_length,
                         "gpu_memory_gib": phase.cap_gib, **phase.overrides}
                s = job_config.load(flags, environ={k: v for k, v in os.environ.items()
                                                    if k in {job_config.env_name(f) for f in job_config.FIELDS.values()
                                                             if f.metadata["group"] in ("speed", "model")}})
                saved = {name: getattr(speed, name) for name in phase.step_model}
                vars(speed).update(phase.step_model)
                try:
                    levers = speed.plan(s, cfg)
                finally:
                    vars(speed).update(saved)
                result.levers = levers.summary()
                result.rows_per_step = levers.micro_batch_size * levers.grad_accum
                log(f"{phase.name}: levers " + ", ".join(f"{k}={v}" for k, v in result.levers.items()
                                                         if k not in ("why", "device", "budget_gib")))
                trainer, result.installed = build_trainer(s, str(nf4_dir), cfg, levers, tokenizer, dataset(rows),
                                                          device_map={"": 0} if cuda else None,
                                                          trainer_class=trainer_class, callbacks=callbacks, **common)
                log(f"{phase.name}: installed {result.installed}")
            else:
                stock = phase.stock
                result.rows_per_step = stock.rows
                s = job_config.load({"base_model": str(nf4_dir), "output_dir": scratch}, environ={})
                base = AutoModelForCausalLM.from_pretrained(
                    nf4_dir, dtype=torch.bfloat16, quantization_config=job_model.quantization_config(s),
                    device_map={"": 0} if cuda else None, attn_implementation=stock.attn)
                args = SFTConfig(**common, max_length=opts.max_length, bf16=cuda, use_cpu=not cuda,
                                 dataset_num_proc=None, packing=stock.packing,
                                 padding_free=stock.packing, per_device_train_batch_size=stock.batch,
                                 gradient_accumulation_steps=stock.accum,
                                 activation_checkpointing=stock.recompute,
                                 activation_checkpointing_kwargs={"use_reentrant": False} if stock.recompute else None,
                                 use_liger_kernel=stock.liger,
                                 pad_to_multiple_of=opts.max_length if stock.pad_to_max else None)
                trainer = trainer_class(model=base, args=args, train_dataset=dataset(rows),
                                        processing_class=tokenizer, peft_config=job_model.lora_config(s, base),
                                        callbacks=callbacks)
            result.load_s = round(time.time() - started, 1)
            log(f"{phase.name}: model loaded in {result.load_s}s; training {opts.warmup} warm-up + {opts.steps} timed steps")
            trainer.remove_callback(PrinterCallback)  # its log lines would mix into the report on stdout
            trainer.train()
        marks = timer.marks
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
        peak = speed.peak_tflops(torch.cuda.get_device_name()) if cuda else 0.0
        result.mfu = 4 * _params(cfg) * result.tokens_per_s / (peak * 1e12) if peak else 0.0
    except torch.OutOfMemoryError as error:
        result.error = "out of memory"
        log(f"{phase.name}: out of memory ({str(error).splitlines()[0][:160]})")
    except Exception as error:  # a broken phase is reported; the others still run  # noqa: BLE001
        if "out of memory" in str(error).lower():
            result.error = "out of memory"
        else:
            import traceback

            traceback.print_exc(file=sys.stderr)
            result.error = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        log(f"{phase.name}: failed: {result.error}")
    finally:
        gc.callbacks.remove(timer.collecting)
        del trainer, base
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


# --------------------------------------------------------------------------------------- checks, report

def self_check() -> dict:
    """On the GPU: the varlen kernel against sdpa one sample at a time (bf16), before anything is timed."""
    import torch

    from job import speed

    if not speed.varlen_available():
        return {"varlen": "not available in this torch"}
    torch.manual_seed(0)
    errors = []
    for lengths in ([300, 17, 1024, 5, 700], [2048]):  # packed samples (flash varlen), one sample (cuDNN)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        q = torch.randn(sum(lengths), 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(sum(lengths), 8, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        fast = speed._varlen(q, k, v, cu, max(lengths), 128**-0.5)
        ref = speed._varlen_reference(q.float(), k.float(), v.float(), cu, 128**-0.5)
        errors.append(((fast.float() - ref).norm() / ref.norm()).item())
    error = max(errors)
    if not error < 2e-2:
        raise RuntimeError(f"varlen attention disagrees with per-sample sdpa: relative errors {errors}")
    out = {"varlen_vs_per_sample_sdpa_rel_error": round(error, 5)}
    out.update(lora_kernel_check())
    out.update(nf4_kernel_check())
    return out


def lora_kernel_check(m: int = 3000, k: int = 4096, n: int = 1024, r: int = 16, p: float = 0.05) -> dict:
    """The fused LoRA layer with its Triton dropout (bf16, GPU) against float32 torch with the same mask."""
    import torch

    from job import speed

    if not speed.HAVE_TRITON:
        return {"lora_kernel": "Triton not available"}

    class Base(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight, self.bias = weight, None

    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    base = Base(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    a = (torch.randn(r, k, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    b = (torch.randn(n, r, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    torch.manual_seed(7)
    y = speed._LoraLinear.apply(x, a, b, base, 2.0, p)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    mask = speed.keep_mask(m, k, seed, p, "cuda")
    xf, af, bf = (t.detach().float().requires_grad_() for t in (x, a, b))
    ref = xf @ base.weight.float().t() + 2.0 * ((xf * mask / (1 - p)) @ af.t()) @ bf.t()
    ref.backward(g.float())
    errors = {name: ((got.float() - want).norm() / want.norm()).item()
              for name, got, want in (("y", y, ref), ("grad_x", x.grad, xf.grad), ("grad_a", a.grad, af.grad),
                                      ("grad_b", b.grad, bf.grad))}
    if not all(e < 2e-2 for e in errors.values()):
        raise RuntimeError(f"fused LoRA layer disagrees with float32 torch: {errors}")
    return {f"lora_kernel_{k}_rel_error": round(v, 5) for k, v in errors.items()}


def nf4_kernel_check(calls: int = 300) -> dict:
    """The one-launch NF4 dequantization against bitsandbytes' (double-quantized scales, bf16) on a layer-sized
    weight, and the host time per call of each on a small one (launches queued back to back, the GPU idle)."""
    import bitsandbytes.functional as bnbf
    import torch

    from job import speed

    if not speed.HAVE_TRITON:
        return {"nf4_kernel": "Triton not available"}
    torch.manual_seed(0)
    out = {}
    for label, shape in (("layer", (14336, 4096)), ("small", (256, 256))):
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        data, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        if not speed.nf4_kernel_supports(data, state):
            raise RuntimeError("the NF4 kernel does not take bitsandbytes' own double-quantized NF4 state")
        want, got = bnbf.dequantize_4bit(data, state), speed.nf4_dequantize(data, state)
        differ = (want != got).float().mean().item()
        error = ((want.float() - got.float()).abs().max() / want.float().abs().max()).item()
        if not error < 2**-7:  # at most a rounding step of bf16 apart (the scale's multiply-add may fuse)
            raise RuntimeError(f"NF4 kernel disagrees with bitsandbytes on a {shape} weight: max error {error}")
        out[f"nf4_kernel_{label}_values_differing"] = round(differ, 6)
        for name, dequantize in (("bitsandbytes", bnbf.dequantize_4bit), ("triton", speed.nf4_dequantize)):
            torch.cuda.synchronize()
            if label == "small":  # the GPU keeps up: the loop's time is the host's
                started = time.perf_counter()
                for _ in range(calls):
                    dequantize(data, state)
                out[f"nf4_host_us_{name}"] = round((time.perf_counter() - started) / calls * 1e6, 1)
            else:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(20):
                    dequantize(data, state)
                end.record()
                torch.cuda.synchronize()
                out[f"nf4_gpu_us_{name}"] = round(begin.elapsed_time(end) / 20 * 1e3, 1)
    return out


def job_phase_name(cap: float) -> str:
    return f"job@{cap:g}GiB"


def ratios(results: list[Result]) -> dict:
    by = {r.name: r for r in results if r.ok and not r.cap_gib}
    out = {}
    if "job" in by and "tutorial" in by:
        out["job/tutorial"] = round(by["job"].tokens_per_s / by["tutorial"].tokens_per_s, 2)
    if "job" in by and "stock" in by:
        out["job/stock"] = round(by["job"].tokens_per_s / by["stock"].tokens_per_s, 2)
    for cap in sorted({r.cap_gib for r in results if r.cap_gib}):
        job = next((r for r in results if r.name == job_phase_name(cap) and r.ok), None)  # not a variant
        stock = max((r for r in results if r.cap_gib == cap and r.name.startswith("stock") and r.ok),
                    key=lambda r: r.tokens_per_s, default=None)
        key = f"cap {cap:g} GiB job/best stock"
        if job and stock:
            out[key] = round(job.tokens_per_s / stock.tokens_per_s, 2)
        elif job:
            out[key] = "no stock recipe fits"
        same = max((r for r in results if r.cap_gib == cap and r.name.startswith("stock") and r.ok and job
                    and r.rows_per_step == job.rows_per_step), key=lambda r: r.tokens_per_s, default=None)
        if job and same:
            out[f"cap {cap:g} GiB job/stock at {job.rows_per_step} rows a step"] = round(
                job.tokens_per_s / same.tokens_per_s, 2)
    return out


def table(results: list[Result]) -> str:
    head = f"{'phase':<22} {'recipe':<58} {'tokens/s':>9} {'s/step':>7} {'peak GiB':>9} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        recipe = r.recipe if r.levers is None else _describe_levers(r.levers)
        if r.ok:
            lines.append(f"{r.name:<22} {recipe[:58]:<58} {r.tokens_per_s:>9,.0f} {r.step_s:>7.3f} "
                         f"{r.peak_reserved_gib:>9.1f} {r.mfu:>6.1%}")
        else:
            lines.append(f"{r.name:<22} {recipe[:58]:<58} {r.error or 'failed':>34}")
    return "\n".join(lines)


def _describe_levers(levers: dict) -> str:
    parts = [levers["attn_implementation"], "liger" if levers["liger"] else "",
             "fused LoRA" if levers["lora_kernel"] else "", "NF4 kernel" if levers.get("nf4_kernel") else "",
             "bf16 weight cache" if levers["dequant_cache"] else "",
             {"none": "no recompute", "full": "recompute all", "offload": "recompute+offload",
              "partial": f"recompute {levers['checkpoint_layers']} layers"}[levers["checkpointing"]],
             f"{levers['offloaded_layers']} layers' activations on CPU" if levers.get("offloaded_layers") else "",
             f"batch {levers['micro_batch_size']}x{levers['grad_accum']}",
             ("embeddings on CPU" if levers.get("offload_head") else "input embedding on CPU")
             if levers["offload_embeddings"] else ""]
    return "job: " + ", ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------- main

# Each lever of the job's path changed on its own, for docs/performance.md (`--levers`), beside the job's phase it
# changes: uncapped when that phase is timed, and under each cap timed for the levers only a capped plan uses.
LEVER_VARIANTS = (
    ("job attn=flex", {"attn_implementation": "flex_attention"}),
    ("job attn=sdpa", {"attn_implementation": "sdpa"}),
    ("job -fused LoRA", {"lora_kernel": "false"}),
    ("job -weight cache", {"dequant_cache": "false"}),
    ("job -liger", {"liger": "false"}),
    ("job recompute all", {"gradient_checkpointing": "true"}),
    ("job 0 workers", {"dataloader_workers": "0"}),
    ("job dropout 0", {"lora_dropout": "0"}),            # changes the recipe: for information
    ("job micro 1x4", {"micro_batch_size": "1", "grad_accum": "4"}),
)
CAPPED_LEVER_VARIANTS = (
    (24, "-layer offload", {"offload_layers": "0"}),
    (16, "-layer offload", {"offload_layers": "0"}),
    (16, "-NF4 kernel", {"nf4_kernel": "false"}),
    (8, "-NF4 kernel", {"nf4_kernel": "false"}),
    (8, "input embedding on GPU", {"offload_embeddings": "false"}),
    (8, "checkpoints on GPU", {"gradient_checkpointing": "true"}),
)


def lever_variants(phases: tuple, caps: tuple) -> tuple:
    capped = tuple((f"{cap}GiB {name}", {"gpu_memory_gib": str(cap), **overrides})
                   for cap, name, overrides in CAPPED_LEVER_VARIANTS if cap in caps)
    return (LEVER_VARIANTS if "job" in phases else ()) + capped


@dataclass
class Options:
    model: str = "llama-3-8b"
    max_length: int = 2048
    warmup: int = 3
    steps: int = 8
    rows: int = 3000
    memory_caps: tuple = ()
    phases: tuple = ("tutorial", "stock", "job")
    variants: tuple = ()             # (name, {setting: value}) job phases with levers forced
    stock_tries: int = 2             # stock recipes timed per memory cap (the fastest that fits wins)
    workdir: str = ""
    as_json: bool = False
    out: str = ""


# job.speed's step-model constants a --variant may change ('speed.CPU_TOKENS=6000'): the plan an older fit chose,
# timed beside today's
STEP_MODEL = ("CPU_TOKENS", "RECOMPUTE_GPU", "RECOMPUTE_CPU", "OFFLOAD_COST", "HEAD_STREAM_TOKENS",
              "INPUT_GATHER_TOKENS")


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:KEY=VALUE,KEY=VALUE' (keys as environment variables or field names, or speed.CONSTANT of STEP_MODEL)
    -> (name, {field or speed.CONSTANT: value})."""
    from job import config as job_config

    name, _, body = text.partition(":")
    overrides = {}
    by_env = {job_config.env_name(f): f.name for f in job_config.FIELDS.values()}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key.startswith("speed."):
            if key.removeprefix("speed.") not in STEP_MODEL:
                raise ValueError(f"--variant {text!r}: {key!r} is not one of speed.{', speed.'.join(STEP_MODEL)}")
            overrides[key] = float(value)
            continue
        field_name = by_env.get(key, key.lower())
        if field_name not in job_config.FIELDS:
            raise ValueError(f"--variant {text!r}: unknown setting {key!r}")
        overrides[field_name] = value
    return name.strip(), overrides


def plan_phases(opts: Options) -> list[Phase]:
    phases = []
    for name in opts.phases:
        if name == "tutorial":
            phases.append(Phase("tutorial", "stock", TUTORIAL))
        elif name == "stock":
            phases.append(Phase("stock", "stock", STOCK_BEST))
        elif name == "job":
            phases.append(Phase("job", "job"))
        else:
            raise ValueError(f"unknown phase {name!r}: use tutorial, stock, job")
    for name, overrides in opts.variants:
        step_model = {k.removeprefix("speed."): v for k, v in overrides.items() if k.startswith("speed.")}
        settings = {k: v for k, v in overrides.items() if not k.startswith("speed.")}
        phases.append(Phase(name, "job", overrides=settings, profile="profile" in name,
                            cap_gib=float(settings.get("gpu_memory_gib", 0)), step_model=step_model))
    return phases


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


def render(report: dict) -> str:
    results = [Result(**r) for r in report["results"]]
    lines = [f"{report['model']} QLoRA (NF4 + bf16, LoRA r=16 all-linear), max length {report['max_length']}, "
             f"{report['device']}; {report['timed_steps']} timed steps after {report['warmup_steps']} warm-up",
             table(results), ""]
    lines += [f"{k}: {v}x" if isinstance(v, float) else f"{k}: {v}" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def longest_sequence(arch: str, workdir: str = "", caps: tuple = (), out: str = "") -> dict:
    """`job bench --max-length max`: the longest single sequence that trains one full optimizer step with a
    finite loss, in the job's path (long-context mode), uncapped and under each memory cap: doubling from
    65,536 tokens, then bisecting to 8,192, one process per trial (job/longctx.py)."""
    import torch

    from job import longctx

    if not torch.cuda.is_available():
        from job.errors import ConfigError

        raise ConfigError("job bench --max-length max needs a CUDA GPU; none is visible")
    root = Path(workdir or Path(tempfile.gettempdir()) / "job-bench")
    root.mkdir(parents=True, exist_ok=True)
    _, nf4_dir = build_model(arch, root)
    torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(), "model": arch, "searches": []}
    for cap in (0.0, *caps):
        found = longctx.search(lambda n: longctx.run_trial(n, model_dir=str(nf4_dir), cap_gib=cap, timeout=1800),
                               report=lambda r: log(f"cap {cap or 'none'}: {json.dumps(r)}"))
        best = next((t for t in found["trials"] if t.get("ok") and t["length"] == found["longest"]), {})
        report["searches"].append({"cap_gib": cap, "longest": found["longest"],
                                   "first_failure": found["first_failure"], "settings": best.get("long"),
                                   "levers": best.get("levers"), "trials": found["trials"]})
        if out:
            Path(out).write_text(json.dumps(report, indent=2))
    return report
