"""Syscalls and capabilities from inside a real workspace: the seccomp profile
(src/den/backends/seccomp.toml) and the reduced capability set.

Each attempt runs as root in a Debian minbase workspace, mostly through perl's
syscall(), which reaches any syscall number (x86_64 numbers: the profile is
checked on the machine the tests run on). Positive controls in the same
workspace show that what workloads need still works.
"""

from __future__ import annotations

import errno
import json
import platform
import secrets
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from den.backends import seccomp
from tests.conftest import Daemon
from tests.workspaces import conftest as wsc
from tests.workspaces.conftest import BB, create, make_users, own_daemon

# The escape suite acts as root inside, the most a workspace has (exec's default
# is the owner's own account).
run = partial(wsc.run, user="root")
sh = partial(wsc.sh, user="root")

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="syscall numbers below are x86_64's"
)

# Capability numbers (linux/capability.h) of the set den grants.
GRANTED = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13,  # for ping's file capability; the kernel refuses raw sockets anyway
    "CAP_SYS_CHROOT": 18,
    "CAP_SETFCAP": 31,
}
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17
# btrfs subvolume ioctls (linux/btrfs.h), computed with the kernel headers.
BTRFS_SUBVOL_IOCTLS = {
    "BTRFS_IOC_SNAP_CREATE": 0x50009401,
    "BTRFS_IOC_SUBVOL_CREATE": 0x5000940E,
    "BTRFS_IOC_SNAP_DESTROY": 0x5000940F,
    "BTRFS_IOC_SNAP_CREATE_V2": 0x50009417,
    "BTRFS_IOC_SUBVOL_CREATE_V2": 0x50009418,
    "BTRFS_IOC_SUBVOL_SETFLAGS": 0x4008941A,
    "BTRFS_IOC_SET_RECEIVED_SUBVOL": 0xC0C89425,
    "BTRFS_IOC_SNAP_DESTROY_V2": 0x5000943F,
}
TIOCSTI, TIOCLINUX, FIONREAD, TCGETS = 0x5412, 0x541C, 0x541B, 0x5401
HIGH = 1 << 32  # the kernel truncates an ioctl request to 32 bits


@pytest.fixture(scope="module")
def ws(pool_daemon: Daemon, debian_image: str) -> Iterator[str]:
    """One Debian workspace for the module (the tests leave it as they found it)."""
    with make_users(pool_daemon) as users:
        owner = users.make()
        w = create(pool_daemon, owner, f"sc{secrets.token_hex(3)}", image=debian_image)
        yield str(w["ref"])


def perl(d: Daemon, ref: str, code: str) -> str:
    res = run(d, ref, "perl", "-e", code)
    assert res["exit_code"] == 0, res
    return str(res["stdout"])


def errnos(d: Daemon, ref: str, calls: dict[str, str], setup: str = "") -> dict[str, int]:
    """The errno of each perl ``syscall(...)`` expression, run in one exec; 0 if it worked.

    A child that a successful clone made (on a kernel without the filter)
    exits at once: getpid is asked of the kernel, as perl's $$ would not know.
    """
    lines = "".join(
        f"{{ my $r = {call}; exit 0 if $r == 0 && syscall(39) != $me;"
        f' print "{name} ", ($r == -1 ? $!+0 : 0), "\\n"; }}'
        for name, call in calls.items()
    )
    # str(): syscall() writes into string arguments, so no literal may be passed
    prelude = "sub str { my $s = shift; $s } my $me = syscall(39);"
    out = perl(d, ref, f"{prelude} {setup};" + lines)
    return {name: int(v) for name, v in (line.split() for line in out.splitlines())}


# -- the filter and the capabilities are in place ---------------------------------------


def test_status_shows_the_filter_and_the_reduced_capabilities(pool_daemon: Daemon, ws: str) -> None:
    status = dict(
        line.split(":\t", 1)
        for line in run(pool_daemon, ws, "cat", "/proc/self/status")["stdout"].splitlines()
        if ":\t" in line
    )
    assert status["Seccomp"].strip() == "2"  # a filter
    expected = sum(1 << n for n in GRANTED.values())
    for field in ("CapBnd", "CapEff", "CapPrm"):
        assert int(status[field], 16) == expected, (field, status[field])
    assert status["NoNewPrivs"].strip() == "0"  # sudo and su keep working


