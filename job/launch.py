"""Where training runs, and starting it there: the machines and processes, and the launcher command.

`job run` runs on every machine (one Slurm task, one pod per node) and calls `run_training`, which
  1. works out the layout (`resolve`), each value from the first source that has it:
       explicit settings   NUM_MACHINES, MACHINE_RANK, MAIN_ADDRESS, MAIN_PORT, NUM_PROCESSES
       Slurm               SLURM_JOB_NUM_NODES, SLURM_NODEID, first host of SLURM_JOB_NODELIST,
                           SLURM_GPUS_ON_NODE; the port derived from SLURM_JOB_ID
       Kubernetes          JOB_COMPLETION_INDEX of an Indexed Job; machine 0 is `<job>-0.<subdomain>`,
                           read from the pod's own host name and DNS name (the headless Service)
       torchrun-style      PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE, PET_MASTER_ADDR/PORT (Kubeflow
                           Trainer), else MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK read as one pod
                           per machine (PyTorchJob, Volcano)
       otherwise           one machine, one process per GPU (1 on CPU)
  2. starts the training processes of this machine as one child process:
       CUDA   python -m accelerate.commands.launch --config_file job/accelerate/<STRATEGY>.yaml
                  --num_machines N --machine_rank R --main_process_ip A --main_process_port P
                  --num_processes N*K ... -m job train             (`accelerate launch`)
       CPU    python -m torch.distributed.run --nnodes N --node-rank R --nproc-per-node K
                  --master-addr A --master-port P -m job train     (gloo; `accelerate launch --cpu`
                  starts a single process), or plain `python -m job train` for one process
  3. passes stop signals (SIGTERM, SIGUSR1; SIGINT as SIGTERM) to the training processes (job.stopping),
     which checkpoint and exit 75, and returns their exit code: the launchers report any failure as 1, so
     each training process that fails leaves its own code in JOB_EXIT_DIR (`report_exit_code`).
The process group lives only in the children: merge and push run in `job run` itself after they
have exited, so no NCCL watchdog can kill them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from job import errors, stagefile, stopping
from job.checkpoint import Layout
from job.config import FIELDS, Settings, env_name
from job.errors import ConfigError

log = logging.getLogger("job.launch")

CONFIGS = Path(__file__).parent / "accelerate"  # accelerate (and DeepSpeed) configs, one per STRATEGY
DEFAULT_PORT = 29500
RENDEZVOUS_TIMEOUT = 1800  # s the other machines wait for machine 0 (it runs preflight and tokenizes first)
FOLLOW_EVERY_S = 5.0  # how often a waiting machine looks at what machine 0 is doing
SHUTDOWN_GRACE = 300  # s torchrun gives training processes to checkpoint after a stop signal before SIGKILL
EXIT_DIR = "JOB_EXIT_DIR"  # where each training process leaves its exit code (set by run_training)
LAYOUT = ("num_machines", "machine_rank", "main_address", "main_port", "num_processes")

# Variables the job reads besides its settings; the tests check every manifest and env file against them.
ENVIRONMENT = {
    "CONFIG_FILE": "YAML file of settings (keys as variables or field names)",
    "HF_HOME": "Hugging Face cache: downloaded models and datasets, and the built-in tiny model",
    "HF_TOKEN": "Hugging Face token (prefer HF_TOKEN_FILE)",
    "HF_TOKEN_FILE": "file holding the Hugging Face token, e.g. a mounted Secret",
    "HF_HUB_OFFLINE": "1: use the cache only, never the network",
    "JOB_LOCK_WAIT": "seconds a job waits for another one to release OUTPUT_DIR (default 330), then exits 2",
    "GLOO_SOCKET_IFNAME": "network interface for gloo (CPU) traffic between machines, e.g. eth0",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "NCCL error handling (PyTorch's)",
    "PYTORCH_CUDA_ALLOC_CONF": "CUDA allocator options, e.g. expandable_segments:True",
    "OMP_NUM_THREADS": "CPU threads per training process (set from the CPU count when unset)",
    "TOKENIZERS_PARALLELISM": "Hugging Face tokenizers' own threads",
    "WANDB_API_KEY": "with REPORT_TO=wandb", "WANDB_PROJECT": "with REPORT_TO=wandb",
    "MLFLOW_TRACKING_URI": "with REPORT_TO=mlflow",
}
ENVIRONMENT_PREFIXES = ("NCCL_",)  # NCCL's own options: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, ...
# Launcher variables of a parent environment that must not reach the training processes as they are.
INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK",
             "MASTER_ADDR", "MASTER_PORT")
INHERITED_PREFIXES = ("PET_", "TORCHELASTIC_")


def known_variable(name: str) -> bool:
    """Whether the job reads this environment variable (a setting, or one of ENVIRONMENT)."""
    settings = {env_name(f) for f in FIELDS.values()}
    return name in settings or name in ENVIRONMENT or name.startswith(ENVIRONMENT_PREFIXES)


# --------------------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Topology:
    """The machines and processes of one run, seen from this machine."""

    num_machines: int
    machine_rank: int
    main_address: str
    main_port: int
    num_processes: int  # on each machine
    device: str  # "cuda" or "cpu"
    precision: str = "no"  # accelerate's --mixed_precision on CUDA: bf16 or fp16, as the trainer uses
    sources: dict = field(default_factory=dict)  # layout field -> "settings" | "slurm" | "kubernetes" | ...

    @property
    def world_size(self) -> int:
        return self.num_machines * self.num_processes

    @property
    def is_first_machine(self) -> bool:
        return self.machine_rank == 0

    def describe(self) -> dict:
        return {"machines": self.num_machines, "machine_rank": self.machine_rank,
                "processes_per_machine": self.num_processes, "world_size": self.world_size,
                "main": f"{self.main_address}:{self.main_port}", "device": self.device,
                "from": dict(self.sources)} | (
            # checked here so that `job preflight` shows it, and stops with exit 2 where no interface will do
            {"socket_interfaces": socket_interfaces(self)} if self.num_machines > 1 else {})


def resolve(s: Settings, environ: dict | None = None, *, gpus: int | None = None, bf16: bool | None = None,
            hostname: str | None = None, fqdn: str | None = None) -> Topology:
    """The layout from the settings and the environment (see the module docstring for the order).

    gpus, bf16, hostname and fqdn default to this machine's; tests pass them.
    Raises ConfigError when the sources do not add up (every message says what to set).
    """
    env = os.environ if environ is None else environ
    if gpus is None:
        gpus = _visible_gpus()
    if hostname is None:
        hostname = socket.gethostname()
    if fqdn is None:
        fqdn = socket.getfqdn(hostname) if "JOB_COMPLETION_INDEX" in env else hostname
    found = _layouts_found(s, env, hostname, fqdn)
    chosen, sources = _first_found(found)
    _settle_machines(env, found, chosen, sources)
    device = _settle_processes(s, chosen, sources, gpus)
    if bf16 is None:
        bf16 = device == "cuda" and _bf16_supported()
    precision = ("bf16" if bf16 else "fp16") if device == "cuda" else "no"
    return Topology(chosen["num_machines"], chosen["machine_rank"], str(chosen["main_address"]),
                    int(chosen["main_port"]), int(chosen["num_processes"]), device, precision,
                    {name: sources.get(name, "default") for name in LAYOUT})


def _layouts_found(s: Settings, env, hostname: str, fqdn: str) -> dict[str, dict]:
    """The layout values each source gives (the settings first, then the schedulers that are present)."""
    found: dict = {"settings": {name: getattr(s, name) for name in LAYOUT if getattr(s, name) is not None}}
    for name, source in (("slurm", _slurm), ("kubernetes", lambda e: _kubernetes(e, hostname, fqdn)),
                         ("torchrun", _torchrun)):
        values = source(env)
        if values is not None:
            found[name] = values
    return found


def _first_found(found: dict[str, dict]) -> tuple[dict, dict]:
    """Each layout value from the first source that has it, and that source's name."""
    chosen, sources = {}, {}
    for name in LAYOUT:
        for source, values in found.items():
            if values.get(name) is not None:
                chosen[name], sources[name] = values[name], source
                break
    return chosen, sources


