"""A throw-away multi-node Slurm cluster on one machine, for tests.

Layout:

* a Linux bridge in the root network namespace, holding the controller address
  (``10.77.X.1/24``, X random per run);
* one network namespace per node, joined to the bridge by a veth pair
  (``10.77.X.11``, ``10.77.X.12``, ...);
* a private ``munged`` (own key, own socket under ``/run/slurm-harness/<rid>``);
* ``slurmctld`` in the root namespace (``SlurmctldHost=<hostname>(10.77.X.1)``);
* one ``slurmd -D -N <node>`` per node, started as
  ``nsenter --net=/var/run/netns/<ns> unshare --mount --uts -- python tests/node_init.py ...``
  (tests/netns.py's node_argv; node_init.py: a child subreaper that reaps the daemonized slurmstepds) so that it
  (and every job step it starts) sees

  - the node's network namespace (its own address, reaches the others over the bridge),
  - its own hostname (``hostname`` / ``socket.gethostname()`` == node name),
  - a private ``/etc/hosts`` (bind-mounted from the workdir) resolving every node name
    and the controller -- the machine's real ``/etc/hosts`` is never edited unless
    ``root_hosts=True`` is asked for;

  while the filesystem (repo, ``.venv``, workdir) is shared with the host.

Everything (config, state, spool, logs, job-completion log) lives in ``workdir``.
Teardown kills exactly what was started: every process inside the run's network
namespaces (slurmd, slurmstepd, job processes), then slurmctld and munged by pid,
then deletes the namespaces, veths and the bridge. A manifest under
``/run/slurm-harness/<rid>/`` lets a later run clean up after a run that was SIGKILLed
(``cleanup_stale()``, called automatically on entry).

Needs root and ``scripts/slurm-deps.sh`` (slurm-wlm 22.05, munge, iproute2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal as _signal
import socket
import string
import subprocess
import threading
import time
from typing import Iterator

from tests.netns import (
    HarnessError,
    add_netns,
    add_veth,
    del_netns,
    kill_netns_processes,
    node_argv,
    pick_subnet,
    set_address,
    write_hosts,
)
from tests.netns import alive as _alive
from tests.netns import reap as _reap
from tests.netns import run as _run
from tests.netns import start_time as _proc_start_time

RUNTIME_ROOT = pathlib.Path("/run/slurm-harness")
HOSTS_MARK = "# slurm-harness"

# Base job states (first word of JobState) after which a job will not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "SPECIAL_EXIT",
    }
)

REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged", "mungekey", "ip", "nsenter", "unshare")


class SlurmHarnessError(HarnessError):
    pass


def missing_requirements() -> str | None:
    """Why a cluster cannot be started here (None if it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridge, slurmd/slurmctld as root)"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing {', '.join(missing)}: run scripts/slurm-deps.sh"
    return None


# --------------------------------------------------------------------------- helpers