# -- namespaces -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["unshare", "-U", "true"],
        ["unshare", "-Urn", "true"],
        ["unshare", "-n", "true"],
        ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs none /mnt"],
    ],
    ids=["user", "user+net", "net", "user+mount, then mount"],
)
def test_nested_namespaces_are_refused(pool_daemon: Daemon, ws: str, argv: list[str]) -> None:
    res = run(pool_daemon, ws, *argv)
    assert res["exit_code"] != 0, res
    assert "Operation not permitted" in res["stderr"], res


def test_clone_with_namespace_flags_and_clone3(pool_daemon: Daemon, ws: str) -> None:
    got = errnos(
        pool_daemon,
        ws,
        {
            # a fork into a new user namespace (the child, had it run, exits)
            "clone_newuser": f"syscall(56, {CLONE_NEWUSER | SIGCHLD}, 0, 0, 0, 0)",
            "clone_newnet": f"syscall(56, {0x40000000 | SIGCHLD}, 0, 0, 0, 0)",
            "unshare_newuser": f"syscall(272, {CLONE_NEWUSER})",
            "unshare_newtime": "syscall(272, 0x80)",
            "setns": "syscall(308, 0, 0)",
            # flags in memory, out of the filter's sight: ENOSYS, glibc falls back to clone
            "clone3": "syscall(435, 0, 0)",
            # a control: unshare of the file table only is fine
            "unshare_files": "syscall(272, 0x400)",
        },
        setup="$SIG{CHLD} = 'IGNORE'",
    )
    assert got == {
        "clone_newuser": errno.EPERM,
        "clone_newnet": errno.EPERM,
        "unshare_newuser": errno.EPERM,
        "unshare_newtime": errno.EPERM,
        "setns": errno.EPERM,
        "clone3": errno.ENOSYS,
        "unshare_files": 0,
    }


# -- kernel interfaces with a record of escalations ---------------------------------------


def test_kernel_attack_surface_is_refused(pool_daemon: Daemon, ws: str) -> None:
    # perf_event_attr (version 0, 64 bytes): software task clock of this process,
    # user space only: what perf_event_paranoid 2 lets anyone open.
    attr = 'my $attr = pack("LLQQQQQ", 1, 64, 1, 0, 0, 0, 0x60) . "\\0" x 8'
    got = errnos(
        pool_daemon,
        ws,
        {
            "keyctl": "syscall(250, 0, -3, 1)",  # KEYCTL_GET_KEYRING_ID of the session keyring
            "add_key": 'syscall(248, str("user"), str("den"), str("x"), 1, -3)',
            "request_key": 'syscall(249, str("user"), str("den"), 0, 0)',
            "io_uring_setup": 'syscall(425, 1, str("\\0" x 120))',
            "userfaultfd": "syscall(323, 1)",  # UFFD_USER_MODE_ONLY: allowed without privilege
            "bpf": "syscall(321, 9999, 0, 0)",  # an unknown command: EINVAL were it reached
            "perf_event_open": "syscall(298, $attr, 0, -1, -1, 0)",
            "vsock": "syscall(41, 40, 1, 0)",  # AF_VSOCK reaches the hypervisor, past the netns
        },
        setup=attr,
    )
    assert got == dict.fromkeys(got, errno.EPERM), got


def test_what_the_profile_does_not_allow_is_not_implemented(pool_daemon: Daemon, ws: str) -> None:
    got = errnos(
        pool_daemon,
        ws,
        {
            # statmount (Linux 6.8) is newer than the profile: as on an older kernel
            "statmount": "syscall(457, 0, 0, 0, 0)",
            # READ_IMPLIES_EXEC is not among the personalities allowed
            "personality_read_implies_exec": "syscall(135, 0x0400000)",
            # a control: the query is (it returns the current personality, 0)
            "personality_query": "syscall(135, 0xffffffff)",
        },
    )
    assert got == {
        "statmount": errno.ENOSYS,
        "personality_read_implies_exec": errno.ENOSYS,
        "personality_query": 0,
    }


def test_mount_family_is_refused(pool_daemon: Daemon, ws: str) -> None:
    # Root in the workspace lacks CAP_SYS_ADMIN as well; the filter refuses
    # them first, and the nested user namespaces that would grant it are
    # refused above.
    got = errnos(
        pool_daemon,
        ws,
        {
            "mount": 'syscall(165, str("none"), str("/mnt"), str("tmpfs"), 0, 0)',
            "umount2": 'syscall(166, str("/code"), 2)',
            "pivot_root": 'syscall(155, str("/"), str("/"))',
            "open_tree": 'syscall(428, -100, str("/"), 1)',
            "fsopen": 'syscall(430, str("tmpfs"), 0)',
            "mount_setattr": 'syscall(442, -100, str("/"), 0, 0, 0)',
        },
    )
    assert got == dict.fromkeys(got, errno.EPERM), got


