"""Kubernetes without a cluster: every overlay under k8s/ builds with `kubectl kustomize`, validates offline
against pinned Kubernetes schemas (kubernetes-validate), sets only variables the job reads, and has the
policies the job relies on. Then the multi-node overlay's pods run as processes, each in its own network
namespace, mount namespace and host name, with the volumes mounted where the manifest says, the
headless Service's names resolving as cluster DNS would, and exactly the command (the image's
entrypoint plus the manifest's args) and environment (the image's, the ConfigMap's, the manifest's and
what the kubelet adds) the manifests give them; they train the tiny default together.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from job import config, launch
from tests import netns
from tests.netns import node_argv, write_hosts

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")  # schemas bundled with the pinned kubernetes-validate
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def build(path: Path | str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def the_job(docs: list[dict]) -> dict:
    (job,) = of_kind(docs, "Job")
    return job


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The variables a container gets from the manifests: envFrom ConfigMaps, then env (which wins)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) <= {"configMapRef", "prefix"}, f"only ConfigMaps can be checked: {source}"
        env.update(maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        ref = item.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            env[item["name"]] = maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        else:
            assert not ref, f"unsupported valueFrom in {item}"
            env[item["name"]] = item.get("value", "")
    return env


def unknown_variables(docs: list[dict]) -> list[str]:
    names = set()
    for job in of_kind(docs, "Job"):
        for container in job["spec"]["template"]["spec"]["containers"]:
            names |= set(container_env(docs, container))
    return sorted(n for n in names if not launch.known_variable(n))


# ------------------------------------------------------------------------------------ manifests

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates(overlay, version):
    import kubernetes_validate

    docs = build(K8S / "overlays" / overlay)
    assert {d["kind"] for d in docs} >= {"Job", "ConfigMap", "PersistentVolumeClaim"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any unknown or malformed field


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_set_only_variables_the_job_reads(overlay):
    docs = build(K8S / "overlays" / overlay)
    assert not unknown_variables(docs), "variables the job does not read (a typo, or a setting that went away)"
    # and the check does catch one
    job = the_job(docs)
    job["spec"]["template"]["spec"]["containers"][0].setdefault("env", []).append({"name": "LERNING_RATE",
                                                                                    "value": "1e-4"})
    of_kind(docs, "ConfigMap")[0]["data"]["MAX_STEP"] = "10"
    assert unknown_variables(docs) == ["LERNING_RATE", "MAX_STEP"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_policies(overlay):
    docs = build(K8S / "overlays" / overlay)
    job = the_job(docs)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    rules = spec["podFailurePolicy"]["rules"]
    exit_rules = {(r["action"], tuple(r["onExitCodes"]["values"])) for r in rules if "onExitCodes" in r}
    # bad input, a non-finite loss, a bad merge, out of GPU memory: never retried; only a requeue is free
    assert exit_rules == {("FailJob", (2, 3, 4, 6)), ("Ignore", (75,))}
    assert all(r["onExitCodes"]["containerName"] == container["name"] for r in rules if "onExitCodes" in r)
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0
    assert pod["terminationGracePeriodSeconds"] >= launch.SHUTDOWN_GRACE  # time to finish a step and checkpoint
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"  # not the runtime's 64 MiB
    env = container_env(docs, container)
    claim = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    for variable in ("OUTPUT_DIR", "HF_HOME"):  # on the volume, so a new pod resumes and reuses downloads
        path = Path(env[variable])
        mount = next(m for m in mounts if path.is_relative_to(m))
        assert "persistentVolumeClaim" in mounts[mount], (variable, mount)
    token = Path(env["HF_TOKEN_FILE"])
    assert mounts[str(token.parent)]["secret"]["optional"] is True  # only a push needs it
    assert {p["metadata"]["name"] for p in of_kind(docs, "PersistentVolumeClaim")} == claim
    assert "kueue.x-k8s.io/queue-name" in (K8S / "base" / "job.yaml").read_text()  # one line to uncomment


def test_multi_node_overlay_is_an_indexed_job_behind_a_headless_service():
    docs = build(K8S / "overlays" / "multi-node")
    job = the_job(docs)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    env = container_env(docs, pod["containers"][0])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NUM_MACHINES"]) >= 2
    (service,) = of_kind(docs, "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert any(p["port"] == launch.DEFAULT_PORT for p in service["spec"]["ports"])
    (claim,) = of_kind(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node writes to it
    # what the job makes of pod 1's environment: machine 1 of 2, meeting pod 0 through the Service
    name = job["metadata"]["name"]
    s = config.load({}, environ=env)
    where = launch.resolve(s, {**env, "JOB_COMPLETION_INDEX": "1"}, gpus=1, bf16=True, hostname=f"{name}-1",
                           fqdn=f"{name}-1.{pod['subdomain']}.default.svc.cluster.local")
    assert (where.num_machines, where.machine_rank, where.main_address) == (
        2, 1, f"{name}-0.{pod['subdomain']}.default.svc.cluster.local")


def test_a_name_prefix_renames_the_subdomain_with_the_service(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / "multi-node", tmp_path)], "namePrefix": "team-"}))
    docs = build(tmp_path)
    (service,) = of_kind(docs, "Service")
    assert service["metadata"]["name"] == "team-qlora"
    assert the_job(docs)["spec"]["template"]["spec"]["subdomain"] == "team-qlora"


# ------------------------------------------------------------------------- pods as processes

def _image() -> dict:
    """ENTRYPOINT, CMD, WORKDIR and ENV of the Dockerfile's final stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM "):]
    image = {"env": {}, "entrypoint": [], "cmd": [], "workdir": "/"}
    for line in final.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                image["env"][key] = value.replace("$PATH", CONTAINER_PATH)
        elif word in ("ENTRYPOINT", "CMD"):
            image[word.lower()] = json.loads(rest)
        elif word == "WORKDIR":
            image["workdir"] = rest.strip()
    return image


