"""The launcher without GPUs: layout from every source, the launcher commands (parsed by accelerate's and
torchrun's own parsers), exit codes, signal forwarding, the shipped configs and env files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from job import config, errors, launch, stopping
from job.errors import ConfigError
from tests.jobtools import run_job, settings

ROOT = Path(__file__).resolve().parents[1]

SLURM_STEP = {  # what srun gives the task on the second of two nodes (seen in tests/cluster)
    "SLURM_JOB_ID": "4711", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "4", "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2",
}
K8S_POD_1 = {"JOB_COMPLETION_INDEX": "1", "NUM_MACHINES": "2"}
K8S_HOST = {"hostname": "qlora-1", "fqdn": "qlora-1.qlora.team.svc.cluster.local"}


def resolve(environ: dict, gpus: int = 0, **host):
    s = settings(**{k: v for k, v in environ.items() if config.FIELDS.get(k.lower())})
    return launch.resolve(s, environ, gpus=gpus, bf16=True, **{"hostname": "node", "fqdn": "node", **host})


# ------------------------------------------------------------------------------------------- layout

def test_one_machine_by_default():
    t = resolve({})
    assert (t.num_machines, t.machine_rank, t.main_address, t.num_processes, t.device) == (1, 0, "127.0.0.1", 1,
                                                                                            "cpu")
    assert 1024 <= t.main_port <= 65535 and t.sources["num_processes"] == "cpu"
    gpu = resolve({}, gpus=8)
    assert (gpu.num_processes, gpu.world_size, gpu.device, gpu.precision) == (8, 8, "cuda", "bf16")


def test_explicit_settings_win_over_every_source():
    env = {**SLURM_STEP, **K8S_POD_1, "MASTER_ADDR": "elsewhere", "WORLD_SIZE": "9",
           "NUM_MACHINES": "3", "MACHINE_RANK": "2", "MAIN_ADDRESS": "head", "MAIN_PORT": "1234", "NUM_PROCESSES": "2"}
    t = resolve(env, gpus=4, **K8S_HOST)
    assert (t.num_machines, t.machine_rank, t.main_address, t.main_port, t.num_processes) == (3, 2, "head", 1234, 2)
    assert set(t.sources.values()) == {"settings"}


def test_slurm_step_on_the_second_node():
    t = resolve(SLURM_STEP, gpus=4)
    assert (t.num_machines, t.machine_rank, t.main_address, t.num_processes) == (2, 1, "gpu07", 4)
    assert t.main_port == 20000 + 47110 % 10000 and set(t.sources.values()) == {"slurm"}
    # a requeued job (same id) meets on another port: the old one may still be closing
    assert resolve({**SLURM_STEP, "SLURM_RESTART_COUNT": "1"}, gpus=4).main_port == t.main_port + 1


def test_slurm_launches_that_would_hang_at_the_rendezvous_are_refused():
    batch_script = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    with pytest.raises(ConfigError, match="outside an srun step"):
        resolve(batch_script, gpus=4)
    with pytest.raises(ConfigError, match="exactly one task per node"):
        resolve({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "8"}, gpus=4)  # srun --ntasks-per-node=4
    with pytest.raises(ConfigError, match="spans 1 of the job's 2 nodes"):
        resolve({**SLURM_STEP, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "1"}, gpus=4)
    # one node, no srun (job run in the batch script) is fine
    one = {**batch_script, "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "gpu07"}
    assert resolve(one, gpus=4).world_size == 4


def test_kubernetes_indexed_job_finds_pod_zero_through_the_headless_service():
    t = resolve(K8S_POD_1, gpus=8, **K8S_HOST)
    assert (t.num_machines, t.machine_rank, t.main_address, t.main_port, t.num_processes) == (
        2, 1, "qlora-0.qlora.team.svc.cluster.local", launch.DEFAULT_PORT, 8)
    assert t.sources["machine_rank"] == t.sources["main_address"] == "kubernetes"
    # JobSet: <jobset>-<replicated job>-<job index>-<pod index>
    js = resolve({"JOB_COMPLETION_INDEX": "3", "NUM_MACHINES": "4"}, hostname="run-node-0-3",
                 fqdn="run-node-0-3.run.ml.svc.cluster.local")
    assert js.main_address == "run-node-0-0.run.ml.svc.cluster.local"


def test_kubernetes_without_num_machines_or_subdomain_says_what_to_set():
    with pytest.raises(ConfigError, match="NUM_MACHINES is unset"):
        resolve({"JOB_COMPLETION_INDEX": "0"}, **K8S_HOST)
    with pytest.raises(ConfigError, match="no DNS subdomain"):
        resolve(K8S_POD_1, hostname="qlora-1", fqdn="qlora-1")


def test_torchrun_style_operator_variables():
    trainer = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "4", "PET_MASTER_ADDR": "tj-node-0-0.tj",
               "PET_MASTER_PORT": "29400"}  # Kubeflow Trainer
    t = resolve(trainer, gpus=4)
    assert (t.num_machines, t.machine_rank, t.main_address, t.main_port, t.num_processes) == (2, 1, "tj-node-0-0.tj",
                                                                                              29400, 4)
    assert resolve({**trainer, "PET_NNODES": "1:2"}, gpus=4).num_machines == 2  # an elastic range
    pytorchjob = {"MASTER_ADDR": "pj-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"}
    t = resolve(pytorchjob, gpus=2)
    assert (t.num_machines, t.machine_rank, t.main_address, t.main_port, t.num_processes) == (3, 2, "pj-master-0",
                                                                                              23456, 2)


def test_sources_are_taken_field_by_field_in_order():
    # JobSet under Kubeflow Trainer: the Indexed Job's index and names, torchrun's node count
    env = {"JOB_COMPLETION_INDEX": "1", "PET_NNODES": "2", "PET_MASTER_ADDR": "ignored", "PET_NODE_RANK": "0"}
    t = resolve(env, gpus=1, **K8S_HOST)
    assert t.sources == {"num_machines": "torchrun", "machine_rank": "kubernetes", "main_address": "kubernetes",
                         "main_port": "default", "num_processes": "gpus"}
    assert (t.machine_rank, t.main_address) == (1, "qlora-0.qlora.team.svc.cluster.local")


def test_layouts_that_do_not_add_up():
    with pytest.raises(ConfigError, match="no MAIN_ADDRESS"):
        resolve({"NUM_MACHINES": "2", "MACHINE_RANK": "1"})
    with pytest.raises(ConfigError, match="shows 2 GPU"):
        resolve({"NUM_PROCESSES": "4"}, gpus=2)
    with pytest.raises(ConfigError, match="not below the number of machines"):
        resolve({**SLURM_STEP, "SLURM_NODEID": "2"}, gpus=4)
    with pytest.raises(ConfigError, match="PyTorch sees none"):  # the CPU build of torch on a GPU node
        resolve(SLURM_STEP, gpus=0)
    with pytest.raises(ConfigError, match="STRATEGY=fsdp needs CUDA"):
        resolve({"STRATEGY": "fsdp"})
    with pytest.raises(ConfigError, match="cannot shard 8-bit"):
        settings(STRATEGY="zero3", QUANTIZATION="int8")


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu07", ["gpu07"]),
    ("gpu[07-08]", ["gpu07", "gpu08"]),
    ("n[01-03,7],x", ["n01", "n02", "n03", "n7", "x"]),
    ("rack[1-2]-n[09-10]", ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10"]),
    ("a[098-100]b,c1", ["a098b", "a099b", "a100b", "c1"]),
])
def test_slurm_host_lists(nodelist, hosts):
    assert list(launch.expand_hostlist(nodelist)) == hosts and launch.first_host(nodelist) == hosts[0]


# ------------------------------------------------------------------------------------------ commands

def _accelerate(cmd: list[str]):
    """What `accelerate launch` makes of the command: torchrun's arguments and the processes' environment."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_cuda_command_is_accelerate_launch_with_the_packaged_config(strategy, monkeypatch):
    for name in list(os.environ):
        if name.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.delenv(name)
    s = settings(STRATEGY=strategy, **{k: v for k, v in SLURM_STEP.items()})
    t = launch.resolve(s, SLURM_STEP, gpus=4, bf16=True)
    cmd = launch.command(s, t, python="python")
    assert cmd[:5] == ["python", "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "job" / "accelerate" / f"{strategy}.yaml")]
    assert cmd[-3:] == ["-m", "job", "train"]
    args, env = _accelerate(cmd)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "4")
    assert args.rdzv_endpoint == f"gpu07:{t.main_port}"
    assert args.rdzv_conf == f"timeout={launch.RENDEZVOUS_TIMEOUT}" and args.max_restarts == 0
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if strategy == "fsdp":
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
        assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    elif strategy.startswith("zero"):
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        ds = Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        assert ds == ROOT / "job" / "accelerate" / f"{strategy}.json" and ds.is_file()
        assert json.loads(ds.read_text())["zero_optimization"]["stage"] == int(strategy[-1])
        assert (env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT") == "true") == (strategy == "zero3")
        assert args.deepspeed_multinode_launcher == "standard"  # each machine runs its own launcher, no pdsh
    else:
        assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


def test_cpu_commands_are_torchrun_or_one_plain_process():
    from torch.distributed.run import get_args_parser

    s = settings(NUM_PROCESSES=2)
    t = launch.resolve(s, SLURM_STEP, gpus=0)
    cmd = launch.command(s, t, python="python")
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"] and cmd[-3:] == ["-m", "job", "train"]
    args = get_args_parser().parse_args(cmd[3:])
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.master_addr, args.master_port) == (
        "2", 1, "2", "gpu07", t.main_port)
    assert (args.module, args.training_script, args.training_script_args) == (True, "job", ["train"])
    single = settings()
    assert launch.command(single, launch.resolve(single, {}, gpus=0), python="python") == [
        "python", "-m", "job", "train"]