# -- capabilities that are gone ---------------------------------------------------------


def test_root_cannot_ptrace_another_users_process(pool_daemon: Daemon, ws: str) -> None:
    """Without CAP_SYS_PTRACE (and no Yama here) only same-uid processes can be attached."""
    out = perl(
        pool_daemon,
        ws,
        r"""
        sub start { my @argv = @_; my $pid = fork; if (!$pid) { exec @argv; exit 1 } $pid }
        sub uid_of { open my $f, "<", "/proc/$_[0]/status" or return -1;
                     while (<$f>) { return (split)[1] if /^Uid:/ } -1 }
        my $other = start("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                          "sleep", "60");
        my $mine = start("sleep", "60");
        for (1..100) { last if uid_of($other) == 1000; select undef, undef, undef, 0.05 }
        die "setpriv did not switch" unless uid_of($other) == 1000;
        my $r = syscall(101, 16, $other, 0, 0);  # PTRACE_ATTACH
        print "other ", ($r == -1 ? $!+0 : 0), "\n";
        $r = syscall(101, 16, $mine, 0, 0);  # a process of root's own: debuggers work
        print "mine ", ($r == -1 ? $!+0 : 0), "\n";
        kill 9, $other, $mine; waitpid $other, 0; waitpid $mine, 0;
        """,
    )
    assert out.split() == ["other", str(errno.EPERM), "mine", "0"], out


def test_raw_and_packet_sockets_and_device_nodes_are_refused(pool_daemon: Daemon, ws: str) -> None:
    """The kernel wants these capabilities of the namespaces' owner (the host's user
    namespace) too: the dropped capabilities and the filter are a second wall."""
    got = errnos(
        pool_daemon,
        ws,
        {
            "raw_icmp": "syscall(41, 2, 3, 1)",  # AF_INET, SOCK_RAW, IPPROTO_ICMP
            "packet": "syscall(41, 17, 3, 0x0300)",  # AF_PACKET, SOCK_RAW, ETH_P_ALL
            "packet_dgram": "syscall(41, 17, 2, 0x0300)",  # AF_PACKET, SOCK_DGRAM
            "raw6_cloexec": "syscall(41, 10, 0x80003, 58)",  # AF_INET6, SOCK_RAW|SOCK_CLOEXEC
            "sock_packet": "syscall(41, 2, 10, 0x0300)",  # AF_INET, SOCK_PACKET
            # mknod /tmp/null c 1 3 (the kernel, too, wants CAP_MKNOD of the host)
            "mknod_char": 'syscall(133, str("/tmp/den-null"), 020600, 0x103)',
        },
    )
    assert got == dict.fromkeys(got, errno.EPERM), got
    assert run(pool_daemon, ws, "test", "-e", "/tmp/den-null")["exit_code"] == 1
    # ping without CAP_NET_RAW: ICMP datagram sockets (net.ipv4.ping_group_range)
    # Controls: ping without raw sockets (ICMP datagram sockets, allowed by
    # net.ipv4.ping_group_range), and netlink, which is SOCK_RAW by design (ip,
    # and libaudit in su and sudo).
    controls = {
        "icmp_dgram": "syscall(41, 2, 2, 1)",
        "netlink_route": "syscall(41, 16, 3, 0)",
        "netlink_audit": "syscall(41, 16, 0x80003, 9)",
    }
    assert errnos(pool_daemon, ws, controls) == dict.fromkeys(controls, 0)


# -- ioctls --------------------------------------------------------------------------------


def test_btrfs_subvolume_ioctls_are_refused(pool_daemon: Daemon, ws: str) -> None:
    """Also with the high 32 bits of the request set, which the kernel ignores."""
    name = "den-subvol"
    # btrfs_ioctl_vol_args(_v2) are 4096 bytes; the name sits after the fd in
    # v1, after fd, transid, flags and 32 reserved bytes in v2.
    setup = (
        'sysopen(my $dir, "/root", 0) or die "open: $!"; my $fd = fileno($dir);'
        f'my $v1 = pack("q", 0) . "{name}" . "\\0" x 4080;'
        f'my $v2 = pack("qQQ", 0, 0, 0) . "\\0" x 32 . "{name}" . "\\0" x 4030;'
    )
    calls = {}
    for ioctl, req in BTRFS_SUBVOL_IOCTLS.items():
        args = "$v2" if "V2" in ioctl else "$v1"
        calls[ioctl] = f"syscall(16, $fd, {req}, {args})"
        calls[ioctl + "|high"] = f"syscall(16, $fd, {req | HIGH}, {args})"
    got = errnos(pool_daemon, ws, calls, setup=setup)
    assert got == dict.fromkeys(got, errno.EPERM), got
    assert run(pool_daemon, ws, "test", "-e", f"/root/{name}")["exit_code"] == 1


