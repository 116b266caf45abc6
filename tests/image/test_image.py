"""The product image, built from the repo's Dockerfile and run daemonless.

The CPU variant of the image (same Dockerfile, BASE_IMAGE=a local Debian bookworm made with
debootstrap, TORCH_SPEC=the CPU torch wheel) is built with buildah (chroot isolation, vfs storage)
by image/build-test.sh, then run with `buildah run`, as `docker run IMAGE ...` would run it.

Run: make image-test   (or: bash image/deps.sh && .venv/bin/python -m pytest -q -m image tests/image)
Needs root and the CPU torch wheel (image/common.sh: TORCH_CPU_WHEEL); skipped otherwise.
IMAGE_TEST_REUSE=1 skips the build when localhost/job:test exists (quick reruns while editing tests).
IMAGE_TEST_MAX_STEPS (default 3) caps the tiny job (steps, samples, eval rows); 0 runs the untouched defaults.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.image, pytest.mark.nightly]

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "image"
TAG = os.environ.get("TEST_IMAGE", "localhost/job:test")
WHEEL = Path(os.environ.get("TORCH_CPU_WHEEL", "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"))
ENV = {**os.environ, "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
BUILDAH = ["buildah", "--storage-driver", "vfs"]
MAX_STEPS = int(os.environ.get("IMAGE_TEST_MAX_STEPS", "3"))
STEP_LINE = re.compile(r"step (\d+)/\d+ loss=")
EXIT_PREEMPTED = 75

if os.geteuid() != 0:
    pytestmark = [*pytestmark, pytest.mark.skip(reason="image build needs root (buildah chroot, vfs)")]
elif not WHEEL.is_file():
    pytestmark = [*pytestmark, pytest.mark.skip(reason=f"CPU torch wheel missing: {WHEEL}")]


def _sh(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    reuse = os.environ.get("IMAGE_TEST_REUSE") and _sh([*BUILDAH, "inspect", "--type", "image", TAG],
                                                       check=False).returncode == 0
    if not reuse:
        log = tmp_path_factory.mktemp("build") / "build-test.log"
        with open(log, "w") as out:
            code = subprocess.run(["bash", str(IMAGE_DIR / "build-test.sh")], env=ENV, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=1500).returncode
        if code != 0:
            pytest.fail(f"image/build-test.sh exited {code}:\n{log.read_text(errors='replace')[-6000:]}")
    return TAG


@pytest.fixture(scope="module")
def config(image) -> dict:
    """The image's OCI config (User, Env, Entrypoint, Cmd, Labels, ...)."""
    data = json.loads(_sh([*BUILDAH, "inspect", "--type", "image", image]).stdout)
    return data["OCIv1"]["config"]


@pytest.fixture(scope="module")
def container(image):
    """One working container for the module (vfs: creating one copies the whole image)."""
    name = "job-image-test"
    _sh([*BUILDAH, "rm", name], check=False, timeout=900)  # left over by an interrupted run
    _sh([*BUILDAH, "from", "--pull=never", "--name", name, image], timeout=900)
    yield name
    _sh([*BUILDAH, "rm", name], check=False, timeout=900)


