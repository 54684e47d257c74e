"""The SFTP version 3 wire format (draft-ietf-secsh-filexfer-02) and the
OpenSSH extensions den's server offers: packet types, status codes,
attribute flags, and reading and writing packet fields."""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
SETSTAT, FSETSTAT, OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH = 9, 10, 11, 12, 13, 14, 15, 16
STAT, RENAME, READLINK, SYMLINK = 17, 18, 19, 20
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED, EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201

OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE, OP_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8
MESSAGES = {
    OK: "Success",
    EOF: "End of file",
    NO_SUCH_FILE: "No such file",
    PERMISSION_DENIED: "Permission denied",
    FAILURE: "Failure",
    BAD_MESSAGE: "Bad message",
    OP_UNSUPPORTED: "Operation unsupported",
}

A_SIZE, A_UIDGID, A_PERMISSIONS, A_ACMODTIME, A_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000
F_READ, F_WRITE, F_APPEND, F_CREAT, F_TRUNC, F_EXCL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20

MAX_PACKET = 256 * 1024
MAX_IO = MAX_PACKET - 1024
MAX_HANDLES = 512
EXTENSIONS = (
    (b"posix-rename@openssh.com", b"1"),
    (b"statvfs@openssh.com", b"2"),
    (b"fstatvfs@openssh.com", b"2"),
    (b"hardlink@openssh.com", b"1"),
    (b"fsync@openssh.com", b"1"),
    (b"limits@openssh.com", b"1"),
    (b"expand-path@openssh.com", b"1"),
)

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class BadMessage(Exception):
    pass


class Status(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message or MESSAGES.get(code, "Failure")


def status_of(exc: OSError) -> Status:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        return Status(NO_SUCH_FILE, exc.strerror or "")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Status(PERMISSION_DENIED, exc.strerror or "")
    return Status(FAILURE, exc.strerror or "Failure")


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BadMessage("truncated packet")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(U64.unpack(self._take(8))[0])

    def string(self) -> bytes:
        return self._take(self.u32())

    def attrs(self) -> dict[str, Any]:
        flags = self.u32()
        a: dict[str, Any] = {}
        if flags & A_SIZE:
            a["size"] = self.u64()
        if flags & A_UIDGID:
            a["uid"], a["gid"] = self.u32(), self.u32()
        if flags & A_PERMISSIONS:
            a["mode"] = self.u32()
        if flags & A_ACMODTIME:
            a["atime"], a["mtime"] = self.u32(), self.u32()
        if flags & A_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return a


def s(data: bytes) -> bytes:
    return U32.pack(len(data)) + data


def encode_attrs(st: os.stat_result) -> bytes:
    flags = A_SIZE | A_UIDGID | A_PERMISSIONS | A_ACMODTIME
    return struct.pack(
        ">IQIIIII",
        flags,
        st.st_size,
        st.st_uid,
        st.st_gid,
        st.st_mode,
        int(st.st_atime) & 0xFFFFFFFF,
        int(st.st_mtime) & 0xFFFFFFFF,
    )