def test_terminal_injection_ioctls_are_refused_other_ioctls_work(
    pool_daemon: Daemon, ws: str
) -> None:
    got = errnos(
        pool_daemon,
        ws,
        {
            # stdin is a pipe: ENOTTY were the request reached the kernel
            "TIOCSTI": f'syscall(16, 0, {TIOCSTI}, str("x"))',
            "TIOCSTI|high": f'syscall(16, 0, {TIOCSTI | HIGH}, str("x"))',
            "TIOCLINUX": f'syscall(16, 0, {TIOCLINUX}, str("x"))',
            # controls next to them: the tty type's other requests are allowed
            "FIONREAD": f"syscall(16, fileno($rd), {FIONREAD}, $n)",
            "TCGETS": f"syscall(16, fileno($rd), {TCGETS}, $buf)",
        },
        setup='pipe(my $rd, my $wr) or die; my $n = "\\0" x 8; my $buf = "\\0" x 64',
    )
    assert got == {
        "TIOCSTI": errno.EPERM,
        "TIOCSTI|high": errno.EPERM,
        "TIOCLINUX": errno.EPERM,
        "FIONREAD": 0,
        "TCGETS": errno.ENOTTY,
    }


# -- what workloads need keeps working ----------------------------------------------------


def test_fork_exec_threads_and_unshare_of_files_work(pool_daemon: Daemon, ws: str) -> None:
    out = perl(
        pool_daemon,
        ws,
        'my $pid = fork // die; if (!$pid) { exec "sh", "-c", "exit 7" } waitpid $pid, 0;'
        ' print $? >> 8, "\\n"; print `echo exec-ok`',
    )
    assert out.split() == ["7", "exec-ok"]
    # sort --parallel runs worker threads: pthread_create tries clone3 (ENOSYS)
    # and falls back to clone with thread flags, which the filter lets through.
    res = sh(pool_daemon, ws, "seq 1 200000 | sort -n -r --parallel=4 -S 8M | head -n 1")
    assert res["exit_code"] == 0 and res["stdout"].strip() == "200000", res


def test_reflink_copy_works(pool_daemon: Daemon, ws: str) -> None:
    res = sh(
        pool_daemon,
        ws,
        "head -c 1048576 /dev/urandom > /root/orig && cp --reflink=always /root/orig /root/copy"
        " && cmp /root/orig /root/copy && echo same; rm -f /root/orig /root/copy",
    )
    assert res["exit_code"] == 0 and res["stdout"].strip() == "same", res


def test_changing_user_chown_and_low_ports_work(pool_daemon: Daemon, ws: str) -> None:
    res = sh(
        pool_daemon,
        ws,
        "setpriv --reuid=1000 --regid=1000 --clear-groups id -u"
        " && su -s /bin/sh -c 'id -u' nobody"
        " && touch /tmp/owned && chown 1000:1000 /tmp/owned && stat -c %u:%g /tmp/owned"
        " && rm /tmp/owned",
    )
    assert res["exit_code"] == 0, res
    assert res["stdout"].split() == ["1000", "65534", "1000:1000"], res
    out = perl(
        pool_daemon,
        ws,
        "socket(my $s, 2, 1, 0) or die $!; setsockopt($s, 1, 2, 1);"
        ' bind($s, pack("SnNx8", 2, 80, 0)) or die "bind: $!"; print "bound\\n"',
    )
    assert out.strip() == "bound"


# -- the profile at the next start, and the setting that turns it off ------------------------


def status_field(d: Daemon, ref: str, field: str) -> str:
    for line in run(d, ref, "cat", "/proc/self/status")["stdout"].splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/self/status")


