"""The seccomp profile of sandbox workspaces: seccomp.toml as the OCI linux.seccomp.

The data file says what is allowed and denied, and why; this module checks it
(at daemon start: a broken file stops den there, not at a workspace's start)
and turns its argument conditions into the comparisons crun hands libseccomp.

libseccomp has no "not equal under a mask", and a rule that allows a syscall
unconditionally swallows every rule with conditions on that syscall. So "ioctl,
except these requests" becomes a set of allow rules, each fixing some bits of
the argument to a value no denied request has (masked comparisons on the low
32 bits, which is all the kernel reads), plus one EPERM rule per denied value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import platform
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROFILE = Path(__file__).with_name("seccomp.toml")
LOW32 = 0xFFFF_FFFF
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_GROUP_KEYS = {
    "allow": {"group", "syscalls", "arg", "clear", "equal", "except", "bits"},
    "deny": {"group", "syscalls", "errno"},
}
_CONDITIONS = ("clear", "equal", "except")

Rule = dict[str, Any]


class ProfileError(ValueError):
    """The seccomp data file is not a profile den can use."""


def _errno(value: Any, where: str) -> int:
    code = getattr(errno, value, None) if isinstance(value, str) else None
    if not isinstance(code, int) or not value.startswith("E"):
        raise ProfileError(f"{where}: {value!r} is not an errno name such as EPERM")
    return code


def _u32(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= LOW32:
        raise ProfileError(f"{where}: {value!r} is not a 32-bit unsigned integer")
    return value


def _masked(index: int, mask: int, value: int) -> dict[str, Any]:
    return {"index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}


def _bit(value: int, b: int) -> int:
    return (value >> b) & 1


def cover(
    denied: set[int], free: list[int], mask: int = 0, value: int = 0
) -> list[tuple[int, int]]:
    """(mask, value) pairs whose union is every value of the free bits except ``denied``.

    Bits outside ``free`` are fixed by ``mask``/``value``. Every bit on which
    all denied values agree gives one pair with that bit flipped; the rest is
    split on a bit where they differ, until a single denied value is left.
    """
    if not denied:
        return [(mask, value)]
    out = []
    agreed = [b for b in free if len({_bit(v, b) for v in denied}) == 1]
    some = next(iter(denied))
    for b in agreed:
        out.append((mask | 1 << b, value | (1 - _bit(some, b)) << b))
        mask, value = mask | 1 << b, value | _bit(some, b) << b
    rest = [b for b in free if b not in agreed]
    if not rest:
        return out
    split, rest = rest[0], rest[1:]
    for side in (0, 1):
        part = {v for v in denied if _bit(v, split) == side}
        out += cover(part, rest, mask | 1 << split, value | side << split)
    return out


def _allow_rules(group: dict[str, Any], where: str, names: list[str]) -> list[Rule]:
    allow: Rule = {"names": names, "action": "SCMP_ACT_ALLOW"}
    conditions = [k for k in _CONDITIONS if k in group]
    if not conditions:
        if "arg" in group or "bits" in group:
            raise ProfileError(f"{where}: 'arg' and 'bits' go with one of {_CONDITIONS}")
        return [allow]
    if len(conditions) > 1:
        raise ProfileError(f"{where}: only one of {_CONDITIONS} per group")
    arg = group.get("arg")
    if not isinstance(arg, int) or isinstance(arg, bool) or not 0 <= arg <= 5:
        raise ProfileError(f"{where}: 'arg' must be the argument's index, 0 to 5")
    kind = conditions[0]
    if "bits" in group and kind != "except":
        raise ProfileError(f"{where}: 'bits' goes with 'except' only")

    def deny(value: int, mask: int = LOW32) -> Rule:
        return {
            "names": names,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": errno.EPERM,
            "args": [_masked(arg, mask, value)],
        }

    if kind == "equal":
        values = group["equal"]
        if not isinstance(values, list) or not values:
            raise ProfileError(f"{where}: 'equal' must be a non-empty list of values")
        return [
            {**allow, "args": [{"index": arg, "value": _u32(v, where), "op": "SCMP_CMP_EQ"}]}
            for v in values
        ]
    table = group[kind]
    if not isinstance(table, dict) or not table:
        raise ProfileError(f"{where}: {kind!r} must be a table of NAME = value")
    named = {str(k): _u32(v, f"{where}, {k}") for k, v in table.items()}
    if kind == "clear":
        flags = 0
        for name, v in named.items():
            if v == 0:
                raise ProfileError(f"{where}, {name}: a flag of 0 clears nothing")
            flags |= v
        return [
            {**allow, "args": [_masked(arg, flags, 0)]},
            *(deny(v, v) for v in named.values()),
        ]
    bits = group.get("bits", 32)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 32:
        raise ProfileError(f"{where}: 'bits' must be 1 to 32")
    above = LOW32 & ~((1 << bits) - 1)
    for name, v in named.items():
        if v & above:
            raise ProfileError(f"{where}, {name}: {v:#x} does not fit in {bits} bits")
    cubes = cover(set(named.values()), list(range(bits)), above, 0)
    return [
        *({**allow, "args": [_masked(arg, m, v)]} for m, v in cubes),
        *(deny(v) for v in named.values()),
    ]


def parse(text: str, machine: str, source: str = "seccomp profile") -> dict[str, Any]:
    """The OCI linux.seccomp object the profile ``text`` gives on ``machine``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    unknown = set(data) - {"profile", "architectures", "allow", "deny"}
    if unknown:
        raise ProfileError(f"{source}: unknown sections {sorted(unknown)}")
    default = _errno(data.get("profile", {}).get("default_errno"), f"{source}, [profile]")
    arches = data.get("architectures", {}).get(machine)
    if not isinstance(arches, list) or not arches or not all(isinstance(a, str) for a in arches):
        raise ProfileError(f"{source}: no [architectures] entry for this machine ({machine})")
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for kind in ("allow", "deny"):
        groups = data.get(kind, [])
        if not isinstance(groups, list):
            raise ProfileError(f"{source}: {kind} must be written [[{kind}]]")
        for i, group in enumerate(groups):
            where = f"{source}, [[{kind}]] {group.get('group', f'#{i + 1}')!r}"
            extra = set(group) - _GROUP_KEYS[kind]
            if extra:
                raise ProfileError(f"{where}: unknown keys {sorted(extra)}")
            names = group.get("syscalls")
            if not isinstance(names, list) or not names:
                raise ProfileError(f"{where}: 'syscalls' must be a non-empty list")
            for name in names:
                if not isinstance(name, str) or not _NAME.fullmatch(name):
                    raise ProfileError(f"{where}: {name!r} is not a syscall name")
                if name in seen:
                    raise ProfileError(f"{where}: {name} is already in {seen[name]}")
                seen[name] = where
            if kind == "deny":
                code = _errno(group.get("errno"), where)
                rules.append({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": code})
            else:
                rules += _allow_rules(group, where, names)
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": default,
        "architectures": arches,
        "syscalls": rules,
    }


@cache
def _libseccomp() -> Any:
    name = ctypes.util.find_library("seccomp")
    try:
        lib = ctypes.CDLL(name or "libseccomp.so.2")
    except OSError:
        return None
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    return lib


def unknown_names(names: list[str]) -> list[str]:
    """Names the host's libseccomp (the one crun uses) does not know; [] without it.

    It knows the syscalls of every architecture: a name absent on this one
    resolves to a negative placeholder, not to the error (-1).
    """
    lib = _libseccomp()
    if lib is None:
        return []
    return [n for n in names if lib.seccomp_syscall_resolve_name(n.encode()) == -1]


def load(path: Path = PROFILE, machine: str | None = None) -> dict[str, Any]:
    """The profile for crun, checked; names this host's libseccomp lacks left out.

    crun would skip those anyway, with a warning at every start; left out,
    they fail with the default errno (ENOSYS), as on an older kernel.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"cannot read the seccomp profile {path}: {exc.strerror}") from None
    profile = parse(text, machine or platform.machine(), str(path))
    every = [n for rule in profile["syscalls"] for n in rule["names"]]
    missing = set(unknown_names(sorted(set(every))))
    if missing:
        log.warning(
            "seccomp: syscalls unknown to this host's libseccomp are left out",
            extra={"ctx": {"syscalls": sorted(missing)}},
        )
        kept = []
        for rule in profile["syscalls"]:
            names = [n for n in rule["names"] if n not in missing]
            if names:
                kept.append({**rule, "names": names})
        profile["syscalls"] = kept
    return profile