def _settle_machines(env, found: dict, chosen: dict, sources: dict) -> None:
    """Check the machines and where they meet, and fill in the defaults of one machine on this host."""
    if "slurm" in found and sources.get("num_machines") == "slurm":
        _check_slurm_step(env, chosen["num_machines"])
    if "kubernetes" in found and "num_machines" not in chosen:
        raise ConfigError(f"JOB_COMPLETION_INDEX={env['JOB_COMPLETION_INDEX']} says this is a Kubernetes Indexed "
                          "Job, but NUM_MACHINES is unset: set it to the Job's completions (k8s/multi-node does)")
    machines = chosen.setdefault("num_machines", 1)
    rank = chosen.setdefault("machine_rank", 0)
    if not 0 <= rank < machines:
        raise ConfigError(f"machine rank {rank} (from {sources.get('machine_rank', 'default')}) is not below the "
                          f"number of machines {machines} (from {sources.get('num_machines', 'default')})")
    if "main_address" not in chosen:
        if machines > 1:
            hint = (" and this pod has no DNS subdomain: set spec.template.spec.subdomain to the headless "
                    "Service's name" if "kubernetes" in found else "")
            raise ConfigError(f"{machines} machines but no MAIN_ADDRESS (the host name of machine 0){hint}")
        chosen["main_address"] = "127.0.0.1"
    if "main_port" not in chosen:
        chosen["main_port"] = DEFAULT_PORT if machines > 1 else _free_port()