def test_a_workspace_from_an_older_bundle_gets_the_profile_at_its_next_start(
    pool_daemon: Daemon, debian_image: str
) -> None:
    with make_users(pool_daemon) as users:
        owner = users.make()
        w = create(pool_daemon, owner, "older", image=debian_image)
        cfg_path = Path(pool_daemon.data_dir) / "bundles" / str(w["id"]) / "config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text())
        # The filter, compiled by den at start (crun loads it as is).
        assert seccomp.BPF_ANNOTATION in cfg["annotations"]
        # What den wrote before it had a profile.
        del cfg["annotations"][seccomp.BPF_ANNOTATION]
        cfg["linux"].pop("seccomp", None)
        cfg_path.write_text(json.dumps(cfg))
        pool_daemon.call("workspace.stop", ref=w["ref"])
        pool_daemon.call("workspace.start", ref=w["ref"])
        assert status_field(pool_daemon, str(w["ref"]), "Seccomp") == "2"


def test_sandbox_seccomp_false_turns_the_filter_off() -> None:
    with own_daemon({"DEN_SANDBOX_SECCOMP": "false"}, size="2G") as d, make_users(d) as users:
        owner = users.make()
        w = create(d, owner, "nofilter", image=BB)
        assert status_field(d, str(w["ref"]), "Seccomp") == "0"
        # The capabilities stay reduced either way.
        caps = int(status_field(d, str(w["ref"]), "CapBnd"), 16)
        assert caps == sum(1 << n for n in GRANTED.values())


# -- the data file --------------------------------------------------------------------------


def test_every_syscall_name_in_the_profile_is_known_to_libseccomp() -> None:
    """A typo would silently deny a syscall (crun skips names it cannot resolve)."""
    profile = seccomp.parse(seccomp.PROFILE.read_text(), "x86_64")
    names = sorted({n for rule in profile["syscalls"] for n in rule["names"]})
    assert len(names) > 250
    assert seccomp.unknown_names(names) == []


def test_ioctl_rules_allow_everything_but_the_denied_requests() -> None:
    """The allow rules (masked comparisons) cover every 32-bit request but the denied ones."""
    profile = seccomp.load()
    allow = [
        (a["value"], a["valueTwo"])
        for rule in profile["syscalls"]
        if rule["names"] == ["ioctl"] and rule["action"] == "SCMP_ACT_ALLOW"
        for a in rule["args"]
    ]
    denied = {
        a["valueTwo"]
        for rule in profile["syscalls"]
        if rule["names"] == ["ioctl"] and rule["action"] == "SCMP_ACT_ERRNO"
        for a in rule["args"]
    }
    assert set(BTRFS_SUBVOL_IOCTLS.values()) | {TIOCSTI, TIOCLINUX} <= denied

    def allowed(req: int) -> bool:
        return any(req & mask == value for mask, value in allow)

    for req in denied:
        assert not allowed(req), hex(req)
        # every request one bit away from a denied one is allowed
        for b in range(32):
            assert allowed(req ^ (1 << b)) or req ^ (1 << b) in denied, (hex(req), b)
    for req in (0x40049409, 0x4020940D, 0x5401, 0x5413, 0x541B, 0x80045430, 0xC0189436):
        assert allowed(req), hex(req)  # FICLONE, FICLONERANGE, tty requests, FIDEDUPERANGE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[profile]\ndefault_errno = 'EPERM'\n", "no [architectures] entry"),
        ("[profile]\ndefault_errno = 'NOPE'\n", "not an errno name"),
        (
            "[profile]\ndefault_errno='ENOSYS'\n[architectures]\nx86_64=['SCMP_ARCH_X86_64']\n"
            "[[allow]]\ngroup='a'\nsyscalls=['read']\n[[deny]]\ngroup='b'\nerrno='EPERM'\n"
            "syscalls=['read']\n",
            "read is already in",
        ),
        (
            "[profile]\ndefault_errno='ENOSYS'\n[architectures]\nx86_64=['SCMP_ARCH_X86_64']\n"
            "[[allow]]\ngroup='files'\nsyscalls=['read']\nwhy='x'\n",
            "'files': unknown keys ['why']",
        ),
        (
            "[profile]\ndefault_errno='ENOSYS'\n[architectures]\nx86_64=['SCMP_ARCH_X86_64']\n"
            "[[allow]]\ngroup='socket'\nsyscalls=['socket']\n[[allow.when]]\narg=0\nbits=6\n"
            "except={AF_BIG=64}\n",
            "AF_BIG: 0x40 has bits outside 0x3f",
        ),
        ("[profile\n", "seccomp profile"),
    ],
)
def test_a_broken_profile_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(seccomp.ProfileError, match=message.replace("[", r"\[")):
        seccomp.parse(text, "x86_64")
