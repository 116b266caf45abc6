"""`sbatch slurm/train.sbatch` on a real Slurm (tests/cluster/slurm.py: slurmctld, two slurmd in two
network namespaces), training the tiny default model on CPU.

* one node, two training processes; `scontrol requeue` mid-run: the job checkpoints (SIGTERM), Slurm
  starts it again, it resumes from the newest checkpoint and finishes with the full step count;
* two nodes (`sbatch -N 2`), one process each, meeting on the first node; the time-limit signal
  (`--signal=B:USR1@...`, sent here by hand) makes both nodes checkpoint and exit 75, and the script
  requeues itself; the second run resumes and finishes. Only the first node evaluates and merges.
* the requeue rule: one node's failure fails the job with its code even though the other node's 75 is
  what srun reports; requeues that write no newer checkpoint stop after REQUEUES_WITHOUT_PROGRESS.

Run: scripts/slurm-deps.sh && .venv/bin/python -m pytest tests/cluster/test_slurm_job.py -q
Needs root (network namespaces); skipped otherwise.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from job.launch import expand_hostlist  # noqa: E402
from slurm import missing_requirements, slurm_cluster  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm" / "train.sbatch"
# CPU nodes: no GPU to ask for, and the harness nodes have 2 CPUs each
CPU_ONLY = ["--gpus-per-node=0", "--cpus-per-task=2"]
# the tiny default, kept short; one thread per process: the harness's nodes share this machine's cores
TINY = {"OMP_NUM_THREADS": "1", "MAX_STEPS": "12", "SAVE_STEPS": "2", "LOGGING_STEPS": "2", "MAX_LENGTH": "128",
        "MICRO_BATCH_SIZE": "4", "EVAL_STEPS": "1000", "REPORT_TO": "none", "SAMPLE_PROMPTS": "1",
        "MAX_NEW_TOKENS": "8"}

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
_why = missing_requirements()
if _why:
    pytestmark.append(pytest.mark.skip(reason=f"slurm harness: {_why}"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2) as c:
        yield c


def _submit(cluster, tmp_path: pathlib.Path, nodes: int, settings: dict) -> int:
    """sbatch slurm/train.sbatch on `nodes` nodes with `settings` as its env file; its output in tmp_path."""
    env_file = tmp_path / "job.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    return cluster.sbatch(SBATCH, ["-N", str(nodes), *CPU_ONLY, "-o", str(tmp_path / "slurm-%j.out")],
                          env={"JOB_ENV": str(env_file)})


def _runner(tmp_path: pathlib.Path, script: str) -> pathlib.Path:
    """A JOB_VENV whose bin/job is `script` (bash): what a node runs in place of the installed job."""
    job = tmp_path / "venv" / "bin" / "job"
    job.parent.mkdir(parents=True)
    job.write_text("#!/bin/bash\n" + script)
    job.chmod(0o755)
    return job.parent.parent


def _wait_for(predicate, timeout: float, what: str, cluster=None, job=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if cluster is not None and cluster.state(job) not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout}s" + (f"\n{cluster.diagnostics()}" if cluster else ""))


def _logs(output: pathlib.Path) -> str:
    return "\n".join(f"=== {p.name}\n{p.read_text(errors='replace')}" for p in sorted((output / "logs").glob("*")))


def _check_finished(output: pathlib.Path, max_steps: int) -> dict:
    train = json.loads((output / "metrics" / "train.json").read_text())
    assert train["steps"] == max_steps, train
    assert (output / "adapter" / "COMPLETE").is_file() and (output / "merged" / "COMPLETE").is_file()
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "done" and summary["exit_code"] == 0, summary
    return train


@pytest.mark.nightly  # the two-node test below shows the requeue and resume; this one an administrator's requeue
def test_one_node_two_processes_requeued_mid_run_resumes(cluster, tmp_path, hf_home, tiny_model):
    output = tmp_path / "out"
    job = _submit(cluster, tmp_path, 1, {"OUTPUT_DIR": output, "HF_HOME": hf_home, "NUM_PROCESSES": 2, **TINY})
    _wait_for(lambda: (output / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file(), 240, "first checkpoint",
              cluster, job)
    cluster.requeue(job)
    result = cluster.wait(job, timeout=300)
    text = (tmp_path / f"slurm-{job}.out").read_text() + _logs(output)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 1), text
    _check_finished(output, 12)
    resumed = [int(n) for n in re.findall(r"resuming from checkpoint-(\d+)", text)]
    assert resumed and 2 <= resumed[0] < 12, text
    assert "--nproc-per-node 2" in text and "[rank 1]" in text, text  # two training processes
    # the first run's training processes got the stop signal and checkpointed where they were
    assert "stopping after this optimizer step to write a checkpoint" in text, text
    for node_log in ("slurm-%d-node0.out" % job, "job-rank0.log", "job-rank1.log"):
        assert (output / "logs" / node_log).is_file(), sorted(p.name for p in (output / "logs").iterdir())


def test_two_nodes_time_limit_signal_checkpoints_requeues_and_resumes(cluster, tmp_path, hf_home, tiny_model):
    output = tmp_path / "out"
    job = _submit(cluster, tmp_path, 2, {"OUTPUT_DIR": output, "HF_HOME": hf_home, **TINY})
    _wait_for(lambda: (output / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file(), 240, "first checkpoint",
              cluster, job)
    cluster.scancel(job, signal="USR1", batch=True)  # what --signal=B:USR1@300 does before the time limit
    result = cluster.wait(job, timeout=300)
    text = (tmp_path / f"slurm-{job}.out").read_text() + _logs(output)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 1), text
    _check_finished(output, 12)

    first, second = cluster.node_names
    assert f"rendezvous {first}" in text, text
    assert "time limit near: asking the job to checkpoint" in text and "requeueing job" in text, text
    # both machines trained in one world: machine 1 of 2 only trains, machine 0 also merges
    assert "--nnodes 2 --node-rank 0" in text and "--nnodes 2 --node-rank 1" in text, text
    assert "machine 1 of 2: training only" in text, text
    assert (output / "logs" / f"job-{first}.log").is_file() and (output / "logs" / f"job-{second}.log").is_file()
    assert "merged model saved" in (output / "logs" / f"job-{first}.log").read_text()
    assert "merged model saved" not in (output / "logs" / f"job-{second}.log").read_text()
    # the signal stopped training between checkpoints: a checkpoint was written where it stopped
    stopped = [int(n) for n in re.findall(r"stopped by a signal at step (\d+)", text)]
    resumed = [int(n) for n in re.findall(r"resuming from checkpoint-(\d+)", text)]
    assert stopped and resumed and resumed[0] == stopped[0], text


def test_first_host_matches_scontrol(cluster):
    for nodelist in ("n[01-03,7]", "gpu7,cpu[9-11]", "a1", "x[098-101],y"):
        expected = cluster.scontrol("show", "hostnames", nodelist).split()
        assert list(expand_hostlist(nodelist)) == expected, nodelist


@pytest.mark.nightly  # tests/test_elastic.py shows the same resume on processes, in make test
def test_a_two_node_run_cancelled_resumes_on_one_node_with_the_same_global_batch(cluster, tmp_path, hf_home,
                                                                                  tiny_model):
    """A job that comes back on fewer nodes (a node drained; `sbatch -N 1-2` given one): GLOBAL_BATCH_SIZE keeps the
    rows per optimizer step, so the one node accumulates twice as many micro-batches and ends at the same step."""
    output = tmp_path / "out"
    settings = {"OUTPUT_DIR": output, "HF_HOME": hf_home, "GLOBAL_BATCH_SIZE": 8, **TINY}
    first = _submit(cluster, tmp_path, 2, settings)
    _wait_for(lambda: (output / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file(), 240, "first checkpoint",
              cluster, first)
    cluster.scancel(first)  # SIGTERM everywhere: the job checkpoints and stops; the script does not requeue
    stopped = cluster.wait(first, timeout=300)
    text = (tmp_path / f"slurm-{first}.out").read_text() + _logs(output)
    assert stopped.state == "CANCELLED" and "--nnodes 2" in text, text
    assert "requeueing" not in text, text

    second = _submit(cluster, tmp_path, 1, settings)
    result = cluster.wait(second, timeout=300)
    text = (tmp_path / f"slurm-{second}.out").read_text() + _logs(output)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), text
    train = _check_finished(output, 12)
    assert "the same global batch, so the resume lands at the same data position" in text, text
    assert re.search(r"resuming from checkpoint-\d+", text), text
    assert train["batch"]["global_batch_size"] == 8 and train["batch"]["grad_accum"] == 2, train["batch"]


def test_a_node_that_fails_fails_the_job_instead_of_requeueing_it(cluster, tmp_path, hf_home, tiny_model):
    """Node 1's `job run` fails (it refuses its settings, exit 2) while node 0 waits for it at the rendezvous: srun
    stops node 0, whose job exits 75, and srun reports the highest code, 75. The script must not requeue on that
    echo (which would meet the same failure again, forever) but fail the job with node 1's code."""
    output = tmp_path / "out"
    node0_log = output / "logs" / f"job-{cluster.node_names[0]}.log"
    venv = _runner(tmp_path, f"""if [[ $SLURM_NODEID == 1 ]]; then
    until grep -qs "machine 0 of 2" {node0_log}; do sleep 0.2; done
    export LEARNING_RATE=fast
fi
exec {ROOT / ".venv" / "bin" / "job"} "$@"
""")
    job = _submit(cluster, tmp_path, 2, {"OUTPUT_DIR": output, "HF_HOME": hf_home, "JOB_VENV": venv, **TINY})
    try:
        result = cluster.wait(job, timeout=240)
    finally:
        cluster.scancel(job)
    text = (tmp_path / f"slurm-{job}.out").read_text() + _logs(output)
    assert (result.state, result.exit_code, result.restarts) == ("FAILED", 2, 0), text
    assert "LEARNING_RATE" in text and "requeueing" not in text, text
    assert "node 0: job run exited 75" in text and "node 1: job run exited 2" in text, text
    # each node's own log ends with its code
    node1 = (output / "logs" / f"slurm-{job}-node1.out").read_text().strip().splitlines()
    assert node1[-1].startswith("train.sbatch: node 1 (") and node1[-1].endswith("job run exited 2"), node1


def test_requeues_that_make_no_progress_stop_at_requeues_without_progress(cluster, tmp_path):
    """Every node asks for a requeue (75) each time but no checkpoint is ever written (the runner here only exits
    75: the rule under test is the script's): after REQUEUES_WITHOUT_PROGRESS requeues it stops."""
    output = tmp_path / "out"
    venv = _runner(tmp_path, "exit 75\n")
    job = _submit(cluster, tmp_path, 2, {"OUTPUT_DIR": output, "JOB_VENV": venv, "REQUEUES_WITHOUT_PROGRESS": 1})
    try:
        result = cluster.wait(job, timeout=120)
    finally:
        cluster.scancel(job)
    text = (tmp_path / f"slurm-{job}.out").read_text()
    assert (result.state, result.exit_code, result.restarts) == ("FAILED", 75, 1), text
    assert "no newer checkpoint this time (1 of REQUEUES_WITHOUT_PROGRESS=1)" in text, text
    assert "2 runs in a row ended without a newer checkpoint or stage; not requeueing again" in text, text
