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

import base64
import ctypes
import ctypes.util
import errno
import logging
import os
import platform
import re
import tempfile
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROFILE = Path(__file__).with_name("seccomp.toml")
LOW32 = 0xFFFF_FFFF
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_GROUP_KEYS = {
    "allow": {"group", "syscalls", "when"},
    "deny": {"group", "syscalls", "errno"},
}
_WHEN_KEYS = {"arg", "clear", "equal", "except", "leave", "bits", "mask"}
_CONDITIONS = ("clear", "equal", "except")

Rule = dict[str, Any]
Arg = dict[str, Any]  # one comparison of an OCI seccomp rule


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


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _condition(when: Any, where: str) -> tuple[list[Arg], list[Arg]]:
    """One [[allow.when]]: the comparisons that allow (any one) and those that get EPERM."""
    if not isinstance(when, dict):
        raise ProfileError(f"{where}: 'when' must be written [[allow.when]]")
    extra = set(when) - _WHEN_KEYS
    if extra:
        raise ProfileError(f"{where}: unknown keys {sorted(extra)}")
    kinds = [k for k in _CONDITIONS if k in when]
    if len(kinds) != 1:
        raise ProfileError(f"{where}: each [[allow.when]] takes one of {_CONDITIONS}")
    kind = kinds[0]
    arg: int = when.get("arg", -1)
    if not _int(arg, 0, 5):
        raise ProfileError(f"{where}: 'arg' must be the argument's index, 0 to 5")
    if any(k in when for k in ("bits", "mask", "leave")) and kind != "except":
        raise ProfileError(f"{where}: 'bits', 'mask' and 'leave' go with 'except' only")
    if kind == "equal":
        values = when["equal"]
        if not isinstance(values, list) or not values:
            raise ProfileError(f"{where}: 'equal' must be a non-empty list of values")
        return [{"index": arg, "value": _u32(v, where), "op": "SCMP_CMP_EQ"} for v in values], []
    table = when[kind]
    if not isinstance(table, dict) or not table:
        raise ProfileError(f"{where}: {kind!r} must be a table of NAME = value")
    named = {str(k): _u32(v, f"{where}, {k}") for k, v in table.items()}
    left = when.get("leave", {})
    if not isinstance(left, dict):
        raise ProfileError(f"{where}: 'leave' must be a table of NAME = value")
    named_left = {str(k): _u32(v, f"{where}, {k}") for k, v in left.items()}
    if kind == "clear":
        flags = 0
        for name, v in named.items():
            if v == 0:
                raise ProfileError(f"{where}, {name}: a flag of 0 clears nothing")
            flags |= v
        return [_masked(arg, flags, 0)], [_masked(arg, v, v) for v in named.values()]
    # except: the bits compared are the low `bits` (the others must be 0) or
    # those of `mask` (the others are free); by default all 32.
    if "bits" in when and "mask" in when:
        raise ProfileError(f"{where}: 'bits' or 'mask', not both")
    if "mask" in when:
        mask = _u32(when["mask"], f"{where}, mask")
        fixed = 0
    else:
        bits = when.get("bits", 32)
        if not _int(bits, 1, 32):
            raise ProfileError(f"{where}: 'bits' must be 1 to 32")
        mask = (1 << bits) - 1
        fixed = LOW32 & ~mask
    for name, v in {**named, **named_left}.items():
        if v & ~mask:
            raise ProfileError(f"{where}, {name}: {v:#x} has bits outside {mask:#x}")
    free = [b for b in range(32) if mask >> b & 1]
    cubes = cover({*named.values(), *named_left.values()}, free, fixed, 0)
    return [_masked(arg, m, v) for m, v in cubes], [
        _masked(arg, mask | fixed, v) for v in named.values()
    ]


