"""An SFTP version 3 server (plus the OpenSSH extensions scp and sftp use) on
two file descriptors.

It trusts the kernel for confinement: :mod:`den.ssh.sftp_worker` runs it in
the workspace's namespaces, chrooted to its root and as its user, so every
path (absolute, ``..``, symlinks) resolves inside the workspace with that
user's permissions, exactly as for a process started there. It imports
nothing lazily: after the chroot the host's Python library is out of reach.
"""

from __future__ import annotations

import os
import stat
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from den.ssh.sftp_wire import (
    ATTRS,
    BAD_MESSAGE,
    CLOSE,
    DATA,
    EOF,
    EXTENDED,
    EXTENDED_REPLY,
    EXTENSIONS,
    F_APPEND,
    F_CREAT,
    F_EXCL,
    F_READ,
    F_TRUNC,
    F_WRITE,
    FAILURE,
    FSETSTAT,
    FSTAT,
    HANDLE,
    INIT,
    LSTAT,
    MAX_HANDLES,
    MAX_IO,
    MAX_PACKET,
    MKDIR,
    NAME,
    NO_SUCH_FILE,
    OK,
    OP_UNSUPPORTED,
    OPEN,
    OPENDIR,
    READ,
    READDIR,
    READLINK,
    REALPATH,
    REMOVE,
    RENAME,
    RMDIR,
    SETSTAT,
    STAT,
    STATUS,
    SYMLINK,
    U32,
    U64,
    VERSION,
    WRITE,
    BadMessage,
    Reader,
    Status,
    encode_attrs,
    s,
    status_of,
)


