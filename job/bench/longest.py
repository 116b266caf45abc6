"""`job bench --max-length max`: the longest single sequence that trains one optimizer step, found by trials in
processes of their own (`python -m job.bench.longest trial|search`), each in the job's path (long-context mode
forced on) or the stock recipe."""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from job.bench.workload import build_model, log
from job.speed.modules import hf_model

GiB = 2**30


def _rss_sampler():
    import psutil

    process, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return peak, stop


def trial(model_dir: str, length: int, steps: int, mode: str, liger: bool = True, cap_gib: float = 0.0) -> dict:
    """One process, one model load, `steps` optimizer steps of one `length`-token sequence each.

    mode "long": the job's own path (job.speed's levers + this mode forced on); "stock": TRL with recomputation,
    sdpa, liger when asked, batch 1, packing (padding-free), nothing of the job's.
    """
    from transformers import PrinterCallback

    result = {"length": length, "mode": mode, "steps": steps, "ok": False, "liger": liger, "cap_gib": cap_gib}
    peak_rss, stop = _rss_sampler()
    started = time.time()
    timer = _StepTimes()
    trainer = None
    try:
        with tempfile.TemporaryDirectory() as scratch:
            trainer = _trial_trainer(model_dir, length, steps, mode, liger, cap_gib, scratch, timer, result)
            result["load_s"] = round(time.time() - started, 1)
            trainer.remove_callback(PrinterCallback)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result.update(ok=bool(losses) and all(math.isfinite(x) for x in losses), loss=losses,
                      step_s=[round(x, 2) for x in timer.seconds],
                      tokens_per_s=round(length / timer.seconds[-1], 1) if timer.seconds else None)
        if not result["ok"]:
            result["error"] = f"loss not finite: {losses}"
    except torch.OutOfMemoryError as error:
        result["error"] = "out of memory: " + str(error).splitlines()[0][:200]
    except Exception as error:  # noqa: BLE001 - reported as the trial's result
        import traceback

        traceback.print_exc(file=sys.stderr)
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        stop.set()
        result.update(_memory_used(trainer, peak_rss[0]), wall_s=round(time.time() - started, 1))
    return result


class _StepTimes(TrainerCallback):
    """Each optimizer step's seconds, the GPU synchronized at both ends (one long step: no queue to keep full)."""

    def __init__(self):
        self.marks = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()

    def _mark(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    @property
    def seconds(self) -> list[float]:
        return [end - begin for begin, end in zip(self.marks[0::2], self.marks[1::2])]


def _trial_trainer(model_dir: str, length: int, steps: int, mode: str, liger: bool, cap_gib: float, scratch: str,
                   timer, result: dict):
    """The trial's trainer on `steps` rows of one `length`-token random sequence each."""
    import datasets
    from transformers import AutoConfig, AutoTokenizer

    from job import speed
    from job.bench.recipes import Stock
    from job.bench.workload import job_settings
    from job.trainer import build_trainer, fixed_steps, stock_trainer

    cuda = torch.cuda.is_available()
    cfg = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    vocab = min(cfg.vocab_size, 32000)
    ids = [torch.randint(100, vocab, (length,), generator=generator).tolist() for _ in range(steps)]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    common = fixed_steps(scratch, steps, logging_steps=1)
    if mode == "stock":
        if cap_gib and cuda:
            speed.apply_memory_cap(speed.probe(cap_gib))
        recipe = Stock(attn="sdpa", liger=liger, recompute=True, batch=1)
        return stock_trainer(recipe, model_dir, tokenizer, rows, max_length=length, callbacks=[timer], **common)
    s = job_settings(model_dir, scratch, max_length=length, micro_batch_size=1, grad_accum=1, long_context="on",
                     liger="auto" if liger else "false", gpu_memory_gib=cap_gib)
    levers = speed.setup(s, cfg)
    result["levers"] = {k: v for k, v in levers.summary().items() if k != "why"}
    trainer, installed = build_trainer(s, model_dir, cfg, levers, tokenizer, rows,
                                       stats={"train_tokens": length * steps},
                                       device_map={"": 0} if cuda else None, callbacks=[timer], **common)
    result["long"] = installed["long_context"]
    return trainer


def _memory_used(trainer, peak_rss: int) -> dict:
    """Peak GPU and host memory, and what the long-context mode pinned and moved."""
    used = {"peak_host_gib": round(peak_rss / GiB, 2)}
    if torch.cuda.is_available():
        used.update(peak_gpu_gib=round(torch.cuda.max_memory_allocated() / GiB, 2),
                    peak_gpu_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 2),
                    device=torch.cuda.get_device_name())
    mode = getattr(hf_model(trainer.model), "_longctx", None) if trainer is not None else None
    if mode is not None:
        used.update(pinned_gib=round(mode.store.pinned_bytes / GiB, 2), pin_s=round(mode.store.pin_seconds, 1),
                    offload=dict(mode.store.counters, method=mode.store.pin_method))
    return used