def _allow_rules(group: dict[str, Any], where: str, names: list[str]) -> list[Rule]:
    """Allow rules: one per combination of an allowed comparison of each condition.

    The comparisons of one rule must all hold; the rules are alternatives.
    What a condition denies gets EPERM when the conditions before it hold.
    """
    whens = group.get("when", [])
    if not isinstance(whens, list):
        raise ProfileError(f"{where}: 'when' must be written [[allow.when]]")
    combos: list[list[Arg]] = [[]]
    denied: list[list[Arg]] = []
    for i, when in enumerate(whens):
        allowed, deny = _condition(when, f"{where}, when #{i + 1}")
        denied += [[*c, d] for c in combos for d in deny]
        combos = [[*c, a] for c in combos for a in allowed]
    allow = [
        {"names": names, "action": "SCMP_ACT_ALLOW", **({"args": c} if c else {})} for c in combos
    ]
    return allow + [
        {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM, "args": d}
        for d in denied
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
    seen: dict[str, tuple[str, bool]] = {}
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
                # Several [[allow]] groups may name a syscall when each has
                # conditions (they must not overlap: see 'leave'); an
                # unconditional rule would swallow the others in libseccomp.
                conditional = kind == "allow" and bool(group.get("when"))
                if name in seen and not (conditional and seen[name][1]):
                    raise ProfileError(f"{where}: {name} is already in {seen[name][0]}")
                seen[name] = (where, conditional)
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


# -- compiled once, at daemon start ---------------------------------------------------

# crun 1.8 compiles linux.seccomp with libseccomp at every `crun run` and reads
# the whole profile back from config.json at every `crun exec` (measured: +12 ms
# per start, +3 ms per exec). Given the filter as BPF (its annotation
# run.oci.seccomp_bpf_data), it loads it as is. den compiles it here with the
# same library and the same steps as crun (seccomp_init with the default
# action, the architectures, one rule per name, rules with the default action
# skipped), so the filter is the one crun would build.
BPF_ANNOTATION = "run.oci.seccomp_bpf_data"
_ALLOW = 0x7FFF0000  # SCMP_ACT_ALLOW
_ERRNO = 0x00050000  # SCMP_ACT_ERRNO(0)
_OPS = {"SCMP_CMP_EQ": 4, "SCMP_CMP_MASKED_EQ": 7}


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


@dataclass(frozen=True)
class Filter:
    """A workspace's filter: the OCI profile, and its BPF when den could compile it."""

    profile: dict[str, Any]
    bpf: bytes | None

    def annotations(self) -> dict[str, str]:
        """config.json's annotations: the BPF, when compiled."""
        return {BPF_ANNOTATION: base64.b64encode(self.bpf).decode()} if self.bpf else {}

    def linux(self) -> dict[str, Any]:
        """Keys of config.json's linux section: the profile, for crun to compile, if not."""
        return {} if self.bpf else {"seccomp": self.profile}


def _action(name: str, errno_ret: int) -> int:
    if name == "SCMP_ACT_ALLOW":
        return _ALLOW
    if name == "SCMP_ACT_ERRNO":
        return _ERRNO | errno_ret
    raise ProfileError(f"den does not compile the seccomp action {name}")


def compile_bpf(profile: dict[str, Any]) -> bytes | None:
    """The profile as BPF, as crun would build it; None without libseccomp."""
    lib = _libseccomp()
    if lib is None:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    default = _action(profile["defaultAction"], profile["defaultErrnoRet"])
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise ProfileError("libseccomp could not start a filter")
    try:
        for arch in profile["architectures"]:
            token = lib.seccomp_arch_resolve_name(arch.removeprefix("SCMP_ARCH_").lower().encode())
            rc = lib.seccomp_arch_add(ctx, token) if token else -errno.EINVAL
            if rc < 0 and rc != -errno.EEXIST:
                raise ProfileError(f"libseccomp refused the architecture {arch}")
        for rule in profile["syscalls"]:
            action = _action(rule["action"], rule.get("errnoRet", errno.EPERM))
            if action == default:
                continue
            args = rule.get("args", [])
            if len({a["index"] for a in args}) != len(args):
                raise ProfileError("a rule compares one argument twice (crun would split it)")
            cmps = (_ArgCmp * max(1, len(args)))(
                *(
                    _ArgCmp(a["index"], _OPS[a["op"]], a["value"], a.get("valueTwo", 0))
                    for a in args
                )
            )
            for name in rule["names"]:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                rc = lib.seccomp_rule_add_array(ctx, action, nr, len(args), cmps)
                if rc < 0:
                    raise ProfileError(f"libseccomp refused a rule for {name}: {os.strerror(-rc)}")
        with tempfile.TemporaryFile() as f:
            rc = lib.seccomp_export_bpf(ctx, f.fileno())
            if rc < 0:
                raise ProfileError(f"libseccomp could not export the filter: {os.strerror(-rc)}")
            f.seek(0)
            return f.read()
    finally:
        lib.seccomp_release(ctx)


def prepare(path: Path = PROFILE) -> Filter:
    """The checked profile and its BPF: what the daemon hands every workspace."""
    profile = load(path)
    return Filter(profile, compile_bpf(profile))
