"""What machine 0 is doing, told to the machines that wait for it.

On several machines, machine 0 checks the settings, model and data and tokenizes the whole data set before its
training processes join the rendezvous; the others' training processes wait there (up to 30 minutes) and would say
nothing. Machine 0 writes its stage to OUTPUT_DIR/stage.json (shared storage, as every machine's OUTPUT_DIR is)
as it goes, tokenizing progress included; each other machine's `job run` reads it while it waits and logs it when
it changes, and every minute while it does not:

    waiting for machine 0: tokenizing the training data, 340,000 of 1,000,000 rows (for 5m12s)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FILE_VARIABLE = "JOB_STAGE_FILE"  # set by machine 0's `job run`; its child processes inherit it
PROGRESS_EVERY_S = 10.0  # tokenizing progress is written at most this often
REPEAT_EVERY_S = 60.0  # an unchanged stage is logged again this often by a waiting machine

_last_progress = 0.0


def announce(stage: str, done: int | None = None, total: int | None = None) -> None:
    """Machine 0: `stage` begins (or has got `done` of `total` along); nothing where no stage file is set."""
    path = os.environ.get(FILE_VARIABLE)
    if not path:
        return
    record = {"stage": stage, "done": done, "total": total, "since": time.time(), "host": os.uname().nodename}
    previous = read(Path(path))
    if previous and previous.get("stage") == stage:
        record["since"] = previous["since"]  # progress within one stage keeps its start
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record), encoding="utf-8")
        tmp.replace(path)  # readers see the old record or the new one, never half of one
    except OSError:
        tmp.unlink(missing_ok=True)  # telling the others is best effort: a full disk is preflight's to report


def progress(stage: str, done: int, total: int) -> None:
    """`announce` for a long loop: written at most every PROGRESS_EVERY_S, and at the end."""
    global _last_progress
    now = time.monotonic()
    if done < total and now - _last_progress < PROGRESS_EVERY_S:
        return
    _last_progress = now
    announce(stage, done, total)


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe(record: dict, now: float | None = None) -> str:
    elapsed = int((now or time.time()) - record["since"])
    text = record["stage"]
    if record.get("total"):
        text += f", {record['done']:,} of {record['total']:,} rows"
    return f"{text} (for {elapsed // 60}m{elapsed % 60:02d}s)"


class Follower:
    """A waiting machine's view of stage.json: `poll()` gives a line to log when the stage changed, or when it has
    stayed the same for REPEAT_EVERY_S (training excepted: once the rendezvous is met there is nothing to wait for)."""

    def __init__(self, path: Path):
        self.path, self.seen, self.logged_at = path, None, 0.0

    def poll(self, now: float | None = None) -> str | None:
        now = now or time.time()
        record = read(self.path)
        if record is None:
            return None
        key = (record["stage"], record.get("done"), record["since"])
        if key == self.seen and (record["stage"] == "training" or now - self.logged_at < REPEAT_EVERY_S):
            return None
        self.seen, self.logged_at = key, now
        return f"waiting for machine 0 ({record.get('host', '?')}): {describe(record, now)}"