def run(container: str, *cmd: str, env: dict | None = None, volumes: dict | None = None,
        user: str | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`buildah run` with the image's own user, env and workdir unless given."""
    args = [*BUILDAH, "run", "--isolation", "chroot"]
    for k, v in (env or {}).items():
        args += ["-e", f"{k}={v}"]
    for host, inside in (volumes or {}).items():
        args += ["-v", f"{host}:{inside}"]
    if user:
        args += ["--user", user]
    return _sh([*args, container, "--", *cmd], timeout=timeout, check=check)


def image_uid(container: str) -> int:
    return int(run(container, "id", "-u").stdout.strip())


def output_dir(tmp_path: Path, uid: int) -> Path:
    """Mounted storage as an operator prepares it: owned by the image's user."""
    out = tmp_path / "output"
    out.mkdir()
    os.chown(out, uid, uid)
    return out


def job_settings() -> dict:
    """The default job (built-in tiny Llama, bundled data, every stage) with its length capped so
    the image tier stays within a few minutes on 2 cores; IMAGE_TEST_MAX_STEPS=0 lifts the caps."""
    settings = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if MAX_STEPS > 0:
        settings.update(MAX_STEPS=str(MAX_STEPS), SAMPLE_PROMPTS="1", MAX_NEW_TOKENS="16",
                        MAX_EVAL_SAMPLES="16")
    return settings


# ---------------------------------------------------------------------------------------------


def test_help_through_the_entrypoint(config, container):
    """`docker run IMAGE --help`: ENTRYPOINT + the argument."""
    result = run(container, *config["Entrypoint"], "--help")
    assert "Usage: job" in result.stdout
    assert "run" in result.stdout and "preflight" in result.stdout
    assert run(container, "python", "-m", "job", "--help").stdout == result.stdout


def test_default_command_is_help(config):
    assert config["Entrypoint"][-1] == "job"
    assert config.get("Cmd") == ["--help"]


def test_entrypoint_is_tini_forwarding_to_the_process_group(config, container):
    entry = config["Entrypoint"]
    assert entry[0].endswith("/tini") and "-g" in entry and entry[entry.index("--") + 1] == "job"
    assert "tini version" in run(container, entry[0], "--version").stdout


def test_runs_as_a_non_root_user(config, container):
    assert config.get("User") not in (None, "", "0", "root")
    uid = image_uid(container)
    assert uid != 0
    assert run(container, "id", "-un").stdout.strip() == config["User"]
    # the data mount points belong to it; the venv does not (read-only for the job)
    owners = run(container, "stat", "-c", "%u %n", "/data", "/data/hf", "/data/output", "/opt/venv").stdout
    assert owners.split("\n")[:3] == [f"{uid} /data", f"{uid} /data/hf", f"{uid} /data/output"]
    assert owners.split("\n")[3] == "0 /opt/venv"


def test_environment_points_at_mounted_storage(config):
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HF_HOME"] == "/data/hf"
    assert env["OUTPUT_DIR"] == "/data/output"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_training_stack_imports(container):
    result = run(container, "python", "-c",
                 "import torch, bitsandbytes, trl, peft, transformers, job; print(torch.__version__)")
    assert result.stdout.strip().splitlines()[-1].startswith("2.13.0")


def test_pinned_versions_match_the_lock(container):
    """Every top-level requirement is installed, and everything installed that the lock names is at
    the locked version (constraints.txt; torch from requirements.txt, any local +cpu/+cu tag)."""
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
        return out

    top, lock = pins(REPO / "requirements.txt"), pins(REPO / "constraints.txt")
    listed = run(container, "python", "-m", "pip", "list", "--format=json", "--disable-pip-version-check").stdout
    installed = {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in json.loads(listed)}
    assert not [n for n in top if n not in installed], installed
    wrong = {n: (installed[n], v) for n, v in {**lock, **top}.items()
             if n in installed and installed[n].split("+")[0] != v}
    assert not wrong, f"installed vs lock: {wrong}"


def test_no_compilers_caches_or_build_inputs_in_the_final_image(container):
    result = run(container, "sh", "-c",
                 "for t in gcc cc g++ make; do command -v $t; done; "
                 "ls -d /src /wheels /lock /root/.cache/pip 2>/dev/null; "
                 "find / -xdev -name 'torch-*.whl' 2>/dev/null; true", user="0")
    assert result.stdout.strip() == "", result.stdout


def test_oci_labels(config):
    labels = config.get("Labels") or {}
    for key in ("version", "revision", "source", "created", "title"):
        assert labels.get(f"org.opencontainers.image.{key}"), (key, labels)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "-q", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    if head and not os.environ.get("IMAGE_TEST_REUSE"):
        assert labels["org.opencontainers.image.revision"] == head


def test_sigterm_through_tini_reaches_training_and_exits_75(config, container, tmp_path):
    """The scheduler's SIGTERM goes to tini (PID 1 under docker/k8s), which passes it to `job`'s
    process group; the launcher forwards it to training, which checkpoints and exits 75."""
    uid = image_uid(container)
    out = output_dir(tmp_path, uid)
    env = {**job_settings(), "MAX_STEPS": "200", "SAVE_STEPS": "1000", "LOGGING_STEPS": "1"}
    args = [*BUILDAH, "run", "--isolation", "chroot", "-v", f"{out}:/data/output"]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*args, container, "--", *config["Entrypoint"], "run"], env=ENV,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not STEP_LINE.search(log_path.read_text(errors="replace")):
            assert process.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "no training step within 600 s"
            time.sleep(0.5)
        tini = [pid for pid in _descendants(process.pid) if _comm(pid) == "tini"]
        assert tini, "tini not found under buildah run"
        os.kill(tini[0], signal.SIGTERM)
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    text = log_path.read_text(errors="replace")
    assert code == EXIT_PREEMPTED, text[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted", summary
    assert list(out.rglob("checkpoint-*")), sorted(out.rglob("*"))


def test_tiny_default_job_end_to_end_on_mounted_output(config, container, tmp_path):
    """`docker run -v STORAGE:/data/output IMAGE run`: the built-in tiny model and bundled data,
    all stages; the outputs land on the mount, written by the image's non-root user."""
    uid = image_uid(container)
    out = output_dir(tmp_path, uid)
    result = run(container, *config["Entrypoint"], "run", env=job_settings(),
                 volumes={str(out): "/data/output"}, timeout=1200, check=False)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done", summary
    files = list(out.rglob("*"))
    assert len(files) > 3, files
    not_ours = [str(p) for p in [out, *files] if p.lstat().st_uid != uid]
    assert not not_ours, f"not owned by uid {uid}: {not_ours[:10]}"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