def _settle_processes(s: Settings, chosen: dict, sources: dict, gpus: int) -> str:
    """Check the processes per machine against the GPUs this machine shows (one per GPU by default, 1 on CPU);
    the device they train on: cuda or cpu."""
    device = "cuda" if gpus > 0 else "cpu"
    if "num_processes" not in chosen:
        chosen["num_processes"], sources["num_processes"] = max(gpus, 1), "gpus" if gpus else "cpu"
    if device == "cpu" and sources.get("num_processes") == "slurm":
        raise ConfigError(f"Slurm gave this node {chosen['num_processes']} GPU(s) (SLURM_GPUS_ON_NODE) but PyTorch "
                          "sees none: is the CUDA build of torch installed, CUDA_VISIBLE_DEVICES right? (Set "
                          "NUM_PROCESSES to train on the CPUs anyway)")
    if device == "cuda" and chosen["num_processes"] > gpus:
        raise ConfigError(f"{chosen['num_processes']} processes per machine (from {sources['num_processes']}) but "
                          f"this machine shows {gpus} GPU(s): set NUM_PROCESSES to at most {gpus}")
    if device == "cpu" and s.strategy != "ddp":
        raise ConfigError(f"STRATEGY={s.strategy} needs CUDA GPUs; on CPU the job trains with ddp (gloo) only")
    return device


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _int(value) -> int | None:
    """An integer from a scheduler variable; None when unset or not a plain number (e.g. PET_NNODES=1:4)."""
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() else None


def _slurm(env) -> dict | None:
    if "SLURM_JOB_ID" not in env:
        return None
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id, restarts = _int(env["SLURM_JOB_ID"]) or 0, _int(env.get("SLURM_RESTART_COUNT")) or 0
    return {
        "num_machines": _int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")),
        "machine_rank": _int(env.get("SLURM_NODEID")),
        "main_address": first_host(nodelist) if nodelist else None,
        # jobs sharing a node get different ports; a requeued job does not wait for its old one to close
        "main_port": 20000 + (job_id * 10 + restarts) % 10000,
        "num_processes": _int(env.get("SLURM_GPUS_ON_NODE")) or None,
    }


def _check_slurm_step(env, nodes: int) -> None:
    """Refuse the launches that hang at the rendezvous: one node started, or several launchers per node."""
    step = env.get("SLURM_STEP_ID")
    if step is None or not step.isdigit():
        if nodes > 1:
            raise ConfigError(f"this Slurm job has {nodes} nodes but `job run` runs outside an srun step (in the batch "
                              "script itself), so the other nodes would never join: start it as `srun "
                              "--ntasks-per-node=1 job run` (slurm/train.sbatch does)")
        return
    step_nodes = _int(env.get("SLURM_STEP_NUM_NODES")) or nodes
    tasks = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")) or step_nodes
    if step_nodes != nodes:
        raise ConfigError(f"the srun step spans {step_nodes} of the job's {nodes} nodes: run it on all of them "
                          f"(srun --nodes={nodes} --ntasks-per-node=1 job run)")
    if tasks != step_nodes:
        raise ConfigError(f"srun started {tasks} tasks on {step_nodes} node(s); `job run` starts every process of "
                          "its node itself, so it needs exactly one task per node (srun --ntasks-per-node=1)")