def test_child_environment():
    s = settings(MAX_STEPS=7)
    t = launch.resolve(s, {}, gpus=0)
    operator = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "x", "PET_NNODES": "4", "LOCAL_RANK": "0",
                "CONFIG_FILE": "/etc/job.yaml", "NCCL_SOCKET_IFNAME": "ib0", "HOME": "/home/job"}
    env = launch.child_env(s, t, "/tmp/exits", operator)
    assert env["MAX_STEPS"] == "7" and env[launch.EXIT_DIR] == "/tmp/exits" and env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "PET_NNODES", "LOCAL_RANK", "CONFIG_FILE"} & set(env)
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(launch.SHUTDOWN_GRACE)


@pytest.mark.parametrize("code, ranks, signum, expected", [
    (0, {}, 0, 0),
    (0, {}, signal.SIGTERM, 0),  # finished before the signal mattered
    (1, {0: 75, 1: 75}, 0, 75),  # torchrun says 1; the processes checkpointed (a peer machine was preempted)
    (1, {}, signal.SIGUSR1, 75),
    (-9, {}, 0, 75),  # the launcher was killed
    (1, {1: 2}, 0, 2),  # bad input on one rank: never retried (Kubernetes podFailurePolicy)
    (1, {0: 75, 1: 2}, 0, 2),  # ... and the launcher stopped the other rank, which checkpointed: still 2, no requeue
    (1, {0: 75, 1: 3}, 0, 3),  # a training failure on one rank, the others stopped by the launcher
    (1, {0: 75, 1: 2}, signal.SIGTERM, 75),  # we were preempted too: rerun (the bad input shows again, alone)
    (1, {2: 6, 1: 3}, 0, 3),  # the lowest rank's code
    (1, {}, 0, 1),
    (3, {}, 0, 3),  # one plain process: its own code
])
def test_exit_code_of_the_training_stage(code, ranks, signum, expected):
    assert launch.outcome(code, ranks, signum) == expected


