"""A machine whose host name resolves to loopback (Debian's and Ubuntu's `127.0.1.1 <hostname>`): gloo would offer
the other machines 127.0.x.x and the ranks could not connect (issue 29, item 8). In a multi-machine layout the job
sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface that reaches MAIN_ADDRESS, or exits 2 naming them.
First the decision with the lookups injected, then `job preflight` in a network namespace of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from job import config, launch
from job.errors import ConfigError
from tests import netns
from tests.jobtools import REPO, job_env
from tests.netns import node_argv, write_hosts

BOTH = {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "eth1"}


def topology(machines: int = 2, main: str = "node1") -> launch.Topology:
    return launch.Topology(machines, machines - 1, main, 29500, 1, "cpu")


def decide(t: launch.Topology, names: dict, routes: dict, environ: dict | None = None) -> dict:
    """socket_interfaces on a made-up machine "node2": `names` as its resolver, `routes` (destination -> local
    address) as its routing table, eth0 = 10.0.0.2 and eth1 = 10.1.0.2 its interfaces."""
    interfaces = {"127.0.0.1": "lo", "127.0.1.1": "lo", "10.0.0.2": "eth0", "10.1.0.2": "eth1"}
    return launch.socket_interfaces(t, environ or {}, hostname="node2", lookup=lambda n: names.get(n, []),
                                    route=lambda address, port: routes.get(address),
                                    interface_of=interfaces.get)


def test_a_loopback_host_name_gets_the_interface_that_reaches_main_address():
    names = {"node2": ["127.0.1.1"], "node1": ["10.1.0.1"]}
    routes = {"10.1.0.1": "10.1.0.2", launch.OUTSIDE: "10.0.0.2"}  # the default route is another network
    assert decide(topology(), names, routes) == BOTH
    # the same when the name does not resolve at all: gloo falls back to loopback then
    assert decide(topology(), {"node1": ["10.1.0.1"]}, routes) == BOTH


def test_nothing_is_set_where_gloo_would_pick_a_real_address_or_the_user_chose():
    routes = {"10.1.0.1": "10.1.0.2"}
    assert decide(topology(), {"node2": ["10.1.0.2", "127.0.1.1"], "node1": ["10.1.0.1"]}, routes) == {}
    loopback = {"node2": ["127.0.1.1"], "node1": ["10.1.0.1"]}
    assert decide(topology(), loopback, routes, {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0"}) == {}
    assert decide(topology(), loopback, routes, {"NCCL_SOCKET_IFNAME": "ib0"}) == {"GLOO_SOCKET_IFNAME": "eth1"}
    assert decide(topology(machines=1), loopback, routes) == {}
    assert decide(topology(main="127.0.0.1"), loopback, routes) == {}  # every machine on this one


def test_machine_0_whose_own_name_is_loopback_uses_the_default_route():
    names = {"node2": ["127.0.1.1"], "node1": ["127.0.1.1"]}  # MAIN_ADDRESS is this machine, mapped as badly
    assert decide(topology(), names, {"127.0.1.1": "127.0.1.1", launch.OUTSIDE: "10.1.0.2"}) == BOTH
    # MAIN_ADDRESS not in DNS yet (a headless Service's names come with the pods): the default route too
    assert decide(topology(), {"node2": ["127.0.1.1"]}, {launch.OUTSIDE: "10.1.0.2"}) == BOTH


def test_no_route_but_loopback_exits_2_naming_the_variables_and_the_host_name():
    names = {"node2": ["127.0.1.1"], "node1": ["127.0.1.1"]}
    with pytest.raises(ConfigError) as refused:
        decide(topology(), names, {"127.0.1.1": "127.0.1.1"})
    message = str(refused.value)
    for part in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "node2 resolves to the loopback address 127.0.1.1",
                 "MAIN_ADDRESS=node1"):
        assert part in message, message
    assert refused.value.exit_code == 2


def test_the_training_processes_get_the_interface_and_the_log_says_why(monkeypatch, caplog):
    monkeypatch.setattr(launch, "_addresses", {"node2": ["127.0.1.1"], "node1": ["10.1.0.1"]}.get)
    monkeypatch.setattr(launch, "_route", lambda address, port: "10.1.0.2")
    monkeypatch.setattr(launch, "_interface_of", {"10.1.0.2": "eth1"}.get)
    monkeypatch.setattr(launch.socket, "gethostname", lambda: "node2")
    env = launch.child_env(config.load(environ={}), topology(), "/tmp/exits", {"HOME": "/root"})
    assert {k: env[k] for k in BOTH} == BOTH
    assert "GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1" in caplog.text and "loopback" in caplog.text
    assert topology().describe()["socket_interfaces"] == BOTH


def test_the_kernel_names_the_loopback_interface():
    assert launch._interface_of("127.0.0.1") == "lo"
    assert launch._is_loopback("127.0.1.1") and launch._is_loopback("::1") and not launch._is_loopback("node1")


@pytest.mark.slow
@pytest.mark.skipif(netns.missing() is not None, reason=f"namespaces: {netns.missing()}")
def test_preflight_on_a_machine_whose_host_name_is_loopback_sets_its_veth_interface(tmp_path, hf_home):
    with netns.veth_pair("if", 79) as ((_, main_address, _), (ns, _, veth)):
        hosts = write_hosts(tmp_path / "hosts", [("127.0.1.1", "node2"), (main_address, "node1")])  # Debian's line
        settings = dict(OUTPUT_DIR=tmp_path / "o", NUM_MACHINES=2, MACHINE_RANK=1, MAIN_ADDRESS="node1",
                        MAIN_PORT=29511, OMP_NUM_THREADS=1)
        result = subprocess.run(node_argv(ns, hosts, "node2", [sys.executable, "-m", "job", "preflight"]), cwd=REPO,
                                env=job_env(hf_home, **settings), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout[result.stdout.index("{"): result.stdout.rindex("}") + 1])
    assert plan["launch"]["socket_interfaces"] == {"GLOO_SOCKET_IFNAME": veth, "NCCL_SOCKET_IFNAME": veth}
