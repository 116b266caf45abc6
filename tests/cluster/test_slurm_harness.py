"""Checks of the local Slurm test harness (tests/cluster/slurm.py).

Run: scripts/slurm-deps.sh && .venv/bin/python -m pytest tests/cluster -q -x
Needs root (network namespaces); skipped otherwise.
"""

from __future__ import annotations

import os
import pathlib
import sys
import textwrap
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from slurm import missing_requirements, slurm_cluster  # noqa: E402

pytestmark = pytest.mark.slurm

_why = missing_requirements()
if _why:
    pytestmark = [pytest.mark.slurm, pytest.mark.skip(reason=f"slurm harness: {_why}")]

# An interpreter that exists on every "node" (shared filesystem).
PY = sys.executable if os.access(sys.executable, os.X_OK) else "/usr/bin/python3"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2) as c:
        yield c


def _script(path: pathlib.Path, body: str) -> pathlib.Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def test_single_node_exit_code_and_env(cluster, tmp_path):
    out = tmp_path / "out.txt"
    s = _script(
        tmp_path / "job.sh",
        """
        echo "host=$(hostname) nodeid=$SLURM_NODEID nnodes=$SLURM_JOB_NUM_NODES my=$MY_VAR"
        exit 7
        """,
    )
    job = cluster.sbatch(s, ["-N", "1", "-n", "1", "-o", str(out)], env={"MY_VAR": "hello world"})
    res = cluster.wait(job, timeout=30)
    assert res.state == "FAILED", res.info
    assert res.exit_code == 7 and res.signal == 0
    text = out.read_text()
    assert "nodeid=0 nnodes=1 my=hello world" in text, text
    assert text.split("host=")[1].split()[0] in cluster.node_names
    # Also in the job-completion log (works after slurmctld has purged the job).
    rec = cluster.jobcomp_records(job)[-1]
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "7:0"

    ok = _script(tmp_path / "ok.sh", "true\n")
    res = cluster.wait(cluster.sbatch(ok, ["-o", "/dev/null"]), timeout=30)
    assert (res.state, res.exit_code) == ("COMPLETED", 0)


def test_two_nodes_one_task_each_tcp_between_nodes(cluster, tmp_path):
    port = 29517
    task = tmp_path / "task.py"
    task.write_text(
        textwrap.dedent(
            f"""
            import os, socket, sys, time
            nodeid = int(os.environ["SLURM_NODEID"])
            host = socket.gethostname()
            first = os.environ["FIRST_NODE"]
            print(f"task host={{host}} nodeid={{nodeid}} procid={{os.environ['SLURM_PROCID']}} "
                  f"slurmd={{os.environ['SLURMD_NODENAME']}}", flush=True)
            if nodeid == 0:
                srv = socket.create_server(("0.0.0.0", {port}))
                srv.settimeout(30)
                conn, addr = srv.accept()
                data = conn.recv(100).decode()
                print(f"server got {{data!r}} from {{addr[0]}}", flush=True)
                conn.sendall(b"pong")
            else:
                addr = socket.gethostbyname(first)
                deadline = time.time() + 30
                while True:
                    try:
                        c = socket.create_connection((addr, {port}), timeout=5)
                        break
                    except OSError:
                        if time.time() > deadline:
                            raise
                        time.sleep(0.2)
                c.sendall(f"ping from {{host}}".encode())
                print(f"client got {{c.recv(100).decode()!r}} from {{addr}}", flush=True)
            """
        )
    )
    out = tmp_path / "out.txt"
    s = _script(
        tmp_path / "job.sh",
        f"""
        export FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
        srun --ntasks-per-node=1 --kill-on-bad-exit=1 {PY} -u {task}
        """,
    )
    job = cluster.sbatch(s, ["-N", "2", "--ntasks-per-node=1", "-o", str(out), "--time=2"])
    res = cluster.wait(job, timeout=60)
    text = out.read_text()
    assert (res.state, res.exit_code) == ("COMPLETED", 0), text
    n1, n2 = cluster.node_names
    a1, a2 = cluster.node_addrs
    assert f"task host={n1} nodeid=0 procid=0 slurmd={n1}" in text, text
    assert f"task host={n2} nodeid=1 procid=1 slurmd={n2}" in text, text
    assert f"server got 'ping from {n2}' from {a2}" in text, text
    assert f"client got 'pong' from {a1}" in text, text


def test_requeue_running_job_runs_again(cluster, tmp_path):
    log = tmp_path / "runs.txt"
    s = _script(
        tmp_path / "job.sh",
        f"""
        echo "start restart_count=${{SLURM_RESTART_COUNT:-0}} host=$(hostname)" >> {log}
        if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 120; fi
        echo "done restart_count=${{SLURM_RESTART_COUNT:-0}}" >> {log}
        """,
    )
    job = cluster.sbatch(s, ["--requeue", "-o", str(tmp_path / "out.%j")])
    cluster.wait_state(job, "RUNNING", timeout=30)
    _wait_for(lambda: log.exists() and "start restart_count=0" in log.read_text(), 20, "first run")
    cluster.requeue(job)
    res = cluster.wait(job, timeout=60)
    lines = log.read_text().splitlines()
    assert (res.state, res.exit_code) == ("COMPLETED", 0), lines
    assert res.restarts == 1, res.info
    assert [line.split(" host=")[0] for line in lines] == [
        "start restart_count=0",
        "start restart_count=1",
        "done restart_count=1",
    ], lines


