"""Out of GPU memory in any stage exits 6 (Kubernetes fails the Job: the same settings would run out again), with a
message naming the stage and the settings that lower its memory.

A CPU run cannot run out of GPU memory, so these tests raise, from inside the stage, what a GPU run raises: torch's
own OutOfMemoryError (the class of PyTorch's CUDA allocator error), or the plain RuntimeError texts that cuBLAS and
cuDNN allocation failures arrive as, wrapped by a library as they are in the field.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from job import checkpoint, cli, errors, launch
from tests.jobtools import REPO, read_summary
from tests.test_launch import FAKE_LAUNCHER

CUDA_REPORT = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.63 GiB of which "
               "1.19 GiB is free. Including non-PyTorch memory, this process has 6.43 GiB memory in use. If reserved "
               "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


@pytest.fixture(autouse=True)
def logging_undone():
    """cli.main sets up logging once per process (handlers on the root logger, bound to this test's stderr); undo
    it, so later tests that run the CLI in-process read their own messages."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()
    cli.setup_logging.done = False


def run_cli(monkeypatch, args, **environ) -> int:
    for key, value in environ.items():
        monkeypatch.setenv(key, str(value))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    return exit_info.value.code


# `job train` as `job run` starts it, its first training step out of GPU memory
TRAINING_OUT_OF_MEMORY = textwrap.dedent(f"""
    import torch
    import job.train

    def training_step(self, *args, **kwargs):
        raise torch.OutOfMemoryError({CUDA_REPORT!r})

    job.train.AtomicCheckpointTrainer.training_step = training_step
    from job.cli import main
    main(["train"])
""")


def test_out_of_memory_in_a_training_process_exits_6_through_the_launcher(monkeypatch, tmp_path, hf_home):
    """`job run` on the tiny model, its training process (real settings, model, data and Trainer) raising torch's
    OutOfMemoryError from the training step, behind a launcher that reports the failure as 1 as accelerate and
    torchrun do: the process's own 6 reaches `job run`'s exit status and summary.json (it was 1: retried)."""
    monkeypatch.setattr(launch, "command", lambda s, t: [sys.executable, "-c", FAKE_LAUNCHER, TRAINING_OUT_OF_MEMORY])
    output = tmp_path / "out"
    assert run_cli(monkeypatch, ["run"], OUTPUT_DIR=output, MAX_STEPS=2) == errors.EXIT_OUT_OF_MEMORY
    summary = read_summary(output)
    assert summary["status"] == "failed" and summary["exit_code"] == errors.EXIT_OUT_OF_MEMORY
    assert summary["error"].startswith("the training stage ran out of GPU memory")
    s = summary["settings"]  # the tiny CPU preset's
    assert (f"lower MICRO_BATCH_SIZE (now {s['micro_batch_size']}; raise GRAD_ACCUM, now {s['grad_accum']}, to keep "
            f"{s['micro_batch_size'] * s['grad_accum']} rows per optimizer step) or MAX_LENGTH (now {s['max_length']})"
            in summary["error"])
    assert "GRADIENT_CHECKPOINTING=true (now auto) or GPU_MEMORY_GIB" in summary["error"]
    rank_log = (output / "logs" / "job-rank0.log").read_text()  # the process's own report: CUDA's words, the advice
    assert "Tried to allocate 2.00 GiB" in rank_log and "lower MICRO_BATCH_SIZE" in rank_log
    assert not checkpoint.is_complete(output / "adapter")


def test_out_of_memory_in_the_merge_names_merge_device_cpu(monkeypatch, tmp_path, caplog, hf_home):
    """`job merge` with MERGE_DEVICE=cuda (the merge does not fall back to the CPU then) out of GPU memory: exit 6,
    and the message says to merge on the CPU. The merge itself is replaced: with no GPU it refuses MERGE_DEVICE=cuda."""
    import job.merge

    def merge_on_a_full_card(s):
        assert s.merge_device == "cuda"
        raise torch.cuda.OutOfMemoryError(CUDA_REPORT)

    monkeypatch.setattr(job.merge, "merge", merge_on_a_full_card)
    code = run_cli(monkeypatch, ["merge"], OUTPUT_DIR=tmp_path / "out", MERGE_DEVICE="cuda")
    assert code == errors.EXIT_OUT_OF_MEMORY
    assert ("the merge stage ran out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
            "capacity of 7.63 GiB of which 1.19 GiB is free): set MERGE_DEVICE=cpu (now cuda)") in caplog.text


def trained_already(output):
    """An OUTPUT_DIR whose training is marked done: `job run` goes from preflight to evaluation."""
    (output / "adapter").mkdir(parents=True)
    (output / "adapter" / checkpoint.COMPLETE).write_text("ok")
    return output


def test_out_of_memory_wrapped_by_a_library_in_evaluation_under_job_run(monkeypatch, tmp_path, hf_home):
    """`job run` with training done (real preflight): evaluation fails with a library's error raised from cuBLAS's
    allocation failure; exit 6 and summary.json name the evaluation's settings."""
    import job.evaluate

    def evaluate_on_a_full_card(s):
        try:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        except RuntimeError as error:
            raise ValueError("generation failed") from error

    monkeypatch.setattr(job.evaluate, "evaluate", evaluate_on_a_full_card)
    output = trained_already(tmp_path / "out")
    assert run_cli(monkeypatch, ["run"], OUTPUT_DIR=output) == errors.EXIT_OUT_OF_MEMORY
    summary = read_summary(output)
    assert summary["status"] == "failed" and summary["exit_code"] == errors.EXIT_OUT_OF_MEMORY
    s = summary["settings"]
    assert summary["error"] == (
        "the evaluation stage ran out of GPU memory (CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
        f"`cublasCreate(handle)`): set GPU_MEMORY_GIB (now {s['gpu_memory_gib']:g}) to what the card holds: under a "
        f"cap the eval loss takes one sequence at a time; lower MAX_NEW_TOKENS (now {s['max_new_tokens']}) for the "
        "prompt test")


def raised(make_error, wrap):
    """The exception that `wrap` raises while make_error() is being handled."""
    try:
        try:
            raise make_error()
        except Exception as inner:
            wrap(inner)
    except Exception as outer:
        return outer
    raise AssertionError("wrap raised nothing")


def cause(inner):
    raise ValueError("a library's error") from inner


def context(inner):
    raise KeyError("raised while handling it")


def hidden(inner):
    raise KeyError("unrelated to it") from None


@pytest.mark.parametrize("make_error, wrap, found", [
    (lambda: RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), cause, True),
    (lambda: RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), context, True),
    (lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), cause, True),
    (lambda: RuntimeError("CUDA error: out of memory"), context, True),  # e.g. a CUDA context on a full card
    (lambda: torch.OutOfMemoryError("any text"), cause, True),
    (lambda: RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), hidden, False),  # `from None`
    (lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory"), cause, False),  # CPU memory: not exit 6
    (lambda: RuntimeError("CUDA error: device-side assert triggered"), cause, False),
], ids=["allocator-cause", "allocator-context", "cudnn", "cuda-context", "torch-class", "from-none", "cpu", "other"])
def test_cuda_out_of_memory_is_recognised_through_the_exception_chain(make_error, wrap, found):
    error = raised(make_error, wrap)
    inner = error.__cause__ or error.__context__
    assert errors.cuda_out_of_memory(error) is (inner if found else None)


def test_recognising_it_does_not_import_torch():
    code = ("import sys; from job import errors; "
            "assert errors.cuda_out_of_memory(RuntimeError('CUDA out of memory')) is not None; "
            "assert errors.cuda_out_of_memory(ValueError('x')) is None; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_a_stop_signal_a_library_wraps_during_evaluation_still_exits_75(monkeypatch, tmp_path, hf_home):
    """CI saw it: SIGUSR1 landed while trl imported its trainer for the evaluation, and trl's lazy import turned the
    job's Preempted into a RuntimeError: `job run` exited 1, not 75, and would not have been requeued."""
    import job.evaluate

    def evaluate_while_stopped(s):
        try:
            raise errors.Preempted("stopped by SIGUSR1 outside training; rerun to finish")
        except errors.Preempted as stop:
            raise RuntimeError("Failed to import trl.trainer.sft_trainer") from stop

    monkeypatch.setattr(job.evaluate, "evaluate", evaluate_while_stopped)
    output = trained_already(tmp_path / "out")
    assert run_cli(monkeypatch, ["run"], OUTPUT_DIR=output) == errors.EXIT_PREEMPTED
    assert read_summary(output)["exit_code"] == errors.EXIT_PREEMPTED