@contextlib.contextmanager
def mount_points(paths):
    """Directories to mount over inside the pods' mount namespaces; those missing on this machine are made
    (empty) and removed again."""
    made = []
    try:
        for path in sorted(set(paths)):
            missing = []
            p = Path(path)
            while not p.exists():
                missing.append(p)
                p = p.parent
            for directory in reversed(missing):
                directory.mkdir()
                made.append(directory)
        yield
    finally:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()


def pod_process(docs: list[dict], index: int, ns: str, hostname: str, hosts_file: Path, volumes_dir: Path,
                log: Path) -> subprocess.Popen:
    """Start pod `index` of the Indexed Job as the kubelet would, as far as the job can tell."""
    job = the_job(docs)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    image = _image()
    env = {**image["env"], **container_env(docs, container),
           # what the kubelet and the Job controller add
           "HOSTNAME": hostname, "JOB_COMPLETION_INDEX": str(index)}
    env["PATH"] = env["PATH"].replace("/opt/venv", str(ROOT / ".venv"))  # the image's venv is this checkout's
    command = container.get("command") or image["entrypoint"]
    args = container.get("args") if "args" in container else image["cmd"]
    if command[:1] == ["/usr/bin/tini"] and not Path("/usr/bin/tini").exists():
        command = command[command.index("--") + 1:]  # tini only forwards signals and reaps: not needed here
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = []
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:  # ReadWriteMany: the same directory in every pod
            source = volumes_dir / volume["persistentVolumeClaim"]["claimName"]
            source.mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(mount['mountPath'])}")
        else:  # emptyDir (medium Memory) and the optional Secret, absent here: an empty tmpfs
            mounts.append(f"mount -t tmpfs tmpfs {shlex.quote(mount['mountPath'])}")
    script = " && ".join([*mounts, f"cd {shlex.quote(container.get('workingDir', image['workdir']))}",
                          "exec env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "
                          + " ".join(shlex.quote(a) for a in [*command, *args])])
    with open(log, "wb") as out:
        return subprocess.Popen(node_argv(ns, hosts_file, hostname, ["/bin/sh", "-c", script]), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.skipif(netns.missing() is not None, reason=f"pods as processes: {netns.missing()}")
def test_multi_node_pods_train_together_as_processes(tmp_path):
    # the shipped overlay, with the run kept short (what a user's own overlay would do)
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / "multi-node", tmp_path / "overlay")],
        "configMapGenerator": [{"name": "qlora-settings", "behavior": "merge", "literals": [
            "MAX_STEPS=8", "SAVE_STEPS=4", "LOGGING_STEPS=2", "MAX_LENGTH=128", "MICRO_BATCH_SIZE=4",
            "EVAL_STEPS=1000", "REPORT_TO=none", "SAMPLE_PROMPTS=1", "MAX_NEW_TOKENS=8",
            "OMP_NUM_THREADS=1"]}]}))  # both "nodes" share this machine's cores
    docs = build(tmp_path / "overlay")
    assert not unknown_variables(docs)
    job = the_job(docs)
    name, subdomain = job["metadata"]["name"], job["spec"]["template"]["spec"]["subdomain"]
    count = job["spec"]["completions"]
    namespace = job["metadata"].get("namespace", "default")
    fqdn = [f"{name}-{i}.{subdomain}.{namespace}.svc.cluster.local" for i in range(count)]
    container = job["spec"]["template"]["spec"]["containers"][0]
    volumes_dir = tmp_path / "volumes"
    assert count == 2, "one veth pair joins two pods"
    with netns.veth_pair("k8s", 78) as pods, mount_points(m["mountPath"] for m in container["volumeMounts"]):
        procs = []
        for i, (ns, address, _) in enumerate(pods):
            # the kubelet's /etc/hosts (own line), plus cluster DNS for the other pods' names
            hosts = write_hosts(tmp_path / f"hosts-{i}", [(address, f"{fqdn[i]} {name}-{i}"), *(
                (a, f"{fqdn[j]} {name}-{j}.{subdomain}") for j, (_, a, _) in enumerate(pods) if j != i)])
            procs.append(pod_process(docs, i, ns, f"{name}-{i}", hosts, volumes_dir, tmp_path / f"pod-{i}.log"))
        try:
            codes = [p.wait(timeout=420) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    logs = {i: (tmp_path / f"pod-{i}.log").read_text(errors="replace") for i in range(count)}
    assert codes == [0] * count, "\n".join(f"=== pod {i}\n{text[-6000:]}" for i, text in logs.items())

    env = container_env(docs, container)
    output = volumes_dir / "qlora-data" / Path(env["OUTPUT_DIR"]).relative_to("/data")
    train = json.loads((output / "metrics" / "train.json").read_text())
    assert train["steps"] == 8
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "done" and f'"world_size": {count}' in logs[0]
    assert (output / "merged" / "COMPLETE").is_file()
    assert f"--nnodes {count} --node-rank 1" in logs[1] and f"--master-addr {fqdn[0]}" in logs[1]
    assert "machine 1 of 2: training only" in logs[1] and "merged model saved" not in logs[1]
    # while it waited at the rendezvous, pod 1 said what machine 0 was doing
    assert "waiting for machine 0 (" in logs[1], logs[1][-3000:]
    assert json.loads((output / "stage.json").read_text())["stage"] == "training"
    assert "merged model saved" in logs[0]
    assert (output / "logs" / "job-rank1.log").is_file()
