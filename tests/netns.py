"""Machines of their own on this one, for tests: network namespaces joined by veth pairs, each process started in
one with its own host name and /etc/hosts (node_init.py). Used by the Slurm harness (tests/cluster/slurm.py: its
nodes), tests/test_k8s.py (its pods) and tests/test_interfaces.py. Needs root, iproute2, nsenter and unshare."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pathlib
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import time
from typing import Iterator

NODE_INIT = pathlib.Path(__file__).resolve().with_name("node_init.py")


class HarnessError(RuntimeError):
    """A command of a test harness failed or timed out."""


def missing() -> str | None:
    """Why namespaces cannot be made here (None if they can)."""
    if os.geteuid() != 0:
        return "needs root (network, mount and UTS namespaces)"
    absent = [b for b in ("ip", "nsenter", "unshare", "mount") if shutil.which(b) is None]
    return f"missing {', '.join(absent)}" if absent else None


def run(argv: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    if check and p.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} -> rc={p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


# ------------------------------------------------------------------------------------------- processes


def start_time(pid: int) -> int | None:
    """Kernel start time of a pid (field 22 of /proc/PID/stat); guards against pid reuse."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, started: int | None) -> bool:
    st = start_time(pid)
    return st is not None and (started is None or st == started)


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# ------------------------------------------------------------------------------------ network namespaces


def pick_subnet(second_octet: int = 77) -> ipaddress.IPv4Network:
    """A random 10.N.X.0/24 that no interface or route on this machine uses."""
    used = run(["ip", "-4", "-o", "addr"], timeout=10).stdout + run(["ip", "-4", "route"], timeout=10).stdout
    taken = [ipaddress.ip_network(m, strict=False) for m in re.findall(r"(\d+\.\d+\.\d+\.\d+/\d+)", used)]
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{second_octet}.{random.randrange(0, 256)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise HarnessError(f"no free 10.{second_octet}.X.0/24 subnet")


def add_netns(ns: str) -> None:
    """A new network namespace, with its loopback up."""
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def add_veth(name: str, peer: str, netns: str | None = None, peer_netns: str | None = None) -> None:
    """A veth pair; each end made in the given network namespace (None: this one)."""
    run(["ip", "link", "add", name, *(["netns", netns] if netns else []), "type", "veth",
         "peer", "name", peer, *(["netns", peer_netns] if peer_netns else [])])


def set_address(ns: str, dev: str, address: str) -> None:
    """Give `dev` in namespace `ns` the address (``A.B.C.D/prefix``) and bring it up."""
    run(["ip", "-n", ns, "addr", "add", address, "dev", dev])
    run(["ip", "-n", ns, "link", "set", dev, "up"])


def _netns_pids(ns: str) -> list[int]:
    p = run(["ip", "netns", "pids", ns], check=False, timeout=10)
    if p.returncode != 0:
        return []
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def kill_netns_processes(ns: str, spare: frozenset[int] = frozenset(), timeout: float = 10.0) -> None:
    """SIGKILL every process inside network namespace ns but `spare` (the node's init,
    which reaps them), until none is left; then wait until they are reaped (bounded)."""
    deadline = time.monotonic() + timeout
    killed: dict[int, int | None] = {}
    while True:
        pids = [p for p in _netns_pids(ns) if p != os.getpid() and p not in spare]
        if not pids:
            break
        for pid in pids:
            killed.setdefault(pid, start_time(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reap(pid)
        if time.monotonic() > deadline:
            raise HarnessError(f"processes still alive in netns {ns}: {pids}")
        time.sleep(0.1)
    while time.monotonic() < deadline:
        for pid in killed:
            reap(pid)  # our own children (slurmd's nsenter/unshare chain)
        if not any(alive(pid, st) for pid, st in killed.items()):
            return
        time.sleep(0.1)


def del_netns(ns: str) -> None:
    """Delete a network namespace if it exists (a veth end inside goes with it, and so does its peer)."""
    if pathlib.Path(f"/var/run/netns/{ns}").exists():
        run(["ip", "netns", "del", ns], timeout=15)


@contextlib.contextmanager
def veth_pair(name: str, second_octet: int) -> Iterator[list[tuple[str, str, str]]]:
    """Two network namespaces joined by a veth pair in a free 10.<second_octet>.X.0/24; yields (namespace,
    address, interface) per machine. Everything made is removed afterwards, the processes inside killed."""
    rid = "".join(random.choices(string.ascii_lowercase, k=4))
    net = pick_subnet(second_octet)
    machines = [(f"{name}-{rid}-{i}", str(address), f"{name}v-{rid}-{i}")
                for i, address in enumerate(list(net.hosts())[:2])]
    try:
        for ns, _, _ in machines:
            add_netns(ns)
        add_veth(machines[0][2], machines[1][2], netns=machines[0][0], peer_netns=machines[1][0])
        for ns, address, dev in machines:
            set_address(ns, dev, f"{address}/{net.prefixlen}")
        yield machines
    finally:
        for ns, _, _ in machines:
            with contextlib.suppress(HarnessError):
                kill_netns_processes(ns)
            with contextlib.suppress(HarnessError):
                del_netns(ns)  # its veth end goes with it


# ------------------------------------------------------------------------------- a process as a machine


def write_hosts(path: pathlib.Path, entries) -> pathlib.Path:
    """A node's /etc/hosts (node_init.py mounts it there): localhost, then one line per (address, names)."""
    path.write_text("".join(f"{address} {names}\n" for address, names in [("127.0.0.1", "localhost"), *entries]))
    os.chmod(path, 0o644)
    return path


def node_argv(ns: str, hosts: pathlib.Path, hostname: str, command: list[str]) -> list[str]:
    """The argv that runs `command` as a machine of its own: in network namespace `ns`, with `hosts` as its
    /etc/hosts and `hostname` as its host name.

    nsenter (not `ip netns exec`, which remounts /sys and hides the cgroup fs); unshare a mount
    namespace (private /etc/hosts) and a UTS namespace (its own hostname). --propagation slave:
    unmounts in the root namespace (e.g. `ip netns del` of other runs' namespaces) still propagate
    in, mounts made inside do not leak out. node_init.py bind-mounts the hosts file, sets the
    hostname and runs `command` as a child subreaper (it reaps what daemonizes below it, such as
    slurmstepd) -- see its docstring.
    """
    return ["nsenter", f"--net=/var/run/netns/{ns}", "--", "unshare", "--mount", "--uts", "--propagation", "slave",
            "--", sys.executable, str(NODE_INIT), str(hosts), hostname, "--", *command]