def run_trial(length: int, *, model_dir: str, steps: int = 1, mode: str = "long", liger: bool = True,
              cap_gib: float = 0.0, timeout: float = 600) -> dict:
    """A trial in its own process (an out-of-memory error or a crash leaves the search running)."""
    import subprocess

    command = [sys.executable, "-m", "job.bench.longest", "trial", "--model-dir", model_dir, "--length", str(length),
               "--steps", str(steps), "--mode", mode, "--cap-gib", str(cap_gib)] + ([] if liger else ["--no-liger"])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"length": length, "mode": mode, "ok": False, "error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"length": length, "mode": mode, "ok": False,
            "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"}


def search(try_length, start: int = 65536, limit: int = 2**21, granularity: int = 8192, report=print) -> dict:
    """The longest length that trains: double from `start` until one fails, then bisect to `granularity`.

    `try_length(n) -> dict` with "ok"; every result is passed to `report` as it comes."""
    tried = []

    def attempt(n: int) -> bool:
        result = try_length(n)
        tried.append(result)
        report(result)
        return bool(result.get("ok"))

    good, bad = 0, None
    n = start
    while n <= limit:
        if attempt(n):
            good, n = n, n * 2
        else:
            bad = n
            break
    if good == 0 and bad is not None:  # even the start failed: halve down to something that trains
        n = bad // 2
        while n >= granularity and not attempt(n):
            bad, n = n, n // 2
        good = n if n >= granularity else 0
    while bad is not None and good and bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity
        if mid <= good:
            break
        if attempt(mid):
            good = mid
        else:
            bad = mid
    return {"longest": good, "first_failure": bad, "trials": tried}


def longest_sequence(arch: str, workdir: str = "", caps: tuple = (), out: str = "") -> dict:
    """`job bench --max-length max`: the longest single sequence that trains one full optimizer step with a
    finite loss, in the job's path (long-context mode), uncapped and under each memory cap: doubling from
    65,536 tokens, then bisecting to 8,192, one process per trial ."""
    import torch

    if not torch.cuda.is_available():
        from job.errors import ConfigError

        raise ConfigError("job bench --max-length max needs a CUDA GPU; none is visible")
    root = Path(workdir or Path(tempfile.gettempdir()) / "job-bench")
    root.mkdir(parents=True, exist_ok=True)
    _, nf4_dir = build_model(arch, root)
    torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(), "model": arch, "searches": []}
    for cap in (0.0, *caps):
        found = search(lambda n: run_trial(n, model_dir=str(nf4_dir), cap_gib=cap, timeout=1800),
                               report=lambda r: log(f"cap {cap or 'none'}: {json.dumps(r)}"))
        best = next((t for t in found["trials"] if t.get("ok") and t["length"] == found["longest"]), {})
        report["searches"].append({"cap_gib": cap, "longest": found["longest"],
                                   "first_failure": found["first_failure"], "settings": best.get("long"),
                                   "levers": best.get("levers"), "trials": found["trials"]})
        if out:
            Path(out).write_text(json.dumps(report, indent=2))
    return report


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m job.bench.longest")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("trial", help="train one sequence (one process), print a JSON line")
    one.add_argument("--model-dir", required=True)
    one.add_argument("--length", type=int, required=True)
    one.add_argument("--steps", type=int, default=1)
    one.add_argument("--mode", choices=("long", "stock"), default="long")
    one.add_argument("--no-liger", action="store_true")
    one.add_argument("--cap-gib", type=float, default=0.0)
    many = sub.add_parser("search", help="longest single sequence that trains (one process per trial)")
    many.add_argument("--model-dir", required=True)
    many.add_argument("--start", type=int, default=65536)
    many.add_argument("--limit", type=int, default=2**21)
    many.add_argument("--granularity", type=int, default=8192)
    many.add_argument("--timeout", type=float, default=900)
    many.add_argument("--cap-gib", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.command == "trial":
        result = trial(args.model_dir, args.length, args.steps, args.mode, liger=not args.no_liger,
                       cap_gib=args.cap_gib)
        print(json.dumps(result), flush=True)
        return 0 if result["ok"] else 3
    found = search(lambda n: run_trial(n, model_dir=args.model_dir, cap_gib=args.cap_gib, timeout=args.timeout),
                   args.start, args.limit, args.granularity, report=lambda r: print(json.dumps(r), flush=True))
    print(json.dumps({"longest": found["longest"], "first_failure": found["first_failure"],
                      "settings": next((t.get("long") for t in reversed(found["trials"])
                                        if t.get("ok") and t.get("length") == found["longest"]), None)}), flush=True)
    return 0 if found["longest"] else 3


if __name__ == "__main__":
    sys.exit(main())
