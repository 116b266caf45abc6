"""One owner per OUTPUT_DIR: a second job there is refused, and killing `job run` stops its training too.

Real processes and signals: the lock is an flock the kernel drops when its holders die, and the training child is
tied to `job run` by PR_SET_PDEATHSIG, which only a real SIGKILL shows.
"""

import os
import signal
import time

import psutil
import pytest

from job import checkpoint
from job.checkpoint import Layout
from job.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED
from tests.jobtools import run_job, start_job, wait_for_step

pytestmark = pytest.mark.slow

SETTINGS = dict(MAX_STEPS=200, SAVE_STEPS=1000, EVAL_STEPS=1000, LOGGING_STEPS=1)


def test_a_second_job_on_the_same_output_dir_waits_then_is_refused_naming_the_holder(tmp_path, hf_home):
    output, log_path = tmp_path / "out", tmp_path / "first.log"
    first = start_job(hf_home, "run", log_path, OUTPUT_DIR=output, **SETTINGS)
    try:
        wait_for_step(log_path, 2, first)
        started = time.monotonic()
        second = run_job(hf_home, "train", OUTPUT_DIR=output, JOB_LOCK_WAIT="3", **SETTINGS)
        assert second.returncode == EXIT_BAD_INPUT, second.stderr[-3000:]
        assert time.monotonic() - started >= 3  # it waited for the holder to stop
        assert f"OUTPUT_DIR={output} is in use by another job" in second.stderr
        assert f"pid {first.pid}" in second.stderr  # the holder is named
        assert "starting" not in second.stderr  # it trained nothing
        assert first.poll() is None  # and the owner trains on

        # stopped while waiting (a preempted pod, a cancelled requeue): exit 75, as before any stage
        waiter_log = tmp_path / "waiter.log"
        waiter = start_job(hf_home, "run", waiter_log, OUTPUT_DIR=output, JOB_LOCK_WAIT="120", **SETTINGS)
        deadline = time.monotonic() + 60
        while "is in use by another job" not in waiter_log.read_text():
            assert waiter.poll() is None and time.monotonic() < deadline, waiter_log.read_text()[-3000:]
            time.sleep(0.1)
        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(timeout=30) == EXIT_PREEMPTED, waiter_log.read_text()[-3000:]
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == EXIT_PREEMPTED, log_path.read_text()[-3000:]


def test_kill_9_of_job_run_stops_its_training_and_the_rerun_resumes_after_it(tmp_path, hf_home):
    output, log_path, settings = tmp_path / "out", tmp_path / "run.log", {**SETTINGS, "MAX_STEPS": 40}
    parent = start_job(hf_home, "run", log_path, OUTPUT_DIR=output, **settings)
    wait_for_step(log_path, 3, parent)
    # (the other child, if any, is the forkserver that started the tokenizing workers)
    (trainer,) = [p for p in psutil.Process(parent.pid).children() if "train" in p.cmdline()]
    os.kill(parent.pid, signal.SIGKILL)  # `job run` only: its child is in another session
    parent.wait()
    # the orphan is told to stop (SIGTERM), writes a checkpoint and exits, instead of training on to step 40
    trainer.wait(timeout=120)
    saved = checkpoint.latest_checkpoint(Layout(output).checkpoints)
    assert saved is not None and 3 <= checkpoint.step_of(saved) < 40, log_path.read_text()[-3000:]
    assert "received SIGTERM" in log_path.read_text()

    rerun = run_job(hf_home, "train", OUTPUT_DIR=output, **settings)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {saved.name}" in rerun.stderr