def _kubernetes(env, hostname: str, fqdn: str) -> dict | None:
    index = _int(env.get("JOB_COMPLETION_INDEX"))
    if index is None:
        return None
    found = {"machine_rank": index}
    # An Indexed Job's pods are named <job>-<index>; with spec.subdomain set to a headless Service their
    # DNS name is <job>-<index>.<subdomain>.<namespace>.svc.<cluster domain>.
    suffix = f"-{index}"
    if hostname.endswith(suffix) and fqdn.startswith(hostname + "."):
        found["main_address"] = hostname[: -len(suffix)] + "-0" + fqdn[len(hostname):]
    return found


def _torchrun(env) -> dict | None:
    if not any(name in env for name in ("PET_NNODES", "PET_MASTER_ADDR", "MASTER_ADDR")):
        return None
    if "PET_NNODES" in env or "PET_MASTER_ADDR" in env:  # Kubeflow Trainer: torchrun's own variables
        nnodes = str(env.get("PET_NNODES", "")).rpartition(":")[2]  # "2" or an elastic range "1:2"
        return {"num_machines": _int(nnodes), "machine_rank": _int(env.get("PET_NODE_RANK")),
                "main_address": env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR"),
                "main_port": _int(env.get("PET_MASTER_PORT") or env.get("MASTER_PORT")),
                "num_processes": _int(env.get("PET_NPROC_PER_NODE"))}
    return {"num_machines": _int(env.get("WORLD_SIZE")),
            "machine_rank": _int(env.get("NODE_RANK") or env.get("GROUP_RANK") or env.get("RANK")),
            "main_address": env.get("MASTER_ADDR"), "main_port": _int(env.get("MASTER_PORT"))}


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list ("gpu[03-04,07],cpu1" -> "gpu03"), as `scontrol show hostnames`
    prints it first; pure Python, so it also works inside a container without Slurm's tools."""
    return next(expand_hostlist(nodelist))


def expand_hostlist(nodelist: str):
    """Every host of a Slurm host list, in order ("n[1-2]-ib,m" -> n1-ib, n2-ib, m)."""
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        parts = re.split(r"\[([^\]]*)\]", item)  # literal, ranges, literal, ranges, ..., literal
        choices = [[text] if i % 2 == 0 else list(_ranges(text)) for i, text in enumerate(parts)]
        for combination in itertools.product(*choices):
            yield "".join(combination)


def _ranges(text: str):
    for piece in text.split(","):
        low, _, high = piece.partition("-")
        if not high:
            yield low
            continue
        for number in range(int(low), int(high) + 1):
            yield str(number).zfill(len(low))


# ------------------------------------------------------------------------------------------ network

SOCKET_IFNAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
OUTSIDE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): a UDP connect() to it only looks up the default route


def socket_interfaces(t: Topology, environ: dict | None = None, *, hostname: str | None = None, lookup=None,
                      route=None, interface_of=None) -> dict[str, str]:
    """The GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME the training processes need and the user has not set; {} when
    none is needed.

    gloo offers the other machines the first address this machine's host name resolves to, loopback when it does
    not resolve: Debian and Ubuntu map the host name to 127.0.1.1, and the ranks then fail to connect ("Connection
    refused, remote=[127.0.0.1]"). Then both variables are set to the interface that reaches MAIN_ADDRESS (NCCL
    picks its own otherwise, which may be another network than the one to machine 0).
    lookup(name) -> addresses, route(address, port) -> the local address that reaches it or None, and
    interface_of(address) -> its interface's name or None default to this machine's; tests pass them.
    Raises ConfigError when no interface but loopback reaches MAIN_ADDRESS.
    """
    env = os.environ if environ is None else environ
    unset = [name for name in SOCKET_IFNAMES if not env.get(name)]
    # a loopback MAIN_ADDRESS puts every machine on this one, where loopback is the right interface
    if t.num_machines == 1 or not unset or _is_loopback(t.main_address):
        return {}
    hostname = hostname or socket.gethostname()
    lookup, route, interface_of = lookup or _addresses, route or _route, interface_of or _interface_of
    own = lookup(hostname)
    if own and not _is_loopback(own[0]):
        return {}
    main = lookup(t.main_address)
    local = route(main[0], t.main_port) if main else None
    # MAIN_ADDRESS resolving to loopback is this machine's own name (machine 0), mapped as badly as the host name;
    # one that does not resolve may not be in DNS yet (a headless Service's names come with the pods): the
    # interface of the default route is then the best guess
    if local is None or _is_loopback(local):
        local = route(OUTSIDE, t.main_port)
    name = interface_of(local) if local and not _is_loopback(local) else None
    if name is None:
        resolved = (f"resolves to the loopback address {own[0]}" if own
                    else "does not resolve (gloo falls back to loopback)")
        raise ConfigError(f"this machine's host name {hostname} {resolved}, so gloo and NCCL would offer the other "
                          f"machines loopback, and no other interface reaches MAIN_ADDRESS={t.main_address}: set "
                          f"{' and '.join(unset)} to the network interface between the machines (e.g. eth0, see "
                          "`ip -o addr`), or map the host name to that interface's address in /etc/hosts")
    return {variable: name for variable in unset}


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:  # a host name
        return False