def _table(path: str) -> dict[int, str]:
    """id -> name from the workspace's passwd or group file (no NSS modules loaded)."""
    out: dict[int, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(":")
                if len(parts) >= 3 and parts[2].isdigit():
                    out.setdefault(int(parts[2]), parts[0])
    except OSError:
        pass
    return out


def _home_of(user: str) -> str | None:
    try:
        with open("/etc/passwd", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(":")
                if len(parts) >= 6 and parts[0] == user:
                    return parts[5]
    except OSError:
        pass
    return None


class Server:
    """One SFTP session; ``serve()`` runs until the client closes its side."""

    def __init__(self, fd_in: int, fd_out: int, home: str) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.home = home
        self.files: dict[bytes, int] = {}
        self.dirs: dict[bytes, tuple[str, deque[str]]] = {}
        self.next_handle = 0
        self.users = _table("/etc/passwd")
        self.groups = _table("/etc/group")
        self.ops: dict[int, Callable[[Reader], bytes]] = {
            OPEN: self.open,
            CLOSE: self.close,
            READ: self.read,
            WRITE: self.write,
            LSTAT: self.lstat,
            FSTAT: self.fstat,
            SETSTAT: self.setstat,
            FSETSTAT: self.fsetstat,
            OPENDIR: self.opendir,
            READDIR: self.readdir,
            REMOVE: self.remove,
            MKDIR: self.mkdir,
            RMDIR: self.rmdir,
            REALPATH: self.realpath,
            STAT: self.stat,
            RENAME: self.rename,
            READLINK: self.readlink,
            SYMLINK: self.symlink,
            EXTENDED: self.extended,
        }

    # -- transport ---------------------------------------------------------------
    def _recv(self, n: int) -> bytes | None:
        chunks = []
        while n:
            data = os.read(self.fd_in, min(n, 1 << 20))
            if not data:
                return None
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def _send(self, kind: int, payload: bytes, data: bytes = b"") -> None:
        """One packet: ``payload`` then ``data`` (sent without copying it)."""
        head = U32.pack(len(payload) + len(data) + 1) + bytes((kind,)) + payload
        parts = [memoryview(head), memoryview(data)]
        while parts:
            n = os.writev(self.fd_out, parts)
            while parts and n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            if parts:
                parts[0] = parts[0][n:]

    def serve(self) -> None:
        while True:
            head = self._recv(4)
            if head is None:
                return
            length = U32.unpack(head)[0]
            if length < 1 or length > MAX_PACKET + 1024:
                return  # not SFTP: end the session as OpenSSH's server does
            body = self._recv(length)
            if body is None:
                return
            self.dispatch(body[0], Reader(body[1:]))

    def dispatch(self, kind: int, r: Reader) -> None:
        if kind == INIT:
            r.u32()
            self._send(VERSION, U32.pack(3) + b"".join(s(k) + s(v) for k, v in EXTENSIONS))
            return
        try:
            req_id = r.u32()
        except BadMessage:
            return
        op = self.ops.get(kind)
        try:
            if kind == READ:  # the hot path: the data goes out without a copy
                data = self.read_data(r)
                self._send(DATA, U32.pack(req_id) + U32.pack(len(data)), data)
                return
            if op is None:
                raise Status(OP_UNSUPPORTED)
            reply = op(r)
            self._send(reply[0], U32.pack(req_id) + reply[1:])
        except Status as err:
            self._status(req_id, err.code, err.message)
        except OSError as exc:
            mapped = status_of(exc)
            self._status(req_id, mapped.code, mapped.message)
        except (BadMessage, ValueError, OverflowError):
            self._status(req_id, BAD_MESSAGE, "Bad message")

    def _status(self, req_id: int, code: int, message: str) -> None:
        self._send(
            STATUS,
            U32.pack(req_id) + U32.pack(code) + s(message.encode(errors="replace")) + s(b"en"),
        )

    # -- helpers -------------------------------------------------------------------
    @staticmethod
    def ok() -> bytes:
        return bytes((STATUS,)) + U32.pack(OK) + s(b"Success") + s(b"en")

    def _handle(self) -> bytes:
        if len(self.files) + len(self.dirs) >= MAX_HANDLES:
            raise Status(FAILURE, "too many open handles")
        self.next_handle += 1
        return str(self.next_handle).encode()

    def _fd(self, r: Reader) -> int:
        fd = self.files.get(r.string())
        if fd is None:
            raise Status(FAILURE, "invalid handle")
        return fd

    @staticmethod
    def _path(r: Reader) -> str:
        return os.fsdecode(r.string())

    def _names(self, entries: list[tuple[str, str, os.stat_result]]) -> bytes:
        out = [bytes((NAME,)), U32.pack(len(entries))]
        for name, long_name, st in entries:
            out += [s(os.fsencode(name)), s(os.fsencode(long_name)), encode_attrs(st)]
        return b"".join(out)

    def _longname(self, name: str, st: os.stat_result) -> str:
        when = time.localtime(st.st_mtime)
        recent = abs(time.time() - st.st_mtime) < 180 * 86400
        stamp = time.strftime("%b %e %H:%M" if recent else "%b %e  %Y", when)
        user = self.users.get(st.st_uid, str(st.st_uid))
        group = self.groups.get(st.st_gid, str(st.st_gid))
        return (
            f"{stat.filemode(st.st_mode)} {st.st_nlink:>4} {user:<8} {group:<8} "
            f"{st.st_size:>8} {stamp} {name}"
        )

    def _apply(self, a: dict[str, Any], path: str | None = None, fd: int | None = None) -> None:
        target: Any = fd if fd is not None else path
        if "size" in a:
            os.truncate(target, a["size"])
        if "mode" in a:
            os.chmod(target, stat.S_IMODE(a["mode"]))
        if "uid" in a:
            os.chown(target, a["uid"], a["gid"])
        if "mtime" in a:
            os.utime(target, (a["atime"], a["mtime"]))

    # -- operations -------------------------------------------------------------------
    def open(self, r: Reader) -> bytes:
        path, pflags, a = self._path(r), r.u32(), r.attrs()
        rw = pflags & (F_READ | F_WRITE)
        flags = {F_READ: os.O_RDONLY, F_WRITE: os.O_WRONLY}.get(rw, os.O_RDWR)
        if pflags & F_APPEND:
            flags |= os.O_APPEND
        if pflags & F_CREAT:
            flags |= os.O_CREAT
        if pflags & F_TRUNC:
            flags |= os.O_TRUNC
        if pflags & F_EXCL:
            flags |= os.O_EXCL
        mode = stat.S_IMODE(a.get("mode", 0o666))
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY, mode)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise Status(FAILURE, "is a directory")
        except BaseException:
            os.close(fd)
            raise
        h = self._handle()
        self.files[h] = fd
        return bytes((HANDLE,)) + s(h)

    def close(self, r: Reader) -> bytes:
        h = r.string()
        if h in self.files:
            os.close(self.files.pop(h))
        elif self.dirs.pop(h, None) is None:
            raise Status(FAILURE, "invalid handle")
        return self.ok()

    def read(self, r: Reader) -> bytes:
        return bytes((DATA,)) + s(self.read_data(r))

    def read_data(self, r: Reader) -> bytes:
        fd, offset, n = self._fd(r), r.u64(), r.u32()
        data = os.pread(fd, min(n, MAX_IO), offset)
        if not data and n:
            raise Status(EOF)
        return data

    def write(self, r: Reader) -> bytes:
        fd, offset, data = self._fd(r), r.u64(), r.string()
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        return self.ok()

    def _attrs_reply(self, st: os.stat_result) -> bytes:
        return bytes((ATTRS,)) + encode_attrs(st)

    def lstat(self, r: Reader) -> bytes:
        return self._attrs_reply(os.lstat(self._path(r)))

    def stat(self, r: Reader) -> bytes:
        return self._attrs_reply(os.stat(self._path(r)))

    def fstat(self, r: Reader) -> bytes:
        return self._attrs_reply(os.fstat(self._fd(r)))

    def setstat(self, r: Reader) -> bytes:
        path = self._path(r)
        self._apply(r.attrs(), path=path)
        return self.ok()

    def fsetstat(self, r: Reader) -> bytes:
        fd = self._fd(r)
        self._apply(r.attrs(), fd=fd)
        return self.ok()

    def opendir(self, r: Reader) -> bytes:
        path = self._path(r) or "."
        names = deque([".", "..", *os.listdir(path)])
        h = self._handle()
        self.dirs[h] = (path, names)
        return bytes((HANDLE,)) + s(h)

    def readdir(self, r: Reader) -> bytes:
        entry = self.dirs.get(r.string())
        if entry is None:
            raise Status(FAILURE, "invalid handle")
        path, names = entry
        batch: list[tuple[str, str, os.stat_result]] = []
        while names and len(batch) < 100:
            name = names.popleft()
            try:
                st = os.lstat(os.path.join(path, name))
            except OSError:
                continue
            batch.append((name, self._longname(name, st), st))
        if not batch:
            raise Status(EOF)
        return self._names(batch)

    def remove(self, r: Reader) -> bytes:
        os.unlink(self._path(r))
        return self.ok()

    def mkdir(self, r: Reader) -> bytes:
        path, a = self._path(r), r.attrs()
        os.mkdir(path, stat.S_IMODE(a.get("mode", 0o777)))
        return self.ok()

    def rmdir(self, r: Reader) -> bytes:
        os.rmdir(self._path(r))
        return self.ok()

    def _resolved(self, path: str) -> bytes:
        full = os.path.realpath(path or ".")
        st = os.lstat(full) if os.path.lexists(full) else os.stat("/")
        return self._names([(full, full, st)])

    def realpath(self, r: Reader) -> bytes:
        return self._resolved(self._path(r))

    def rename(self, r: Reader) -> bytes:
        old, new = self._path(r), self._path(r)
        if os.path.lexists(new):
            raise Status(FAILURE, "the target exists")  # SFTP v3 rename never replaces
        os.rename(old, new)
        return self.ok()

    def readlink(self, r: Reader) -> bytes:
        target = os.readlink(self._path(r))
        return self._names([(target, target, os.stat("/"))])

    def symlink(self, r: Reader) -> bytes:
        # OpenSSH sends (target, link) in this order, against the draft: follow it.
        target, link = self._path(r), self._path(r)
        os.symlink(target, link)
        return self.ok()

    def extended(self, r: Reader) -> bytes:
        name = r.string()
        if name == b"posix-rename@openssh.com":
            os.replace(self._path(r), self._path(r))
            return self.ok()
        if name == b"hardlink@openssh.com":
            old, new = self._path(r), self._path(r)
            os.link(old, new)
            return self.ok()
        if name == b"fsync@openssh.com":
            os.fsync(self._fd(r))
            return self.ok()
        if name in (b"statvfs@openssh.com", b"fstatvfs@openssh.com"):
            v = (
                os.statvfs(self._path(r))
                if name.startswith(b"statvfs")
                else os.fstatvfs(self._fd(r))
            )
            fields = (
                v.f_bsize,
                v.f_frsize,
                v.f_blocks,
                v.f_bfree,
                v.f_bavail,
                v.f_files,
                v.f_ffree,
                v.f_favail,
                v.f_fsid,
                v.f_flag,
                v.f_namemax,
            )
            return bytes((EXTENDED_REPLY,)) + b"".join(U64.pack(x & (2**64 - 1)) for x in fields)
        if name == b"limits@openssh.com":
            return bytes((EXTENDED_REPLY,)) + b"".join(
                U64.pack(x) for x in (MAX_PACKET, MAX_IO, MAX_IO, MAX_HANDLES)
            )
        if name == b"expand-path@openssh.com":
            return self._resolved(self.expand(self._path(r)))
        raise Status(OP_UNSUPPORTED)

    def expand(self, path: str) -> str:
        if not path.startswith("~"):
            return path
        user, _, rest = path[1:].partition("/")
        home = self.home if not user else _home_of(user)
        if home is None:
            raise Status(NO_SUCH_FILE, f"no user {user}")
        return os.path.join(home, rest) if rest else home
