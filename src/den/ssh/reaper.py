"""Run ``crun exec --detach`` and end as the process it started ended: with its exit
code, or killed by the same signal (so ssh can send ``exit-signal``, not 128+N).

``crun exec`` waits for its process itself and exits 128+N whether the process
was killed by signal N or exited with that code. Detached, crun returns once the
process runs, and the process is reparented to the nearest child subreaper above
it in the host's pid namespace: this one, which therefore ``waitid``s it and sees
its exact status. The den daemon is never the subreaper (every orphan of its
children would become its zombie), and this runs per session, in its own process.

Run as ``python -I -S reaper.py PID_FILE CRUN_ARGV...``; stdlib only, no den import
(-S: nothing of site-packages is loaded, which keeps it quick).
"""

import ctypes
import os
import resource
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
)


def wrap(pid_file: os.PathLike[str], argv: list[str]) -> list[str]:
    """The command line running ``argv`` (a ``crun exec --detach``) under this reaper."""
    return [sys.executable, "-I", "-S", __file__, os.fspath(pid_file), *argv]


def main() -> int:
    pid_file, argv = sys.argv[1], sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        os.execvp(argv[0], [a for a in argv if a != "--detach"])  # crun's own status, then
    ended: dict[int, tuple[int, int]] = {}  # pid: (si_code, si_status)
    target = 0
    pending: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        # The signals den sends the session (SIGHUP when the client left, ssh's
        # signal requests) before crun wrote the pid file wait for it; then go to
        # the process, which is this one's child until reaped, so its pid is its own.
        if target and target not in ended:
            os.kill(target, sig)
        elif not target:
            pending.append(sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    crun = os.posix_spawnp(argv[0], argv, os.environ, setsigdef=FORWARDED)
    while True:
        try:
            # Seen, recorded, then reaped: never signalled once its pid is free.
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # not seen: crun's process was never ours
            return 255
        if info is None:
            continue
        ended[info.si_pid] = (info.si_code, info.si_status)
        os.waitpid(info.si_pid, 0)
        if info.si_pid == crun:
            code, status = ended[crun]
            if code != os.CLD_EXITED or status != 0:  # crun failed: its own status
                return 128 + status if code != os.CLD_EXITED else status
            with open(pid_file) as f:
                target = int(f.read())
            for early in pending:
                if target not in ended:
                    os.kill(target, early)
        if target and target in ended:
            break
    code, status = ended[target]
    if code == os.CLD_EXITED:
        return status
    # Killed: end the same way (no core file of our own).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if status not in (signal.SIGKILL, signal.SIGSTOP):  # which keep their default anyway
        signal.signal(status, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [status])
    os.kill(os.getpid(), status)
    return 128 + status


if __name__ == "__main__":
    sys.exit(main())