FAKE_LAUNCHER = textwrap.dedent("""
    # like torchrun: starts the training process, reports its failure as 1; SIGUSR1 is ignored (inherited)
    import subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    print("launcher: worker exited", worker.wait(), flush=True)
    sys.exit(1)
""")
FAKE_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    def stop(signum, frame):
        Path(os.environ["JOB_EXIT_DIR"], "rank-0").write_text("75")  # checkpointed: as report_exit_code does
        sys.exit(75)
    signal.signal(signal.SIGUSR1, stop)
    print("worker: ready", flush=True)
    time.sleep(60)
""")


def test_stop_signal_reaches_the_training_process_not_the_launcher(monkeypatch, capfd):
    """SIGUSR1 to `job run` goes to the training process, while the launcher (SIGUSR1 would kill torchrun)
    survives to report its exit; the process's own code, 75, wins over the launcher's 1."""
    monkeypatch.setattr(launch, "command", lambda s, t: [sys.executable, "-c", FAKE_LAUNCHER, FAKE_WORKER])
    s = settings()
    t = launch.resolve(s, {}, gpus=0)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        assert launch.run_training(s, t) == errors.EXIT_PREEMPTED
    finally:
        timer.cancel()
    out = capfd.readouterr().out
    assert "worker: ready" in out and "launcher: worker exited 75" in out, out
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


def test_a_stop_signal_a_library_swallows_still_stops_the_next_stage():
    """Between stages the handler raises where the main thread is; a library's `except Exception` there (the
    flaky CI run of 2026-12-07: `job run` exited 0 after SIGUSR1 while merging) must not lose the signal."""
    with stopping.stop_on_signals() as signals:
        signals.check()  # nothing received: no stop
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)  # the handler runs in the main thread between bytecodes, here
        except Exception:  # what some library code does around its own work
            pass
        with pytest.raises(errors.Preempted, match="SIGUSR1"):
            signals.check()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


def test_once_job_run_ends_with_an_error_a_stop_signal_no_longer_kills_it(capfd):
    """Two Slurm nodes exit 75 at once; the first to exit makes srun SIGTERM the other, which is still on its way
    out: it died by the signal (143), and the requeue rule read a failure."""
    with pytest.raises(SystemExit):
        with stopping.stop_on_signals():
            raise SystemExit(errors.EXIT_PREEMPTED)
    os.kill(os.getpid(), signal.SIGTERM)  # would end the test run with the default handler back in place
    time.sleep(0.1)
    assert signal.getsignal(signal.SIGTERM) is stopping.exiting


def test_training_process_that_fails_before_training_reports_its_exit_code(monkeypatch, capfd):
    """A training process stopped by a bad setting while it reads its settings exits 2; the launcher reports
    that as 1, `job run` still returns 2 (bad input: never retried)."""
    worker = 'from job.cli import main; main(["train", "--max-steps", "many"])'
    monkeypatch.setattr(launch, "command", lambda s, t: [sys.executable, "-c", FAKE_LAUNCHER, worker])
    s = settings()
    assert launch.run_training(s, launch.resolve(s, {}, gpus=0)) == errors.EXIT_BAD_INPUT
    out = capfd.readouterr().out
    assert "launcher: worker exited 2" in out, out


# ------------------------------------------------------------------------------ shipped configurations

def test_packaged_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    for strategy in config.FIELDS["strategy"].metadata["choices"]:
        assert load_config_from_file(str(launch.CONFIGS / f"{strategy}.yaml")).compute_environment.value == (
            "LOCAL_MACHINE")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_configs_parse_and_zero3_shards_at_load(stage, monkeypatch, tmp_path):
    """The SFTConfig reads the DeepSpeed config that `accelerate launch` names; under ZeRO-3 it must also turn on
    sharded loading, which is why job/train.py builds it before loading the model."""
    pytest.importorskip("deepspeed")
    from transformers.integrations import is_deepspeed_zero3_enabled
    from trl import SFTConfig

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(launch.CONFIGS / f"{stage}.json"))
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,deepspeed_multinode_launcher")
    if stage == "zero3":
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true")
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     bf16=False, report_to="none")
    try:
        assert args.deepspeed_plugin.zero_stage == int(stage[-1])
        assert is_deepspeed_zero3_enabled() == (stage == "zero3")
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def test_strategy_is_part_of_the_run_identity():
    # checkpoints of one strategy cannot be resumed by another: OUTPUT_DIR refuses the change by name
    assert config.FIELDS["strategy"].metadata["identity"]
    assert not any(config.FIELDS[name].metadata["identity"] for name in launch.LAYOUT)


def _sbatch_variables() -> set[str]:
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", (ROOT / "slurm" / "train.sbatch").read_text()))


def test_slurm_env_file_names_only_known_variables():
    names = set()
    for line in (ROOT / "slurm" / "job.env").read_text().splitlines():
        match = re.match(r"\s*#?\s*([A-Z][A-Z0-9_]*)=", line)
        if match:
            names.add(match.group(1))
    unknown = sorted(n for n in names if not launch.known_variable(n) and n not in _sbatch_variables())
    assert not unknown, f"slurm/job.env names variables neither the job nor train.sbatch reads: {unknown}"
    assert {"OUTPUT_DIR", "JOB_RUNTIME", "STRATEGY"} <= names


def test_sbatch_script_has_the_preemption_and_multi_node_parts():
    text = (ROOT / "slurm" / "train.sbatch").read_text()
    for part in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST"', "scontrol requeue", "logs/slurm-%j-node%n.out",
                 "--container-image=", "apptainer exec --nv"):
        assert part in text, part
    assert f"@{launch.SHUTDOWN_GRACE}" in text  # the signal comes as early as the job's grace to checkpoint


def test_preflight_prints_the_layout_it_found(tmp_path, hf_home):

    cpu_step = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_GPUS_ON_NODE"}
    result = run_job(hf_home, "preflight", OUTPUT_DIR=tmp_path / "o", **cpu_step)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout[result.stdout.index("{"): result.stdout.rindex("}") + 1])
    layout = plan["launch"]
    assert (layout["machines"], layout["machine_rank"], layout["processes_per_machine"], layout["world_size"]) == (
        2, 1, 1, 2)  # no GPU here: one process per machine
    assert layout["main"].startswith("gpu07:") and layout["from"]["machine_rank"] == "slurm"
    assert layout["command"][1:3] == ["-m", "torch.distributed.run"] and "--node-rank" in layout["command"]


def test_a_second_ctrl_c_kills_training_and_says_so(caplog):
    """The first Ctrl-C asks training to checkpoint; a second one kills it at once, and says so (it was silent)."""
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout.readline().strip() == "ready"
    stop = stopping.Stopper(child, launcher=False)
    stop.request(signal.SIGINT, None)  # forwarded as SIGTERM, which this "training" ignores
    assert child.poll() is None
    stop.request(signal.SIGINT, None)
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert "second Ctrl-C: killing training now, without a checkpoint" in caplog.text
