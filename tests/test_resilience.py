"""Preemption and crashes: kill -9 at random points, SIGTERM mid-step, a truncated checkpoint.

The reference is an uninterrupted run with the same settings; interrupted runs must end with the
same number of optimizer steps, follow the same per-step losses and reach the same eval loss.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from job import checkpoint
from job.checkpoint import Layout
from job.errors import EXIT_PREEMPTED
from tests.jobtools import (
    REPO,
    STEP_LINE,
    TRAINED,
    copy_output,
    job_env,
    read_summary,
    run_job,
    start_job,
    wait_for_step,
)

pytestmark = pytest.mark.slow

STEPS = 24
SETTINGS = dict(MAX_STEPS=STEPS, SAVE_STEPS=3, EVAL_STEPS=STEPS, LOGGING_STEPS=1, SAVE_TOTAL_LIMIT=2)


def losses(output) -> dict[int, float]:
    history = checkpoint.read_json(Layout(output).metrics / "train.json")["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def final_eval_loss(output) -> float:
    history = checkpoint.read_json(Layout(output).metrics / "train.json")["log_history"]
    return [h["eval_loss"] for h in history if "eval_loss" in h][-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hf_home):
    output = tmp_path_factory.mktemp("reference")
    result = run_job(hf_home, "train", OUTPUT_DIR=output, **SETTINGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def start(hf_home, command, output, log_path, **extra):
    return start_job(hf_home, command, log_path, OUTPUT_DIR=output, **{**SETTINGS, **extra})


@pytest.mark.nightly  # minutes; test_ownership and test_sealing show a kill -9 and a damaged checkpoint each once
def test_kill_9_five_times_then_finish_like_an_uninterrupted_run(tmp_path, hf_home, reference):
    seed = int(os.environ.get("KILL_SEED", random.randrange(10**6)))
    print(f"KILL_SEED={seed}")  # rerun with this to reproduce the kill points
    rng = random.Random(seed)
    output, log_path = tmp_path / "out", tmp_path / "train.log"
    kills, lost = 0, []
    while kills < 5:
        resumed_from = checkpoint.latest_checkpoint(Layout(output).checkpoints)
        process = start(hf_home, "train", output, log_path)
        # a point in loading, stepping or saving: up to 8 steps past where this attempt starts
        first = (checkpoint.step_of(resumed_from) if resumed_from else 0) + 1
        target = min(STEPS - 1, first + rng.randint(0, 7))
        wait_for_step(log_path, target, process)
        time.sleep(rng.uniform(0, 0.6))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        reached = max(int(m.group(1)) for m in STEP_LINE.finditer(log_path.read_text(errors="replace")))
        kept = checkpoint.latest_checkpoint(Layout(output).checkpoints)
        lost.append(reached - (checkpoint.step_of(kept) if kept else 0))
    process = start(hf_home, "train", output, log_path)
    assert process.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    print(f"steps lost per kill: {lost}")
    assert all(0 <= n <= 3 for n in lost), lost  # SAVE_STEPS=3: never more than one save interval

    ours, theirs = losses(output), losses(reference)
    assert sorted(ours) == list(range(1, STEPS + 1)) == sorted(theirs)
    print(f"largest per-step loss gap: {max(abs(ours[k] - theirs[k]) for k in ours):.5f}")
    for step in ours:  # resumed RNG and data order; only float summation order differs
        assert ours[step] == pytest.approx(theirs[step], rel=1e-2), step
    assert final_eval_loss(output) == pytest.approx(final_eval_loss(reference), rel=1e-2)


def test_sigterm_checkpoints_exits_75_and_resume_skips_a_truncated_checkpoint(tmp_path, hf_home, reference):
    output, log_path = tmp_path / "out", tmp_path / "run.log"
    process = start(hf_home, "run", output, log_path, SAVE_STEPS=1000)  # no periodic save: the signal must save
    wait_for_step(log_path, 5, process)
    process.send_signal(signal.SIGTERM)  # to `job run`, which forwards it to training
    assert process.wait(timeout=120) == EXIT_PREEMPTED, log_path.read_text()[-3000:]
    saved = checkpoint.latest_checkpoint(Layout(output).checkpoints)
    assert saved is not None and checkpoint.step_of(saved) >= 5
    summary = read_summary(output)
    assert summary["status"] == "preempted" and summary["exit_code"] == EXIT_PREEMPTED

    # a later checkpoint cut off mid-write (no COMPLETE marker, truncated weights) must be ignored
    broken = saved.with_name(f"checkpoint-{checkpoint.step_of(saved) + 1}")
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes((saved / "adapter_model.safetensors").read_bytes()[:100])
    result = run_job(hf_home, "train", OUTPUT_DIR=output, **{**SETTINGS, "SAVE_STEPS": 1000})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {saved.name}" in result.stderr
    assert losses(output).keys() == losses(reference).keys()
    assert final_eval_loss(output) == pytest.approx(final_eval_loss(reference), rel=1e-2)


def test_a_stop_signal_while_evaluating_or_merging_exits_75_and_the_rerun_finishes(tmp_path, hf_home, trained_output):
    """SIGUSR1 (Slurm's warning before the time limit) after training, while `job run` evaluates or merges: exit
    75 (requeue), not death by the signal (it was: -10); the rerun finishes without training."""
    output, log_path = copy_output(trained_output, tmp_path / "out"), tmp_path / "run.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "job", "run"], cwd=REPO, stdout=log, stderr=log,
                                   env=job_env(hf_home, OUTPUT_DIR=output, **TRAINED), start_new_session=True)
    deadline = time.time() + 300
    while not (output / "summary.json").exists() or read_summary(output)["status"] not in ("evaluating", "merging"):
        assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=120) == EXIT_PREEMPTED, log_path.read_text()[-3000:]
    summary = read_summary(output)
    assert summary["status"] == "preempted" and "SIGUSR1" in summary["error"]
    result = run_job(hf_home, "run", OUTPUT_DIR=output, **TRAINED)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_summary(output)["status"] == "done" and checkpoint.is_complete(Layout(output).merged)
    assert "starting" not in result.stderr and "resuming" not in result.stderr  # training was not run again
