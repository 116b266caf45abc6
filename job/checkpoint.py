"""OUTPUT_DIR's layout, complete-or-absent directories, checkpoint retention and run identity.

A directory (checkpoint, adapter, merged model) counts only once its COMPLETE marker exists. It is
written under a staging name, fsynced, marked, then renamed into place, so a kill -9, node loss or
full disk mid-write leaves either the previous state or the finished one, never a broken "latest".
COMPLETE lists each file's size and SHA-256, so damage done later (a file truncated or changed by a
storage fault or by hand) is found before a checkpoint or the adapter is used (`damage`), and the
damaged directory is moved aside, never deleted (`set_aside_if_damaged`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from job.config import FIELDS, process_counts
from job.errors import ConfigError, Refused, StorageError

log = logging.getLogger("job.checkpoint")

COMPLETE = "COMPLETE"
BATCH = "batch.json"  # in each checkpoint: its global batch and the layouts it was trained under (resume_batch)
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# How long a run waits for the lock of a run that is still stopping: a requeued Slurm job or a replacement pod can
# start while the old one checkpoints (launch.SHUTDOWN_GRACE, the pod's terminationGracePeriodSeconds: 300 s).
LOCK_WAIT = 330
LOCK_WAIT_VARIABLE = "JOB_LOCK_WAIT"


@dataclass(frozen=True)
class Layout:
    """Where each artifact lives under OUTPUT_DIR (documented in the README; scripts rely on it)."""

    root: Path

    @property
    def lock(self) -> Path:  # flock-ed by the one `job` process that owns the directory; names it
        return self.root / "job.lock"

    @property
    def run(self) -> Path:  # the resolved settings and data fingerprint this directory belongs to
        return self.root / "run.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def staging(self) -> Path:
        return self.root / "checkpoints" / ".staging"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def stage(self) -> Path:  # what machine 0 is doing, for the machines that wait for it (job.stagefile)
        return self.root / "stage.json"

    @property
    def metrics(self) -> Path:  # per-stage results: train.json, evaluate.json, merge.json, push.json
        return self.root / "metrics"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def _fsync_and_list(path: Path) -> dict[str, list]:
    """fsync every file under `path`; relative path -> [size, sha256] of each."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
            files[file.relative_to(path).as_posix()] = [os.fstat(handle.fileno()).st_size,
                                                        hashlib.file_digest(handle, "sha256").hexdigest()]
    _fsync_dir(path)
    return files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(staging: Path, final: Path) -> Path:
    """Make `staging` durable, mark it complete (with its files' sizes and checksums) and move it to `final`
    (replacing an older one)."""
    files = _fsync_and_list(staging)
    (staging / COMPLETE).write_text(json.dumps({"files": files}, indent=1) + "\n")
    _fsync_dir(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    _fsync_dir(final.parent)
    return final


def damage(path: Path) -> str | None:
    """What is wrong with the sealed directory `path`: a file missing, or cut short or changed since it was sealed;
    None when it is intact (or was sealed before COMPLETE listed its files, and cannot be checked)."""
    try:
        files = json.loads((path / COMPLETE).read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return None
    except OSError as error:
        return f"{path / COMPLETE}: {error.strerror}"
    for name, (size, digest) in files.items():
        file = path / name
        try:
            with open(file, "rb") as handle:
                found = os.fstat(handle.fileno()).st_size
                if found != size:
                    return f"{file} has {found} bytes, {size} when it was sealed"
                if hashlib.file_digest(handle, "sha256").hexdigest() != digest:
                    return f"{file} changed since it was sealed (its checksum differs)"
        except OSError as error:
            return f"{file}: {error.strerror}"
    return None


def set_aside_if_damaged(path: Path) -> str | None:
    """If the sealed directory `path` is damaged, move it aside (named so that nothing reads it as a checkpoint or
    the adapter again; never deleted) and say what was wrong and where it went; else None."""
    why = damage(path) if is_complete(path) else None
    if why is None:
        return None
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(aside)
    log.warning("%s is damaged: %s. Moved aside to %s", path, why, aside)
    return f"{why}; moved aside to {aside}"


def intact(path: Path) -> bool:
    """Whether `path` is sealed and undamaged; a damaged one is moved aside first (set_aside_if_damaged)."""
    return set_aside_if_damaged(path) is None and is_complete(path)


def write_json(path: Path, data, root: Path | None = None) -> None:
    """Write a JSON file atomically (temporary name, fsync, rename); a failed write leaves the old file alone and no
    temporary one behind (and, under OUTPUT_DIR `root`, a full disk raises StorageError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with removed_on_failure(tmp, root):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)


STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                  errno.EROFS: "the file system became read-only"}
# torch.save's C++ writer reports a failed write without its errno
TORCH_WRITE_FAILURES = ("basic_ios::clear", "PytorchStreamWriter failed", "file write failed")
NEARLY_FULL = 16 * 2**20  # bytes free under which a write that failed without saying why is taken for a full disk


@contextlib.contextmanager
def removed_on_failure(path: Path, root: Path | None = None):
    """Write `path` (a temporary file or staging directory) in the block; if the block fails, remove it, so nothing
    half-written stays behind and a full disk gets its space back. Under OUTPUT_DIR `root`, a failure that comes
    from the storage itself becomes StorageError naming the disk (exit 2, not 1 with a C++ message)."""
    try:
        yield
    except BaseException as error:
        # (whether the disk is full is read before the space is given back)
        problem = storage_problem(error, root) if root is not None and isinstance(error, Exception) else None
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        if problem:
            raise StorageError(f"OUTPUT_DIR={root}: {problem} while writing {path.name}. Nothing of it was kept; "
                               "free space (or use a larger disk), then rerun: it resumes from the last complete "
                               "checkpoint") from error
        raise


def storage_problem(error: BaseException, root: Path) -> str | None:
    """What is wrong with OUTPUT_DIR's storage if `error` (or what it was raised from) comes from it, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return f"{STORAGE_ERRNOS[error.errno]} ({error.strerror})"
        if isinstance(error, RuntimeError) and any(text in str(error) for text in TORCH_WRITE_FAILURES):
            with contextlib.suppress(OSError):
                usage = shutil.disk_usage(root)
                if usage.free < NEARLY_FULL:
                    return f"the disk is full ({usage.free // 2**20} MiB free of {usage.total // 2**20} MiB)"
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def step_of(path: Path) -> int:
    return int(CHECKPOINT.match(path.name).group(1))


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are not listed."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and CHECKPOINT.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(directory: Path) -> Path | None:
    complete = complete_checkpoints(directory)
    return complete[-1] if complete else None


def latest_intact_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint that is undamaged; newer damaged ones are moved aside (with a warning naming
    the bad file), so a resume falls back to the one before instead of failing on it at every rerun."""
    for path in reversed(complete_checkpoints(directory)):
        if intact(path):
            return path
    return None


def rotate(directory: Path, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`, and incomplete ones older than the newest.

    Incomplete checkpoints never count towards `keep`, and the newest complete one is never deleted.
    """
    complete = complete_checkpoints(directory)
    doomed = complete[: max(0, len(complete) - max(keep, 1))]
    if complete:
        newest = step_of(complete[-1])
        doomed += [p for p in directory.iterdir()
                   if p.is_dir() and CHECKPOINT.match(p.name) and not is_complete(p) and step_of(p) < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def claim(layout: Layout, identity: dict, batch: dict | None = None) -> None:
    """Record which run owns OUTPUT_DIR; refuse to resume someone else's checkpoints with new settings, or
    checkpoints whose run.json is gone or damaged (their settings are unknown: it is never written over them).

    `batch` (config.batch_layout: the global batch and the layout making it now; None keeps the one recorded) is
    recorded beside the identity but not compared: the layout may change between resumes, and resume_batch checks
    the global batch against the checkpoint's own record."""
    try:
        recorded = json.loads(layout.run.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        recorded, why = None, "is missing" if isinstance(error, FileNotFoundError) else f"cannot be read ({error})"
    else:
        why = None if isinstance(recorded, dict) else f"holds {type(recorded).__name__}, not settings"
    recorded_batch = recorded.pop("batch", None) if not why else None
    if not why:  # a setting added since run.json was written counts as its default: older runs keep resuming
        recorded = {**{k: FIELDS[k].default for k in identity if k in FIELDS and k not in recorded}, **recorded}
    checkpoints = complete_checkpoints(layout.checkpoints)
    if why and checkpoints:
        raise Refused(f"{layout.run} {why}, but OUTPUT_DIR holds checkpoints: run.json records the settings they were "
                      "made with, so they cannot be resumed without it. Restore it, or use a new OUTPUT_DIR")
    if not why and (checkpoints or is_complete(layout.adapter)) and recorded != identity:
        changed = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
        detail = ", ".join(f"{k.upper()}: {recorded.get(k)!r} -> {identity.get(k)!r}" for k in changed)
        raise Refused(f"OUTPUT_DIR={layout.root} holds checkpoints of a different run ({detail}); "
                      "use a new OUTPUT_DIR, or restore the settings to resume it")
    batch = batch or recorded_batch  # (None: nothing trains here, the recorded layout stands)
    if recorded != identity or recorded_batch != batch:
        write_json(layout.run, identity if batch is None else {**identity, "batch": batch})


def resume_batch(checkpoints: Path, batch: dict, *, strategy: str, allow_change: bool) -> dict:
    """The batch record of the run as it goes on from the newest checkpoint under `batch` (config.batch_layout),
    to be written into every checkpoint from here: the global batch and layout now, and `layouts`, each layout
    the run trained under and the step it started at.

    The global batch (rows per optimizer step) is what keeps the run the same across layouts: the seeded order of
    the rows does not depend on the layout, and the Trainer skips the optimizer steps already done, so equal
    rows per step land at the same data position. A different one is refused (Refused, exit 2) naming the
    GLOBAL_BATCH_SIZE that resumes it, unless `allow_change` (then logged and recorded in the layout's entry).
    Under a strategy other than ddp the optimizer state is sharded per rank: another world size is refused.
    Checkpoints written before the record existed resume as they always did."""
    latest = latest_checkpoint(checkpoints)
    step = step_of(latest) if latest else 0
    recorded = read_json(latest / BATCH) if latest else None
    entry = {"from_step": step, **batch}
    if not isinstance(recorded, dict):
        return {**batch, "layouts": [entry]}
    before = {k: recorded.get(k) for k in batch}
    if before == batch:
        return {**batch, "layouts": recorded.get("layouts", [])}
    where = f"{latest.name} was written with {_describe(before)}; this layout makes {_describe(batch)}"
    if batch["world_size"] != before["world_size"] and strategy != "ddp":
        raise Refused(f"{where}. STRATEGY={strategy} keeps the optimizer state sharded per process, so its "
                      f"checkpoints resume only on {before['world_size']} processes in all (NUM_PROCESSES x "
                      "NUM_MACHINES); only ddp resumes on another number")
    if batch["global_batch_size"] != before["global_batch_size"]:
        if not allow_change:
            wanted, per_pass = before["global_batch_size"], batch["micro_batch_size"] * batch["world_size"]
            counts = ", ".join(map(str, process_counts(wanted, batch["micro_batch_size"])))
            fits = "" if wanted % per_pass == 0 else (f" (it does not divide into {per_pass} rows a micro-step: run on "
                                                      f"{counts or 'another number of'} process(es) in all)")
            raise Refused(f"{where}, so the rows and the data position after the resume would not be the run's. Set "
                          f"GLOBAL_BATCH_SIZE={wanted} to resume it here{fits}, or ALLOW_BATCH_CHANGE=true to go "
                          f"on with {batch['global_batch_size']} rows per step")
        log.warning("%s: ALLOW_BATCH_CHANGE=true, so training goes on with the new global batch (the data position "
                    "after the resume is approximate)", where)
        entry["global_batch_size_before"] = before["global_batch_size"]
    else:
        log.info("%s: the same global batch, so the resume lands at the same data position", where)
    return {**batch, "layouts": [*recorded.get("layouts", []), entry]}


def _describe(batch: dict) -> str:
    return (f"{batch['world_size']} process(es) x MICRO_BATCH_SIZE={batch['micro_batch_size']} x "
            f"{batch['grad_accum']} accumulation = {batch['global_batch_size']} rows per optimizer step")


@contextlib.contextmanager
def own(layout: Layout, wait: float | None = None):
    """Hold OUTPUT_DIR's lock while the block runs: one `job run` (or single stage) per directory.

    An flock on OUTPUT_DIR/job.lock, which the kernel releases when the holder dies, even by SIGKILL: no stale-lock
    rule is needed on a local disk; on NFSv4 the server drops the lock of a dead client when its lease runs out
    (about 90 s), within `wait`. Lustre grants flock only when mounted with `-o flock` (else it fails with ENOSYS):
    the job then warns and runs without the lock. Yields the lock's file descriptor: training processes inherit it,
    so a directory stays owned until the last of them has exited.

    A lock held by someone else is waited for (JOB_LOCK_WAIT seconds, default LOCK_WAIT: a run being stopped is
    still checkpointing), then refused with ConfigError (exit 2: two jobs were given one OUTPUT_DIR)."""
    if wait is None:
        try:
            wait = float(os.environ.get(LOCK_WAIT_VARIABLE, LOCK_WAIT))
        except ValueError:
            raise ConfigError(f"{LOCK_WAIT_VARIABLE}={os.environ[LOCK_WAIT_VARIABLE]!r}: expected seconds") from None
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ConfigError(f"OUTPUT_DIR={layout.root}: not writable ({error.strerror})") from None
    try:
        if _acquire(fd, layout, wait):
            os.ftruncate(fd, 0)  # who holds it, for the message of a run refused here
            os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
                      .encode(), 0)
        yield fd
    finally:
        os.close(fd)  # releases the lock unless a training process still holds the inherited descriptor


def _acquire(fd: int, layout: Layout, wait: float) -> bool:
    """Take the lock within `wait` seconds; False where the file system has no locks (warned)."""
    deadline, warned = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                log.warning("OUTPUT_DIR=%s: its file system refuses locks (%s), so nothing stops a second job from "
                            "writing into it (Lustre: mount with -o flock)", layout.root, error.strerror)
                return False
        holder = _holder(layout)
        if time.monotonic() >= deadline:
            raise Refused(f"OUTPUT_DIR={layout.root} is in use by another job ({holder}); waited {wait:.0f} s "
                              f"for it to stop. One job per OUTPUT_DIR: stop it, or use another OUTPUT_DIR")
        if not warned:
            log.warning("OUTPUT_DIR=%s is in use by another job (%s); waiting up to %.0f s for it to stop",
                        layout.root, holder, wait)
            warned = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _holder(layout: Layout) -> str:
    try:
        return layout.lock.read_text(encoding="utf-8").strip() or "holder unknown"
    except OSError:
        return "holder unknown"