def test_scancel_signal_reaches_step_and_batch(cluster, tmp_path):
    marks = tmp_path / "marks.txt"
    step = tmp_path / "step.py"
    step.write_text(
        textwrap.dedent(
            f"""
            import signal, sys, time
            def on_usr1(signum, frame):
                open({str(marks)!r}, "a").write("step got USR1\\n")
                sys.exit(0)
            signal.signal(signal.SIGUSR1, on_usr1)
            open({str(marks)!r}, "a").write("step ready\\n")
            time.sleep(60)
            sys.exit(5)
            """
        )
    )
    s = _script(
        tmp_path / "job.sh",
        f"""
        trap 'echo "batch got USR1" >> {marks}' USR1
        srun -n1 {PY} -u {step} &
        wait $!          # returns early when the trap fires
        wait $!          # the step itself
        echo "step rc=$?" >> {marks}
        """,
    )
    job = cluster.sbatch(s, ["-n", "1", "-o", str(tmp_path / "out.%j")])
    _wait_for(lambda: marks.exists() and "step ready" in marks.read_text(), 30, "step start")
    cluster.scancel(job, signal="USR1")  # steps only (22.05 default)
    _wait_for(lambda: "step got USR1" in marks.read_text(), 15, "USR1 in step")
    res = cluster.wait(job, timeout=30)
    assert (res.state, res.exit_code) == ("COMPLETED", 0), marks.read_text()
    text = marks.read_text()
    assert "step rc=0" in text and "batch got USR1" not in text, text

    # --batch: the batch shell only.
    marks2 = tmp_path / "marks2.txt"
    s2 = _script(
        tmp_path / "job2.sh",
        f"""
        trap 'echo "batch got USR1" >> {marks2}; exit 0' USR1
        echo ready >> {marks2}
        for i in $(seq 600); do sleep 0.1; done
        exit 9
        """,
    )
    job2 = cluster.sbatch(s2, ["-n", "1", "-o", "/dev/null"])
    _wait_for(lambda: marks2.exists() and "ready" in marks2.read_text(), 30, "batch start")
    cluster.scancel(job2, signal="USR1", batch=True)
    res2 = cluster.wait(job2, timeout=30)
    assert (res2.state, res2.exit_code) == ("COMPLETED", 0), marks2.read_text()
    assert "batch got USR1" in marks2.read_text()


def test_signal_before_time_limit(cluster, tmp_path):
    """--signal=B:USR1@N reaches the batch shell, --signal=USR1@N the job's steps.

    slurmctld tests time limits only every 30 s (hard-coded PERIODIC_TIMEOUT), so with
    --time=1 and N=60 the signal comes at the first such check after the start: 0-30 s.
    Both jobs run at the same time so the test waits for one check only."""
    marks_b = tmp_path / "batch.txt"
    s_b = _script(
        tmp_path / "batch.sh",
        f"""
        trap 'echo "batch got USR1 after $SECONDS s" >> {marks_b}; exit 0' USR1
        echo ready >> {marks_b}
        for i in $(seq 900); do sleep 0.1; done
        exit 9
        """,
    )
    marks_s = tmp_path / "step.txt"
    step = tmp_path / "step.py"
    step.write_text(
        textwrap.dedent(
            f"""
            import signal, sys, time
            t0 = time.time()
            def on_usr1(signum, frame):
                open({str(marks_s)!r}, "a").write(f"step got USR1 after {{time.time() - t0:.0f}} s\\n")
                sys.exit(0)
            signal.signal(signal.SIGUSR1, on_usr1)
            time.sleep(90)
            sys.exit(5)
            """
        )
    )
    s_s = _script(tmp_path / "steps.sh", f"srun -n1 {PY} -u {step}\n")
    job_b = cluster.sbatch(s_b, ["-n", "1", "--time=1", "--signal=B:USR1@60", "-o", "/dev/null"])
    job_s = cluster.sbatch(s_s, ["-n", "1", "--time=1", "--signal=USR1@60", "-o", "/dev/null"])
    res_b = cluster.wait(job_b, timeout=75)
    res_s = cluster.wait(job_s, timeout=30)
    text_b, text_s = marks_b.read_text(), marks_s.read_text() if marks_s.exists() else ""
    assert (res_b.state, res_b.exit_code) == ("COMPLETED", 0), text_b
    assert "batch got USR1" in text_b, text_b
    assert (res_s.state, res_s.exit_code) == ("COMPLETED", 0), (res_s, text_s)
    assert "step got USR1" in text_s, text_s
