"""``python -I -m den.ssh.socket_worker``: a Unix socket at a path inside a
workspace, made from inside it, handed to the daemon.

The daemon never resolves a path the workspace controls (a symlink planted
there would lead into the host). This worker joins the workspace
(:mod:`den.ssh.join`), so that the kernel resolves the path against the
workspace's root, as the workspace's user; then it binds and listens
(``listen``) or connects (``connect``) and sends the socket's fd back over
its stdin, a Unix socket from the daemon (SCM_RIGHTS), with ``ok``; or, with
no fd, the reason it could not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import stat
import sys

from den.ssh import join

CONNECT_TIMEOUT = 10.0


def _reply(text: str, fd: int | None = None) -> None:
    back = socket.socket(fileno=0)
    try:
        if fd is None:
            back.sendall(text.encode())
        else:
            socket.send_fds(back, [text.encode()], [fd])
    finally:
        back.detach()


def listen(path: str, owner: str | None, replace: bool, make_parent: bool) -> socket.socket:
    if make_parent:
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.dirname(path), 0o755)
    if replace:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    os.umask(0o177)  # the socket file is its owner's alone, as sshd's StreamLocalBindMask
    sock.bind(path)
    if owner is not None:
        uid, gid = (int(x) for x in owner.split(":"))
        os.chown(path, uid, gid, follow_symlinks=False)
    sock.listen(64)
    return sock


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT)
    sock.connect(path)
    return sock


def main() -> None:
    p = argparse.ArgumentParser(prog="den-socket-worker")
    join.add_arguments(p)
    p.add_argument("--cwd", default="/", help="where a relative path starts")
    p.add_argument("op", choices=("listen", "connect"))
    p.add_argument("path")
    p.add_argument("--owner", help="UID:GID the socket file is given to (listen)")
    p.add_argument("--replace", action="store_true", help="remove a stale file at the path")
    p.add_argument("--make-parent", action="store_true", help="create the path's directory")
    args = p.parse_args()
    join.enter_from(args, "den-socket-worker")
    try:
        with contextlib.suppress(OSError):
            os.chdir(args.cwd)
        if args.op == "listen":
            sock = listen(args.path, args.owner, args.replace, args.make_parent)
        else:
            sock = connect(args.path)
    except OSError as exc:
        _reply(f"cannot {args.op} on {args.path}: {exc.strerror or exc}")
        sys.exit(1)
    _reply("ok", sock.fileno())


if __name__ == "__main__":
    main()
