"""OUTPUT_DIR's layout, complete-or-absent directories, checkpoint retention and run identity.

A directory (checkpoint, adapter, merged model) counts only once its COMPLETE marker exists. It is
written under a staging name, fsynced, marked, then renamed into place, so a kill -9, node loss or
full disk mid-write leaves either the previous state or the finished one, never a broken "latest".
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from job.errors import ConfigError

COMPLETE = "COMPLETE"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Layout:
    """Where each artifact lives under OUTPUT_DIR (documented in the README; scripts rely on it)."""

    root: Path

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
    def metrics(self) -> Path:  # per-stage results: train.json, evaluate.json, merge.json, push.json
        return self.root / "metrics"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(staging: Path, final: Path) -> Path:
    """Make `staging` durable, mark it complete and move it to `final` (replacing an older one)."""
    _fsync_tree(staging)
    (staging / COMPLETE).write_text("ok\n")
    _fsync_dir(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    _fsync_dir(final.parent)
    return final


def write_json(path: Path, data) -> None:
    """Write a JSON file atomically (temporary name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


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


def claim(layout: Layout, identity: dict) -> None:
    """Record which run owns OUTPUT_DIR; refuse to resume someone else's checkpoints with new settings."""
    recorded = read_json(layout.run)
    has_work = bool(complete_checkpoints(layout.checkpoints)) or is_complete(layout.adapter)
    if recorded and has_work and recorded != identity:
        changed = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
        detail = ", ".join(f"{k.upper()}: {recorded.get(k)!r} -> {identity.get(k)!r}" for k in changed)
        raise ConfigError(f"OUTPUT_DIR={layout.root} holds checkpoints of a different run ({detail}); "
                          "use a new OUTPUT_DIR, or restore the settings to resume it")
    if recorded != identity:
        write_json(layout.run, identity)
