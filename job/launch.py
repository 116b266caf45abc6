"""Starting the training stage as its own process(es), with every setting passed in the environment.

Training runs in a child process even on one GPU: its memory is returned before the merge loads
the 16-bit model, and the parent stays free to forward signals and read the exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from job.config import FIELDS, Settings, env_name
from job.errors import EXIT_PREEMPTED

log = logging.getLogger("job.launch")


def settings_env(s: Settings) -> dict[str, str]:
    """The resolved settings as environment variables, which win over any CONFIG_FILE in the child."""
    return {env_name(f): "" if getattr(s, f.name) is None else str(getattr(s, f.name)) for f in FIELDS.values()}


def training_command(s: Settings) -> list[str]:
    return [sys.executable, "-m", "job", "train"]


def run_training(s: Settings) -> int:
    """Run the training stage to completion and return its exit code, forwarding stop signals."""
    env = {**os.environ, **settings_env(s)}
    env.pop("CONFIG_FILE", None)
    command = training_command(s)
    log.info("starting training: %s", " ".join(command))
    child = subprocess.Popen(command, env=env, start_new_session=True)

    def forward(signum, frame):
        log.warning("received %s: passing it to training", signal.Signals(signum).name)
        os.killpg(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:  # killed by a signal it did not handle: treat as preemption, a rerun resumes
        log.error("training was killed by %s", signal.Signals(-code).name)
        return EXIT_PREEMPTED
    return code