def _addresses(name: str) -> list[str]:
    """The addresses of a host name in the order gloo tries them (getaddrinfo's), [] when it does not resolve."""
    try:
        return [info[4][0] for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)]
    except (OSError, UnicodeError):
        return []


def _route(address: str, port: int) -> str | None:
    """This machine's address on the route to `address` (None: no route)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((address, port))  # UDP: nothing is sent, the kernel only picks the route
            return probe.getsockname()[0]
    except OSError:
        return None


_SIOCGIFADDR = 0x8915  # <linux/sockios.h>: an interface's (primary) IPv4 address


def _interface_of(address: str) -> str | None:
    """The name of the interface holding this local address, from the kernel (no `ip` needed in a container)."""
    if ":" in address:  # IPv6: /proc/net/if_inet6 lists each address (32 hex digits) with its interface last
        wanted = ipaddress.ip_address(address.split("%")[0]).exploded.replace(":", "")
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/if_inet6").read_text().splitlines():
                fields = line.split()
                if fields and fields[0] == wanted:
                    return fields[-1]
        return None
    wanted = socket.inet_aton(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):  # an interface without an IPv4 address
                ifreq = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()))
                if ifreq[20:24] == wanted:  # struct ifreq: the name (16 bytes), then a sockaddr_in
                    return name
    return None


# -------------------------------------------------------------------------------------------- command

def command(s: Settings, t: Topology, python: str = sys.executable) -> list[str]:
    """The command that starts this machine's training processes."""
    if t.device == "cuda":
        config = CONFIGS / f"{s.strategy}.yaml"
        cmd = [python, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_machines", str(t.num_machines), "--machine_rank", str(t.machine_rank),
               "--main_process_ip", t.main_address, "--main_process_port", str(t.main_port),
               "--num_processes", str(t.world_size), "--mixed_precision", t.precision,
               "--rdzv_conf", f"timeout={RENDEZVOUS_TIMEOUT}", "--max_restarts", "0"]
        if s.strategy.startswith("zero"):
            cmd += ["--deepspeed_config_file", str(CONFIGS / f"{s.strategy}.json")]
        return cmd + ["-m", "job", "train"]
    if t.world_size > 1:
        return [python, "-m", "torch.distributed.run", "--nnodes", str(t.num_machines),
                "--node-rank", str(t.machine_rank), "--nproc-per-node", str(t.num_processes),
                "--master-addr", t.main_address, "--master-port", str(t.main_port),
                "--rdzv-conf", f"timeout={RENDEZVOUS_TIMEOUT}", "--max-restarts", "0", "-m", "job", "train"]
    return [python, "-m", "job", "train"]


def settings_env(s: Settings) -> dict[str, str]:
    """The resolved settings as environment variables, which win over any CONFIG_FILE in the child."""
    return {env_name(f): "" if getattr(s, f.name) is None else str(getattr(s, f.name)) for f in FIELDS.values()}