def _kill_pid(pid: int, start_time: int | None, term_timeout: float = 5.0) -> None:
    """SIGTERM, wait up to term_timeout, SIGKILL; then wait until the pid is gone (reaped
    by us if it is our child, else by init). Only if pid still is the process we started."""
    if not _alive(pid, start_time):
        return
    for sig, wait_s in ((_signal.SIGTERM, term_timeout), (_signal.SIGKILL, 5.0)):
        if not _is_zombie(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not _alive(pid, start_time):
                return
            if _is_zombie(pid) and sig == _signal.SIGTERM:
                break  # dead; go on to wait for the reaper below
            time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _parse_kv_line(line: str) -> dict[str, str]:
    """Parse `scontrol -o` / jobcomp filetxt lines: space separated Key=Value (values may hold spaces)."""
    out: dict[str, str] = {}
    key = None
    for tok in line.strip().split(" "):
        m = re.match(r"^([A-Za-z][A-Za-z0-9_:/]*)=(.*)$", tok)
        if m:
            key = m.group(1)
            out[key] = m.group(2)
        elif key is not None:
            out[key] += " " + tok
    return out


def _tail(path: pathlib.Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no file)"
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class JobResult:
    job_id: int
    state: str  # base state, e.g. COMPLETED / FAILED / CANCELLED / TIMEOUT
    exit_code: int  # from ExitCode=<code>:<signal>
    signal: int  # the <signal> half of ExitCode (0 if none)
    restarts: int  # Restarts= (number of requeues), -1 if unknown (jobcomp only)
    info: dict  # the raw scontrol (or jobcomp) record


@dataclasses.dataclass
class _Proc:
    name: str
    pid: int
    start_time: int | None
    popen: subprocess.Popen | None = None


# --------------------------------------------------------------------------- cluster


class SlurmCluster:
    """Handle returned by :func:`slurm_cluster`. All methods are bounded in time."""

    def __init__(self, workdir: pathlib.Path, nodes: int, cpus_per_node: int, root_hosts: bool, cred_expire: int = 5):
        if not 1 <= nodes <= 50:
            raise ValueError("nodes must be in 1..50")
        self.workdir = workdir.resolve()
        self.nnodes = nodes
        self.cpus_per_node = cpus_per_node
        self.root_hosts = root_hosts
        self.cred_expire = cred_expire

        self.rid = "".join(random.choices(string.ascii_lowercase, k=4))
        self.runtime_dir = RUNTIME_ROOT / self.rid
        self.cluster_name = f"t{self.rid}"
        net = pick_subnet()
        hosts = list(net.hosts())
        self.subnet = net
        self.controller_addr = str(hosts[0])  # .1
        self.controller_host = socket.gethostname().split(".")[0]
        self.node_names = [f"s{self.rid}n{i}" for i in range(1, nodes + 1)]
        self.node_addrs = [str(hosts[10 + i - 1]) for i in range(1, nodes + 1)]  # .11, .12, ...
        self.netns_names = [f"slurm-{self.rid}-n{i}" for i in range(1, nodes + 1)]
        self.bridge = f"sbr-{self.rid}"  # <= 15 chars
        self._veth_host = [f"sv-{self.rid}-{i}" for i in range(1, nodes + 1)]
        self._veth_peer = [f"sp-{self.rid}-{i}" for i in range(1, nodes + 1)]

        self.conf_path = self.workdir / "slurm.conf"
        self.hosts_path = self.workdir / "hosts"
        self.log_dir = self.workdir / "log"
        self.jobcomp_path = self.workdir / "jobcomp.txt"
        self.munge_socket = self.runtime_dir / "munge.socket"
        self.slurmctld_port = 0
        self.slurmd_port = 0
        self.logs: dict[str, pathlib.Path] = {
            "slurmctld": self.log_dir / "slurmctld.log",
            "munged": self.log_dir / "munged.log",
            **{n: self.log_dir / f"slurmd.{n}.log" for n in self.node_names},
        }

        self._procs: list[_Proc] = []
        self._made_netns: list[str] = []
        self._made_links: list[str] = []
        self._root_hosts_lines: list[str] = []

    # ---------------------------------------------------------------- public API

    @property
    def env(self) -> dict[str, str]:
        """Environment to run Slurm client commands against this cluster."""
        return {"SLURM_CONF": str(self.conf_path)}

    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        e = dict(os.environ)
        # Never inherit an outer allocation's variables into our submissions.
        for k in list(e):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
                del e[k]
        e.update(self.env)
        if extra:
            e.update({k: str(v) for k, v in extra.items()})
        return e

    def sbatch(
        self,
        script_path: str | os.PathLike,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        timeout: float = 30,
    ) -> int:
        """Submit a batch script; returns the job id.

        `args` are sbatch options (e.g. ["-N", "2", "-o", "out.%j"]); arguments for the
        script itself go after a "--" element (["-N2", "--", "arg1"]).
        `env` is added to this process's environment (minus any outer SLURM_*/SBATCH_*
        variables) and exported to the job (`--export=ALL` is always passed), so it
        reaches the batch script and, through srun, every step on every node.
        Runs in `cwd` (default: the cluster workdir; default output file slurm-<id>.out).
        """
        args = list(args or [])
        script_args: list[str] = []
        if "--" in args:
            i = args.index("--")
            args, script_args = args[:i], args[i + 1 :]
        argv = ["sbatch", "--parsable", "--export=ALL", *args, str(script_path), *script_args]
        p = _run(argv, timeout=timeout, env=self.client_env(env), cwd=str(cwd or self.workdir))
        return int(p.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str] | None:
        """`scontrol show job` as a dict, or None if slurmctld no longer knows the job."""
        p = _run(["scontrol", "-o", "show", "job", str(job_id)], check=False, timeout=15, env=self.client_env())
        if p.returncode != 0 or not p.stdout.strip():
            if "Invalid job id" in p.stderr:
                return None
            raise SlurmHarnessError(f"scontrol show job {job_id}: {p.stderr.strip()}")
        return _parse_kv_line(p.stdout.splitlines()[0])

    def state(self, job_id: int) -> str:
        """Base job state (PENDING, RUNNING, COMPLETING, COMPLETED, ...); from the
        job-completion log if slurmctld has purged the job; "UNKNOWN" otherwise."""
        info = self.job_info(job_id)
        if info is not None:
            return info.get("JobState", "UNKNOWN").split()[0]
        recs = self.jobcomp_records(job_id)
        return recs[-1].get("JobState", "UNKNOWN") if recs else "UNKNOWN"

    def wait_state(self, job_id: int, states: set[str] | frozenset[str] | str, timeout: float = 60) -> str:
        """Wait until the job's state is one of `states`; returns it. Raises on timeout."""
        if isinstance(states, str):
            states = {states}
        deadline = time.monotonic() + timeout
        st = "UNKNOWN"
        while time.monotonic() < deadline:
            st = self.state(job_id)
            if st in states:
                return st
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s (last {st})\n{self.diagnostics()}")

    def wait(self, job_id: int, timeout: float = 60) -> JobResult:
        """Wait until the job has finished (terminal state and no longer COMPLETING)."""
        deadline = time.monotonic() + timeout
        last = "UNKNOWN"
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info is not None:
                last = info.get("JobState", "UNKNOWN").split()[0]
                if last in TERMINAL_STATES:
                    code, sig = (info.get("ExitCode", "0:0").split(":") + ["0"])[:2]
                    return JobResult(job_id, last, int(code), int(sig), int(info.get("Restarts", "0")), info)
            else:
                recs = self.jobcomp_records(job_id)
                if recs:
                    r = recs[-1]
                    code, sig = (r.get("ExitCode", "0:0").split(":") + ["0"])[:2]
                    return JobResult(job_id, r.get("JobState", "UNKNOWN"), int(code), int(sig), -1, r)
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s (last {last})\n{self.diagnostics()}")

    def requeue(self, job_id: int) -> None:
        _run(["scontrol", "requeue", str(job_id)], timeout=15, env=self.client_env())

    def scancel(self, job_id: int, signal: str | int | None = None, batch: bool = False, full: bool = False) -> None:
        """scancel; with `signal`, Slurm 22.05 sends it to the job's steps only by default,
        to the batch shell only with batch=True, to both with full=True."""
        argv = ["scancel"]
        if signal is not None:
            argv.append(f"--signal={signal}")
        if batch:
            argv.append("--batch")
        if full:
            argv.append("--full")
        argv.append(str(job_id))
        _run(argv, timeout=15, env=self.client_env())

    def scontrol(self, *args: str, timeout: float = 15) -> str:
        return _run(["scontrol", *args], timeout=timeout, env=self.client_env()).stdout

    def jobcomp_records(self, job_id: int | None = None) -> list[dict[str, str]]:
        """Records of the job-completion log (jobcomp/filetxt), oldest first."""
        try:
            text = self.jobcomp_path.read_text(errors="replace")
        except OSError:
            return []
        recs = [_parse_kv_line(line) for line in text.splitlines() if line.strip()]
        if job_id is not None:
            recs = [r for r in recs if r.get("JobId") == str(job_id)]
        return recs

    def node_exec(self, node: int | str, argv: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a command inside a node's network namespace (not as a Slurm job)."""
        i = self.node_names.index(node) if isinstance(node, str) else node
        return _run(["nsenter", f"--net=/var/run/netns/{self.netns_names[i]}", "--", *argv], timeout=timeout, **kw)

    def diagnostics(self, n: int = 30) -> str:
        parts = []
        with contextlib.suppress(Exception):
            parts.append(
                "squeue:\n" + _run(["squeue", "-a"], check=False, timeout=10, env=self.client_env()).stdout
            )
        with contextlib.suppress(Exception):
            parts.append(
                "sinfo:\n" + _run(["sinfo", "-N", "-l"], check=False, timeout=10, env=self.client_env()).stdout
            )
        for name, path in self.logs.items():
            parts.append(f"--- {name} ({path}) ---\n{_tail(path, n)}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- setup

    def _manifest(self) -> dict:
        return {
            "owner_pid": os.getpid(),
            "owner_start": _proc_start_time(os.getpid()),
            "netns": self._made_netns,
            "links": self._made_links,
            "procs": [(p.name, p.pid, p.start_time) for p in self._procs],
            "root_hosts_lines": self._root_hosts_lines,
            "workdir": str(self.workdir),
        }

    def _save_manifest(self) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.runtime_dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(self._manifest()))
        tmp.replace(self.runtime_dir / "manifest.json")

    def start(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        RUNTIME_ROOT.mkdir(mode=0o755, exist_ok=True)
        os.chmod(RUNTIME_ROOT, 0o755)
        self.runtime_dir.mkdir(mode=0o755)
        self._save_manifest()
        for d in ("state", "spool", "log", "munge"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir / "munge", 0o700)

        self._setup_network()
        self._write_hosts()
        self._start_munged()
        self._write_conf()
        self._start_slurmctld()
        for i in range(self.nnodes):
            self._start_slurmd(i)
        self._wait_nodes_idle(max(5.0, deadline - time.monotonic()))

    def _setup_network(self) -> None:
        prefix = self.subnet.prefixlen
        self._made_links.append(self.bridge)
        self._save_manifest()
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.controller_addr}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for i, ns in enumerate(self.netns_names):
            self._made_netns.append(ns)
            self._made_links.append(self._veth_host[i])
            self._save_manifest()
            add_netns(ns)
            add_veth(self._veth_host[i], self._veth_peer[i], peer_netns=ns)
            _run(["ip", "link", "set", self._veth_host[i], "master", self.bridge])
            _run(["ip", "link", "set", self._veth_host[i], "up"])
            set_address(ns, self._veth_peer[i], f"{self.node_addrs[i]}/{prefix}")
            _run(["ip", "-n", ns, "route", "add", "default", "via", self.controller_addr])

    def _write_hosts(self) -> None:
        names = " ".join([self.controller_host, f"slurmctld-{self.rid}"])
        write_hosts(self.hosts_path, [("::1", "localhost ip6-localhost ip6-loopback"), (self.controller_addr, names),
                                      *zip(self.node_addrs, self.node_names)])
        if self.root_hosts:
            # Root namespace: node names only (the controller's own name stays as it is).
            add = [f"{a} {n} {HOSTS_MARK}-{self.rid}" for a, n in zip(self.node_addrs, self.node_names)]
            self._root_hosts_lines = add
            self._save_manifest()
            with open("/etc/hosts", "a") as f:
                f.write("".join(line + "\n" for line in add))

    def _spawn(self, name: str, argv: list[str], log: pathlib.Path, env: dict | None = None) -> _Proc:
        logf = open(log, "ab")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env if env is not None else self.client_env(),
                start_new_session=True,  # not killed by the test's Ctrl-C process group; we kill it
                cwd=str(self.workdir),
            )
        finally:
            logf.close()
        proc = _Proc(name, popen.pid, None, popen)
        # start time read right away; pid cannot be reused while it is our unreaped child
        proc.start_time = _proc_start_time(popen.pid)
        self._procs.append(proc)
        self._save_manifest()
        return proc

    def _start_munged(self) -> None:
        key = self.workdir / "munge" / "munge.key"
        _run(["mungekey", "--create", f"--keyfile={key}", "--force"])
        os.chmod(key, 0o400)
        proc = self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.runtime_dir / 'munged.pid'}",
                f"--seed-file={self.workdir / 'munge' / 'munged.seed'}",
                f"--log-file={self.logs['munged']}",
            ],
            self.logs["munged"],
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise SlurmHarnessError(f"munged exited rc={proc.popen.returncode}:\n{_tail(self.logs['munged'])}")
            if self.munge_socket.exists():
                p = _run(["munge", "-n", "-S", str(self.munge_socket)], check=False, timeout=5)
                if p.returncode == 0:
                    return
            time.sleep(0.05)
        raise SlurmHarnessError(f"munged not ready:\n{_tail(self.logs['munged'])}")

    def _write_conf(self) -> None:
        self.slurmctld_port = _free_tcp_port()
        self.slurmd_port = 6818  # each slurmd has its own network namespace: no clash
        plugstack = self.workdir / "plugstack.conf"
        plugstack.write_text("")
        w = self.workdir
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={n} NodeAddr={a} CPUs={self.cpus_per_node} "
            f"Sockets=1 CoresPerSocket={self.cpus_per_node} ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN"
            for n, a in zip(self.node_names, self.node_addrs)
        )
        conf = f"""\
# generated by tests/cluster/slurm.py (run {self.rid})
ClusterName={self.cluster_name}
SlurmctldHost={self.controller_host}({self.controller_addr})
SlurmctldPort={self.slurmctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# own munged socket; cred_expire also is the delay before a requeued job may start again
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool/%n
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.%n.pid
SlurmctldLogFile={self.logs['slurmctld']}
SlurmdLogFile={w}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={plugstack}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp_path}
SchedulerType=sched/backfill
# start batch jobs at submit (default delay 3 s); re-test pending jobs (e.g. requeued ones
# whose BeginTime passed, no event triggers that) every second instead of every 60/30 s
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=3
InactiveLimit=0
Waittime=0
PropagateResourceLimits=NONE
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        self.conf_path.write_text(conf)

    def _start_slurmctld(self) -> None:
        proc = self._spawn(
            "slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf_path)], self.log_dir / "slurmctld.stdout"
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise SlurmHarnessError(f"slurmctld exited rc={proc.popen.returncode}\n{self.diagnostics()}")
            p = _run(["scontrol", "ping"], check=False, timeout=10, env=self.client_env())
            if "UP" in p.stdout:
                return
            time.sleep(0.2)
        raise SlurmHarnessError(f"slurmctld not answering\n{self.diagnostics()}")

    def _start_slurmd(self, i: int) -> None:
        node, ns = self.node_names[i], self.netns_names[i]
        (self.workdir / "spool" / node).mkdir(parents=True, exist_ok=True)
        self._spawn(
            f"node-init:{node}",
            node_argv(ns, self.hosts_path, node, ["slurmd", "-D", "-f", str(self.conf_path), "-N", node]),
            self.log_dir / f"slurmd.{node}.stdout",
        )

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.name.startswith("node-init:") and p.popen.poll() is not None:
                    raise SlurmHarnessError(f"{p.name} exited rc={p.popen.returncode}\n{self.diagnostics()}")
            out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10, env=self.client_env()).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in self.node_names):
                return
            time.sleep(0.2)
        raise SlurmHarnessError(f"nodes not idle after {timeout:.0f}s: {states}\n{self.diagnostics()}")

    # ---------------------------------------------------------------- teardown

    def stop(self) -> None:
        errors: list[str] = []

        def attempt(what: str, fn, *a):
            try:
                fn(*a)
            except Exception as e:  # keep tearing down the rest
                errors.append(f"{what}: {e}")

        # 1. every process inside the nodes' namespaces (slurmd, slurmstepd, job steps)
        #    but the node inits, which reap them; then the inits themselves.
        inits = frozenset(p.pid for p in self._procs if p.name.startswith("node-init:"))
        for ns in self._made_netns:
            attempt(f"kill processes in {ns}", kill_netns_processes, ns, inits)
        # 2. node inits, slurmctld, munged: newest first, by pid.
        for p in reversed(self._procs):
            attempt(f"stop {p.name}", _kill_pid, p.pid, p.start_time)
        for p in self._procs:
            if p.popen is not None:
                with contextlib.suppress(Exception):
                    p.popen.wait(timeout=1)
        # 3. network: veths (deleting one end deletes its peer), namespaces, bridge last.
        for link in reversed(self._made_links):
            attempt(f"ip link del {link}", _del_link, link)
        for ns in self._made_netns:
            attempt(f"ip netns del {ns}", del_netns, ns)
        # 4. hosts lines we added to /etc/hosts (exactly those).
        attempt("restore /etc/hosts", _remove_hosts_lines, self._root_hosts_lines)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.runtime_dir)
        if errors:
            raise SlurmHarnessError("teardown problems:\n" + "\n".join(errors))


def _del_link(link: str) -> None:
    if pathlib.Path(f"/sys/class/net/{link}").exists():
        p = _run(["ip", "link", "del", link], timeout=15, check=False)
        # it may vanish meanwhile (a veth goes when its peer's namespace goes)
        if p.returncode != 0 and pathlib.Path(f"/sys/class/net/{link}").exists():
            raise SlurmHarnessError(f"ip link del {link}: {p.stderr.strip()}")


def _remove_hosts_lines(lines: list[str]) -> None:
    if not lines:
        return
    hosts = pathlib.Path("/etc/hosts")
    current = hosts.read_text().splitlines(keepends=True)
    drop = set(lines)
    kept = [line for line in current if line.rstrip("\n") not in drop]
    if len(kept) != len(current):
        # rewrite in place (keeps inode, owner and mode; /etc/hosts may be a bind mount)
        with open(hosts, "r+") as f:
            f.seek(0)
            f.write("".join(kept))
            f.truncate()


def cleanup_stale() -> list[str]:
    """Tear down leftovers of earlier runs whose owning process is gone (e.g. SIGKILLed).
    Only touches what those runs recorded in their manifests. Returns the run ids cleaned."""
    cleaned = []
    if not RUNTIME_ROOT.is_dir():
        return cleaned
    for d in RUNTIME_ROOT.iterdir():
        mf = d / "manifest.json"
        try:
            m = json.loads(mf.read_text())
        except (OSError, ValueError):
            continue
        if _alive(m["owner_pid"], m.get("owner_start")):
            continue
        for ns in m.get("netns", []):
            with contextlib.suppress(Exception):
                kill_netns_processes(ns)
        for _name, pid, start in reversed(m.get("procs", [])):
            with contextlib.suppress(Exception):
                _kill_pid(pid, start)
        for link in reversed(m.get("links", [])):
            with contextlib.suppress(Exception):
                _del_link(link)
        for ns in m.get("netns", []):
            with contextlib.suppress(Exception):
                del_netns(ns)
        with contextlib.suppress(Exception):
            _remove_hosts_lines(m.get("root_hosts_lines", []))
        shutil.rmtree(d, ignore_errors=True)
        cleaned.append(d.name)
    return cleaned


@contextlib.contextmanager
def slurm_cluster(
    workdir: pathlib.Path,
    nodes: int = 2,
    cpus_per_node: int = 2,
    root_hosts: bool = False,
    cred_expire: int = 5,
    start_timeout: float = 60,
) -> Iterator[SlurmCluster]:
    """Start a throw-away Slurm cluster; always torn down on exit (also on errors).

    root_hosts=True additionally appends the node names to the machine's /etc/hosts
    (marked lines, removed exactly on teardown) so the root namespace resolves them too.
    cred_expire: AuthInfo cred_expire (s); a requeued job waits cred_expire+1 s before it
    may start again (Slurm's default is 120 s); step launches must happen within it.
    While the cluster is up, SIGTERM (e.g. a CI timeout) raises KeyboardInterrupt in the
    main thread so that teardown still runs; a SIGKILLed run is cleaned up by the next
    one (cleanup_stale()).
    """
    why = missing_requirements()
    if why:
        raise SlurmHarnessError(why)
    cleanup_stale()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = SlurmCluster(workdir, nodes, cpus_per_node, root_hosts, cred_expire)
    old_term = None
    if threading.current_thread() is threading.main_thread() and _signal.getsignal(_signal.SIGTERM) == _signal.SIG_DFL:
        old_term = _signal.signal(_signal.SIGTERM, _sigterm_to_keyboardinterrupt)
    try:
        cluster.start(timeout=start_timeout)
        yield cluster
    finally:
        if old_term is not None:  # a second SIGTERM must not cut the teardown short
            _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
        try:
            cluster.stop()
        finally:
            if old_term is not None:
                _signal.signal(_signal.SIGTERM, old_term)


def _sigterm_to_keyboardinterrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
