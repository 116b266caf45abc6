"""Init process of one "machine" in a network namespace (tests/netns.py's node_argv starts it for the Slurm
harness's nodes, tests/test_k8s.py's pods and tests/test_interfaces.py's machines; not a test).

Runs inside the node's network namespace and its own mount + UTS namespaces:
    node_init.py HOSTS_FILE NODE_NAME -- COMMAND ARGS...   (slurmd, a pod's shell, `job preflight`)

* bind-mounts HOSTS_FILE over /etc/hosts (private to this mount namespace),
* sets the hostname to NODE_NAME (private UTS namespace),
* becomes a child subreaper, starts slurmd and reaps every orphan below it: slurmstepd
  daemonizes, so without this its zombies go to the machine's init (which here reaps
  them only about once a second),
* forwards SIGTERM/SIGINT to slurmd; exits once slurmd and everything below it is gone.
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    hosts, node, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        print(__doc__, file=sys.stderr)
        return 2
    subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
    socket.sethostname(node)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    child = os.fork()
    if child == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)

    child_alive = True

    def forward(signum, _frame):
        if child_alive:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    rc = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return rc
        if pid == child:
            child_alive = False
            rc = os.waitstatus_to_exitcode(status)
            rc = rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
