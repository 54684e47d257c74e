"""``python -I -m den.ssh.sftp_worker``: the sftp subsystem of a workspace that
has no sftp server of its own.

Started as root on the host, it joins the workspace as ``crun exec`` would
(:mod:`den.ssh.join`: its cgroup and namespaces, a chroot to its root, the
user's ids and capabilities, its seccomp filter), then serves SFTP on
stdin/stdout. Everything is imported before the chroot; nothing from the host
is reachable after it.
"""

from __future__ import annotations

import argparse
import os

from den.ssh import join, sftp_server
from den.ssh.join import open_process

__all__ = ["main", "open_process"]


def main() -> None:
    p = argparse.ArgumentParser(prog="den-sftp-worker")
    join.add_arguments(p)
    p.add_argument("--home", required=True)
    args = p.parse_args()
    join.enter_from(args, "den-sftp-worker")
    os.umask(0o022)
    try:
        os.chdir(args.home)
    except OSError:
        os.chdir("/")
    sftp_server.Server(0, 1, args.home).serve()


if __name__ == "__main__":
    main()