def child_env(s: Settings, t: Topology, exit_dir: str, environ: dict | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    env = {name: value for name, value in environ.items()
           if name not in INHERITED and not name.startswith(INHERITED_PREFIXES) and name != "CONFIG_FILE"}
    env.update(settings_env(s))
    interfaces = socket_interfaces(t, environ)
    if interfaces:
        log.warning("this machine's host name resolves to a loopback address, which gloo and NCCL would offer the "
                    "other machines: training with %s (the interface that reaches MAIN_ADDRESS=%s)",
                    " ".join(f"{k}={v}" for k, v in interfaces.items()), t.main_address)
        env.update(interfaces)
    env[EXIT_DIR] = exit_dir
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE))
    if t.device == "cpu" and t.num_processes > 1:  # torchrun would give each process one thread
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // t.num_processes)))
    return env


# ------------------------------------------------------------------------------------------- running

def run_training(s: Settings, where: Topology | None = None, lock: int | None = None) -> int:
    """Run this machine's training processes to the end and return their exit code (0, 75 preempted, ...).

    `lock` is OUTPUT_DIR's lock (checkpoint.own): the child inherits it, so a training process that outlives `job
    run` (killed by SIGKILL) keeps the directory from a new owner until it has stopped."""
    where = where or resolve(s)
    cmd = command(s, where)
    exit_dir = tempfile.mkdtemp(prefix="job-exit-")
    launcher = cmd[1:3] != ["-m", "job"]  # accelerate/torchrun between us and the training processes
    log.info("machine %d of %d (%s), %d process(es) of %d: %s", where.machine_rank, where.num_machines,
             where.device, where.num_processes, where.world_size, " ".join(cmd))
    child = subprocess.Popen(cmd, env=child_env(s, where, exit_dir), start_new_session=True,
                             pass_fds=() if lock is None else (lock,),
                             preexec_fn=functools.partial(stopping.in_child, os.getpid(), launcher))
    waiting = None if where.is_first_machine else _follow_machine_0(s)
    try:
        with stopping.forwarding(child, launcher) as stop:
            code = stop.wait(waiting)
    finally:
        ranks = read_exit_codes(exit_dir)
        shutil.rmtree(exit_dir, ignore_errors=True)
    result = outcome(code, ranks, stop.signum)
    if result != errors.EXIT_OK:
        log.error("training ended with exit code %d (launcher %d, processes %s%s)", result, code,
                  ranks or "none reported", f", after {signal.Signals(stop.signum).name}" if stop.signum else "")
    return result


def _follow_machine_0(s: Settings):
    """For a machine that waits at the rendezvous while machine 0 checks and tokenizes: log what machine 0 says
    it is doing (job.stagefile), looked at every few seconds."""
    follower = stagefile.Follower(Layout(s.output).stage)
    last = [0.0]

    def poll() -> None:
        if time.monotonic() - last[0] >= FOLLOW_EVERY_S:
            last[0] = time.monotonic()
            if line := follower.poll():
                log.info("%s", line)

    return poll


def outcome(code: int, ranks: dict[int, int], signum: int = 0) -> int:
    """The exit code of `job run`'s training stage from the launcher's code, the processes' own codes
    (rank -> code) and the stop signal received, if any."""
    if code == errors.EXIT_OK:
        return errors.EXIT_OK
    # a process that fails makes the launcher stop the others, which checkpoint and exit 75: without a stop signal
    # of our own, their 75 is the echo of that failure, and a requeue would only meet it again
    failures = {rank: c for rank, c in ranks.items() if c != errors.EXIT_PREEMPTED}
    if signum or code < 0 or (not failures and (code == errors.EXIT_PREEMPTED or ranks)):
        return errors.EXIT_PREEMPTED  # a checkpoint was written (or the last one stands): rerun to resume
    if errors.EXIT_BAD_INPUT in failures.values():
        return errors.EXIT_BAD_INPUT
    return failures[min(failures)] if failures else code


def read_exit_codes(directory: str) -> dict[int, int]:
    codes = {}
    for path in Path(directory).glob("rank-*"):
        with contextlib.suppress(ValueError, OSError):
            codes[int(path.name[5:])] = int(path.read_text().strip())
    return codes


def report_exit_code(code: int) -> None:
    """In a training process (JOB_EXIT_DIR set), leave its exit code when it fails, for `job run` to read."""
    directory = os.environ.get(EXIT_DIR)
    if directory and code != errors.EXIT_OK:
        with contextlib.suppress(OSError):
            Path(directory, f"rank-{os.environ.get('RANK', '0')}").write_text(f"{code}\n")
