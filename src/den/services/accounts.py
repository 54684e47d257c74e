"""Host Linux accounts of den users (``den-<name>``) and their subordinate ids."""

from __future__ import annotations

import asyncio
import grp
import logging
import pwd
from dataclasses import dataclass
from pathlib import Path

from den import proc
from den.errors import BackendFailure, Conflict, InvalidParams

log = logging.getLogger(__name__)
MAX_ACCOUNT_LEN = 32  # useradd refuses longer names
SUBID_COUNT = 65536
SUBID_MIN = 100000


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    subid_start: int
    subid_count: int


def read_subids(path: Path, owner: str) -> tuple[int, int] | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] == owner:
            return int(parts[1]), int(parts[2])
    return None


def _all_subid_ranges(path: Path) -> list[tuple[int, int]]:
    out = []
    try:
        for line in path.read_text().splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                out.append((int(parts[1]), int(parts[2])))
    except FileNotFoundError:
        pass
    return out


class Accounts:
    """Creates and removes host accounts, idempotently, one at a time.

    An account is den's when its comment (GECOS) is the marker of this
    instance; an existing account without it is never touched.
    """

    def __init__(self, prefix: str, group: str, instance: int) -> None:
        self.prefix = prefix
        self.group = group
        self.marker = f"den managed account (instance {instance})"
        self._lock = asyncio.Lock()
        self.subuid = Path("/etc/subuid")
        self.subgid = Path("/etc/subgid")

    def account_name(self, user: str) -> str:
        name = self.prefix + user
        if len(name) > MAX_ACCOUNT_LEN:
            raise InvalidParams(
                f"the host account {name!r} would be longer than {MAX_ACCOUNT_LEN} characters; "
                f"choose a name of at most {MAX_ACCOUNT_LEN - len(self.prefix)} characters",
                field="name",
            )
        return name

    def user_of_uid(self, uid: int) -> str | None:
        """The den user name whose account has this uid, if the account is den's."""
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return None
        if not pw.pw_name.startswith(self.prefix) or pw.pw_gecos != self.marker:
            return None
        return pw.pw_name[len(self.prefix) :]

    async def ensure_group(self) -> None:
        try:
            grp.getgrnam(self.group)
        except KeyError:
            await proc.run(["groupadd", "--system", self.group])

    def group_gid(self) -> int:
        return grp.getgrnam(self.group).gr_gid

    async def ensure(self, user: str) -> Account:
        """Create the account of ``user`` if missing; return it. Idempotent."""
        name = self.account_name(user)
        async with self._lock:
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                pw = None
            if pw is not None and pw.pw_gecos != self.marker:
                raise Conflict(
                    f"the host account {name!r} exists and is not managed by den; "
                    "remove it or choose another user name"
                )
            if pw is None:
                await self.ensure_group()
                await proc.run(
                    [
                        "useradd",
                        "--no-create-home",
                        "--home-dir",
                        "/nonexistent",
                        "--shell",
                        "/usr/sbin/nologin",
                        "--comment",
                        self.marker,
                        "--groups",
                        self.group,
                        "--user-group",
                        name,
                    ]
                )
                pw = pwd.getpwnam(name)
            else:
                # A leftover account of ours (e.g. a crash between useradd and
                # commit) must still reach the socket once adopted.
                await self.ensure_group()
                if name not in grp.getgrnam(self.group).gr_mem:
                    await proc.run(["usermod", "--append", "--groups", self.group, name])
            sub = await self._ensure_subids(name)
        return Account(name, pw.pw_uid, pw.pw_gid, sub[0], sub[1])

    async def _ensure_subids(self, name: str) -> tuple[int, int]:
        uid_range = read_subids(self.subuid, name)
        gid_range = read_subids(self.subgid, name)
        if uid_range and gid_range and uid_range == gid_range:
            return uid_range
        # useradd did not assign one (or the two differ): pick a range free in both files.
        taken = _all_subid_ranges(self.subuid) + _all_subid_ranges(self.subgid)
        start = SUBID_MIN
        for s, c in sorted(taken):
            if start + SUBID_COUNT <= s:
                break
            start = max(start, s + c)
        if uid_range:
            await proc.run(
                ["usermod", "--del-subuids", f"{uid_range[0]}-{sum(uid_range) - 1}", name]
            )
        if gid_range:
            await proc.run(
                ["usermod", "--del-subgids", f"{gid_range[0]}-{sum(gid_range) - 1}", name]
            )
        end = start + SUBID_COUNT - 1
        await proc.run(
            ["usermod", "--add-subuids", f"{start}-{end}", "--add-subgids", f"{start}-{end}", name]
        )
        return start, SUBID_COUNT

    async def remove(self, user: str) -> None:
        """Remove the account of ``user`` if it is den's. Idempotent."""
        name = self.prefix + user
        async with self._lock:
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                return
            if pw.pw_gecos != self.marker:
                log.warning("not removing host account %s: not den's", name)
                return
            res = await proc.run(["userdel", name], check=False)
            if res.returncode not in (0, 6):  # 6: no such user (removed meanwhile)
                raise BackendFailure(f"userdel {name} failed: {res.stderr.strip()}")

    def list_managed(self) -> list[str]:
        """den user names whose accounts exist on this host for this instance."""
        return [
            pw.pw_name[len(self.prefix) :]
            for pw in pwd.getpwall()
            if pw.pw_name.startswith(self.prefix) and pw.pw_gecos == self.marker
        ]
