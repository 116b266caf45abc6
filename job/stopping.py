"""Stop signals (SIGTERM, SIGUSR1; SIGINT as SIGTERM): a preemption checkpoints and exits 75, a rerun resumes.

While training runs, `job run` passes them on to the training processes (`forwarding`), not to a launcher between
(torchrun dies of SIGUSR1), and the training child is tied to `job run` (`in_child`). Outside training, a stop
signal ends `job run` with exit 75 between stages (`stop_on_signals`), and once the exit code is decided it changes
nothing (`exiting`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

from job import errors

log = logging.getLogger("job.stopping")

RESEND_SECONDS = 30  # a stop signal is sent again while training runs, in case it came before the handler


class StageSignals:
    """Outside training (preflight, evaluation, merge, push) a stop signal ends `job run` at once with exit 75, the
    code a scheduler requeues on, instead of the signal's default death (SIGUSR1 is what Slurm's --signal sends
    before the time limit). Every stage writes into a staging directory and seals it, so the rerun redoes only the
    stage that was cut. `forwarding` puts its own handlers in place while training runs.

    The handler raises where the main thread happens to be, and a library's broad `except Exception` there can
    swallow it, so the signal is also remembered and `check` raises it again between stages."""

    def __init__(self):
        self.received: signal.Signals | None = None

    def preempt(self, signum, frame):
        self.received = signal.Signals(signum)
        self.check()

    def check(self) -> None:
        if self.received is not None:
            raise errors.Preempted(f"stopped by {self.received.name} outside training; rerun to finish "
                                   "(finished stages are kept)")


@contextlib.contextmanager
def stop_on_signals():
    signals = StageSignals()
    previous = {sig: signal.signal(sig, signals.preempt) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield signals
    except BaseException:
        # `job run` ends with this exception, its exit code decided. A stop signal from here to the exit (srun
        # stopping this machine because another one exited first, 75 too) must not make it die by that signal.
        for sig in previous:
            signal.signal(sig, exiting)
        raise
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def exiting(signum, frame) -> None:
    """The stop-signal handler once the exit code is decided: the signal changes nothing. A handler, not SIG_IGN:
    an ignored signal would stay ignored in processes started later."""
    log.info("received %s while exiting; the exit code stands", signal.Signals(signum).name)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def in_child(parent: int, launcher: bool) -> None:
    """Run in the child between fork and exec: tie it to `job run`, and keep SIGUSR1 from killing a launcher."""
    # The child runs in a session of its own (a Ctrl-C reaches only `job run`, which forwards it), so nothing else
    # ends it if `job run` dies by SIGKILL: the kernel sends it SIGTERM then, and it checkpoints and stops as on a
    # preemption (torchrun passes SIGTERM on to the training processes) instead of training on beside a rerun.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # `job run` died before the line above
            os._exit(errors.EXIT_PREEMPTED)
    # SIGUSR1 (Slurm's --signal) would kill torchrun, which has no handler for it; ignored there, it is
    # inherited as ignored until the training process installs its own handler (GuardCallback).
    if launcher:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class Stopper:
    """Passes stop signals to the training processes (not to the launcher between, which would kill them)."""

    def __init__(self, child: subprocess.Popen, launcher: bool):
        self.child, self.launcher = child, launcher
        self.signum = 0
        self.sent_at = 0.0
        self.forced = False

    def request(self, signum, frame):
        if signum == signal.SIGINT and self.signum:  # a second Ctrl-C: stop now, no checkpoint
            log.warning("second Ctrl-C: killing training now, without a checkpoint (a rerun resumes from the last one)")
            self.forced = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGKILL)
            return
        forward = signal.SIGTERM if signum == signal.SIGINT else signum
        log.warning("received %s: asking training to checkpoint and stop", signal.Signals(signum).name)
        self.signum = self.signum or forward
        self._send()

    def wait(self, every_second=None) -> int:
        """The child's exit code once it has exited; meanwhile a stop signal is sent again every RESEND_SECONDS,
        and `every_second()` is called about once a second."""
        while True:
            try:
                return self.child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.resend()
                if every_second:
                    every_second()

    def resend(self):
        if self.signum and not self.forced and time.monotonic() - self.sent_at > RESEND_SECONDS:
            self._send()

    def _send(self):
        self.sent_at = time.monotonic()
        for pid in self.training_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, self.signum)

    def training_processes(self) -> list[int]:
        if not self.launcher:
            return [self.child.pid]
        import psutil

        try:
            return [p.pid for p in psutil.Process(self.child.pid).children()]
        except psutil.Error:
            return []


@contextlib.contextmanager
def forwarding(child: subprocess.Popen, launcher: bool):
    """While training runs: stop signals go to the training processes (Stopper); the handlers found are put back
    after. `launcher`: a launcher (accelerate, torchrun) stands between `job run` and them."""
    stop = Stopper(child, launcher)
    previous = {sig: signal.signal(sig, stop.request) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
