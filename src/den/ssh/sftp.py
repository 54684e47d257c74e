"""The sftp subsystem (scp uses it too): which server runs, inside the workspace.

The server always runs inside the workspace, so its view of files is the
workspace's, with its uid mapping, and no path can lead out: the kernel
resolves ``..``, absolute paths and symlinks against the workspace's root.
When the image has OpenSSH's ``sftp-server`` it runs through ``crun exec``;
otherwise den's own (:mod:`den.ssh.sftp_server`) runs in a worker process
that joins the workspace's cgroup and namespaces (:mod:`den.ssh.sftp_worker`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from den.backends.bundle import PATH
from den.errors import BackendFailure
from den.ssh import inside

if TYPE_CHECKING:
    from den.app import App
    from den.ssh.target import Ready

NATIVE = ("usr/lib/openssh/sftp-server", "usr/lib/sftp-server", "usr/libexec/openssh/sftp-server")


async def server_argv(app: App, ws: Ready, acct: inside.Account, pid_file: Path) -> list[str]:
    """The command that serves SFTP on its stdin/stdout for ``acct`` in ``ws``."""
    backend = app.backend
    cid = backend.cid(ws.ws_id)
    for rel in NATIVE:
        if inside.exists(ws.spec.rootfs, rel):
            env = {"PATH": PATH, "HOME": acct.home, "USER": acct.name, "LOGNAME": acct.name}
            return backend.crun.exec_argv(
                cid, [f"/{rel}"], env=env, cwd=acct.home, user=acct.ids, pid_file=pid_file
            )
    init = backend.crun.init_process(cid)
    if init is None:
        raise BackendFailure("the workspace has no running init to serve sftp in")
    pid, started = init
    return [
        sys.executable,
        "-I",
        "-m",
        "den.ssh.sftp_worker",
        "--pid",
        str(pid),
        "--start-time",
        str(started),
        "--user",
        acct.ids,
        "--home",
        acct.home,
        "--cgroup",
        backend.cgroup(ws.ws_id),
        "--bundle",
        str(backend.bundle(ws.ws_id)),
    ]
