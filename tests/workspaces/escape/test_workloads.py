"""Positive controls of the escape suite: normal developer work still runs.

Every other test in this package shows an attack failing inside a workspace;
a sandbox that refused everything would pass them all. These tests run what
developers really do, in real workspaces from the dev image, under the same
seccomp profile, capability set and network policy, and check real results:

- ``apt-get update && apt-get install`` of a .deb built here, from an apt
  repository served inside the workspace on 127.0.0.1 (apt's fetcher drops to
  the ``_apt`` user; the postinst adds a system user and chowns/chmods files);
- ``pip install`` of a wheel built here into a ``python3 -m venv``, no index;
- ``git clone`` of a local repo, a commit, a push back;
- gcc: a C program with threads and fork;
- node and Python web servers, reached from inside and from the host;
- ``sudo`` for a normal user (setuid works: no_new_privs stays off);
- ``tmux``: a detached session runs a command, capture-pane shows it;
- ``ping`` as root and as a user: Debian's ping carries the file capability
  cap_net_raw=ep, which execve refuses when the bounding set lacks it; the
  packets go through ICMP datagram sockets (ping_group_range).

Nothing leaves the workspace but loopback and the host's reach into it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import secrets
import shlex
import subprocess
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.workspaces import conftest as wsc
from tests.workspaces.conftest import create, make_users, wait_for

# The escape suite acts as root inside, the most a workspace has (exec's default
# is the owner's own account).
ok = partial(wsc.ok, user="root")
run = partial(wsc.run, user="root")
sh = partial(wsc.sh, user="root")


def detach(d: Daemon, ref: str, script: str) -> None:
    """:func:`tests.workspaces.conftest.detach`, as root."""
    inner = script.replace("'", "'\"'\"'")
    ok(d, ref, f"setsid sh -c '{inner}' </dev/null >/dev/null 2>&1 &")


pytestmark = pytest.mark.slow

DEV_USER = "alice"


@dataclass
class Ws:
    ref: str
    address: str


@pytest.fixture(scope="module")
def ws(pool_daemon: Daemon, dev_image: str) -> Iterator[Ws]:
    """One dev workspace for the module, with a normal user ``alice`` (uid 1001; 1000 is
    the owner's own account)."""
    with make_users(pool_daemon) as users:
        owner = users.make()
        made = create(pool_daemon, owner, f"wl{secrets.token_hex(3)}", image=dev_image)
        w = Ws(ref=f"{owner}/{made['name']}", address=str(made["address"]))
        # The image has no user of its own: a developer's account, as an
        # image's setup script would make it.
        ok(pool_daemon, w.ref, f"useradd -m -u 1001 -s /bin/bash {DEV_USER}")
        yield w


def put(d: Daemon, ref: str, path: str, data: bytes, user: str = "root") -> None:
    """Write ``data`` to ``path`` inside the workspace (through exec's stdin)."""
    script = f"base64 -d > {shlex.quote(path)}"
    res = run(d, ref, "sh", "-c", script, stdin=base64.b64encode(data).decode(), user=user)
    assert res["exit_code"] == 0, res


def as_dev(d: Daemon, ref: str, script: str, **kw: Any) -> str:
    """Run ``script`` as the normal user, in its home, with a login-like environment."""
    env = {"HOME": f"/home/{DEV_USER}", "USER": DEV_USER, "LOGNAME": DEV_USER}
    return ok(d, ref, script, user=DEV_USER, cwd=f"/home/{DEV_USER}", env=env, **kw)


def free_port_inside(d: Daemon, ref: str) -> int:
    out = ok(
        d,
        ref,
        'python3 -c \'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); '
        "print(s.getsockname()[1])'",
    )
    return int(out)


# -- apt-get ---------------------------------------------------------------------

PKG = "denprobe"
POSTINST = f"""#!/bin/sh
set -e
if [ "$1" = configure ]; then
    adduser --system --group --home /var/lib/{PKG} --no-create-home {PKG} >/dev/null
    install -d -m 0750 /var/lib/{PKG}
    chown {PKG}:{PKG} /var/lib/{PKG}
    echo state > /var/lib/{PKG}/state
    chown {PKG}:{PKG} /var/lib/{PKG}/state
    chmod 0600 /var/lib/{PKG}/state
fi
"""


def build_deb(out: Path) -> Path:
    """A tiny arch-all .deb made with dpkg-deb on the host.

    One file in it belongs to 1234:2345 with mode 0640, so dpkg inside must
    chown and chmod while unpacking.
    """
    root = out / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {PKG}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: den tests <den@localhost>\nDepends: adduser\n"
        "Description: den workload probe\n a package the escape suite installs\n"
    )
    postinst = root / "DEBIAN/postinst"
    postinst.write_text(POSTINST)
    postinst.chmod(0o755)
    (root / "usr/bin").mkdir(parents=True)
    tool = root / f"usr/bin/{PKG}"
    tool.write_text("#!/bin/sh\necho probe-installed\n")
    tool.chmod(0o755)
    (root / f"usr/share/{PKG}").mkdir(parents=True)
    owned = root / f"usr/share/{PKG}/owned"
    owned.write_text("owned\n")
    os.chown(owned, 1234, 2345)
    owned.chmod(0o640)
    deb = out / f"{PKG}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "--build", str(root), str(deb)], check=True, capture_output=True
    )
    return deb


def packages_index(deb: Path) -> str:
    """The stanza apt needs for one .deb in a flat repository (``Packages``)."""
    fields = subprocess.run(
        ["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True
    ).stdout.rstrip("\n")
    data = deb.read_bytes()
    return (
        f"{fields}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
        f"MD5sum: {hashlib.md5(data).hexdigest()}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n\n"
    )


def test_apt_get_install_from_a_local_repository(pool_daemon: Daemon, ws: Ws) -> None:
    d = pool_daemon
    with tempfile.TemporaryDirectory(prefix="den-deb-") as tmp:
        deb = build_deb(Path(tmp))
        ok(d, ws.ref, "mkdir -p /srv/repo")
        put(d, ws.ref, f"/srv/repo/{deb.name}", deb.read_bytes())
        put(d, ws.ref, "/srv/repo/Packages", packages_index(deb).encode())
    port = free_port_inside(d, ws.ref)
    detach(d, ws.ref, f"cd /srv/repo && exec python3 -m http.server --bind 127.0.0.1 {port}")
    assert wait_for(
        lambda: (
            sh(
                d,
                ws.ref,
                f"python3 -c 'import urllib.request as u; "
                f'u.urlopen("http://127.0.0.1:{port}/Packages")\'',
            )["exit_code"]
            == 0
        )
    )
    # Only the local repository: nothing is fetched from beyond loopback.
    ok(
        d,
        ws.ref,
        "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*; "
        f"echo 'deb [trusted=yes] http://127.0.0.1:{port}/ ./' "
        "> /etc/apt/sources.list.d/local.list",
    )
    res = sh(d, ws.ref, "apt-get update", timeout=120)
    assert res["exit_code"] == 0, res
    assert f"127.0.0.1:{port}" in res["stdout"], res
    # The fetch ran as _apt: apt warns when it has to fall back to root.
    assert "unsandboxed" not in res["stderr"], res
    res = sh(
        d,
        ws.ref,
        f"DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {PKG}",
        timeout=180,
    )
    assert res["exit_code"] == 0, res
    assert "unsandboxed" not in res["stderr"], res
    assert ok(d, ws.ref, f"{PKG}").strip() == "probe-installed"
    assert ok(d, ws.ref, f"dpkg-query -W -f '${{Status}}' {PKG}") == "install ok installed"
    # The postinst's system user, chown and chmod took effect.
    uid = ok(d, ws.ref, f"id -u {PKG}").strip()
    assert 100 <= int(uid) < 1000, uid
    assert ok(d, ws.ref, f"stat -c '%U:%G %a' /var/lib/{PKG} /var/lib/{PKG}/state").split("\n")[
        :2
    ] == [f"{PKG}:{PKG} 750", f"{PKG}:{PKG} 600"]
    # dpkg kept the owner and mode the package gave its file.
    assert ok(d, ws.ref, f"stat -c '%u:%g %a' /usr/share/{PKG}/owned").strip() == "1234:2345 640"
    # ...and the user can read its own state, which others cannot.
    assert ok(d, ws.ref, f"runuser -u {PKG} -- cat /var/lib/{PKG}/state").strip() == "state"
    res = sh(d, ws.ref, f"cat /var/lib/{PKG}/state", user=DEV_USER)
    assert res["exit_code"] != 0, res


# -- pip -------------------------------------------------------------------------

WHEEL_PKG = "denwheel"


def build_wheel(version: str = "1.0") -> tuple[str, bytes]:
    """A pure-Python wheel: a zip of the module and its METADATA, WHEEL and RECORD."""
    dist = f"{WHEEL_PKG}-{version}.dist-info"
    files = {
        f"{WHEEL_PKG}/__init__.py": (
            "import os\n\n\ndef hello() -> str:\n    return f'wheel says hi to {os.getuid()}'\n"
        ),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {WHEEL_PKG}\nVersion: {version}\n",
        f"{dist}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: den-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    return f"{WHEEL_PKG}-{version}-py3-none-any.whl", buf.getvalue()


def test_pip_install_of_a_local_wheel_into_a_venv(pool_daemon: Daemon, ws: Ws) -> None:
    d = pool_daemon
    name, wheel = build_wheel()
    as_dev(d, ws.ref, "mkdir -p wheels")
    put(d, ws.ref, f"/home/{DEV_USER}/wheels/{name}", wheel, user=DEV_USER)
    out = as_dev(
        d,
        ws.ref,
        "python3 -m venv venv && "
        f"venv/bin/pip install --no-index --find-links wheels {WHEEL_PKG} && "
        f"venv/bin/python -c 'import {WHEEL_PKG}; print({WHEEL_PKG}.hello())'",
        timeout=180,
    )
    assert f"Successfully installed {WHEEL_PKG}-1.0" in out, out
    assert out.strip().endswith("wheel says hi to 1001"), out
    listed = as_dev(d, ws.ref, "venv/bin/pip list --format=freeze")
    assert f"{WHEEL_PKG}==1.0" in listed.split(), listed


# -- git -------------------------------------------------------------------------


def test_git_clone_commit_and_push_of_a_local_repo(pool_daemon: Daemon, ws: Ws) -> None:
    d = pool_daemon
    out = as_dev(
        d,
        ws.ref,
        """set -e
        git config --global user.name Alice
        git config --global user.email alice@example.invalid
        git config --global init.defaultBranch main
        git init -q --bare origin.git
        git init -q seed && cd seed
        echo one > file && git add file && git commit -qm first
        git remote add origin ../origin.git && git push -q origin main
        cd .. && git clone -q origin.git clone && cd clone
        echo two >> file && git commit -qam second && git push -q origin main
        git -C ../origin.git log --format=%s main
        git -C ../origin.git show main:file
        """,
    )
    assert out.split() == ["second", "first", "one", "two"], out


# -- gcc -------------------------------------------------------------------------

C_PROGRAM = r"""
#include <pthread.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static long sums[4];

static void *work(void *arg) {
    long i = (long)arg, s = 0;
    for (long k = 1; k <= 1000; k++) s += k * (i + 1);
    sums[i] = s;
    return NULL;
}

int main(void) {
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, work, (void *)i);
    long total = 0;
    for (int i = 0; i < 4; i++) { pthread_join(t[i], NULL); total += sums[i]; }
    pid_t pid = fork();
    if (pid == 0) _exit(42);
    int status = 0;
    waitpid(pid, &status, 0);
    printf("threads %ld child %d\n", total, WEXITSTATUS(status));
    return 0;
}
"""

MAKEFILE = "prog: prog.c\n\t$(CC) -O2 -Wall -Werror -pthread -o $@ $<\n"


def test_gcc_builds_and_runs_a_threaded_forking_program(pool_daemon: Daemon, ws: Ws) -> None:
    d = pool_daemon
    as_dev(d, ws.ref, "mkdir -p cprog")
    put(d, ws.ref, f"/home/{DEV_USER}/cprog/prog.c", C_PROGRAM.encode(), user=DEV_USER)
    put(d, ws.ref, f"/home/{DEV_USER}/cprog/Makefile", MAKEFILE.encode(), user=DEV_USER)
    out = as_dev(d, ws.ref, "cd cprog && make -s && ./prog", timeout=120)
    # 500500 * (1 + 2 + 3 + 4); the child's exit status came back through waitpid.
    assert out.strip() == "threads 5005000 child 42", out


# -- node and web servers ------------------------------------------------------------

NODE_SERVER = """
const http = require('http');
const server = http.createServer((req, res) => res.end('node says ' + req.url + '\\n'));
server.listen(Number(process.argv[2]), '0.0.0.0');
"""


def test_node_and_web_servers_inside_and_from_the_host(pool_daemon: Daemon, ws: Ws) -> None:
    d = pool_daemon
    assert as_dev(d, ws.ref, "node -e 'console.log([1, 2, 3].map(x => x * 7).join(\",\"))'") == (
        "7,14,21\n"
    )
    # Dev servers print the workspace's addresses (getifaddrs: a netlink socket).
    addrs = as_dev(
        d,
        ws.ref,
        'node -e \'for (const a of Object.values(require("os").networkInterfaces()).flat()) '
        "console.log(a.address)'",
    )
    assert {"127.0.0.1", ws.address} <= set(addrs.split()), addrs
    put(d, ws.ref, f"/home/{DEV_USER}/server.js", NODE_SERVER.encode(), user=DEV_USER)
    node_port = free_port_inside(d, ws.ref)
    detach(d, ws.ref, f"exec runuser -u {DEV_USER} -- node /home/{DEV_USER}/server.js {node_port}")
    fetch = (
        'node -e \'require("http").get(process.argv[1], r => '
        '{ let b = ""; r.on("data", c => b += c); r.on("end", () => process.stdout.write(b)); })'
        '.on("error", () => process.exit(1))\' '
    )
    url = f"http://127.0.0.1:{node_port}/inside"
    assert wait_for(lambda: sh(d, ws.ref, fetch + url)["stdout"] == "node says /inside\n")
    # A Python server of the normal user, fetched with node from inside...
    as_dev(d, ws.ref, "mkdir -p www && echo 'python says hi' > www/index.html")
    py_port = free_port_inside(d, ws.ref)
    detach(
        d,
        ws.ref,
        f"cd /home/{DEV_USER}/www && exec runuser -u {DEV_USER} -- "
        f"python3 -m http.server --bind 0.0.0.0 {py_port}",
    )
    url = f"http://127.0.0.1:{py_port}/"
    assert wait_for(lambda: sh(d, ws.ref, fetch + url)["stdout"] == "python says hi\n")
    # ...and both from the host (root on the host reaches workspaces).
    for port, body in ((py_port, b"python says hi\n"), (node_port, b"node says /host\n")):
        path = "/host" if port == node_port else "/"
        with urllib.request.urlopen(f"http://{ws.address}:{port}{path}", timeout=5) as resp:
            assert resp.read() == body


# -- sudo ------------------------------------------------------------------------


def test_sudo_for_a_normal_user(pool_daemon: Daemon, ws: Ws) -> None:
    d = pool_daemon
    put(d, ws.ref, f"/etc/sudoers.d/{DEV_USER}", f"{DEV_USER} ALL=(ALL) NOPASSWD: ALL\n".encode())
    ok(d, ws.ref, f"chmod 0440 /etc/sudoers.d/{DEV_USER}")
    assert as_dev(d, ws.ref, "id -u").strip() == "1001"
    # sudo is setuid root: this works only while no_new_privs stays off.
    assert as_dev(d, ws.ref, "grep NoNewPrivs /proc/self/status").split() == ["NoNewPrivs:", "0"]
    assert as_dev(d, ws.ref, "sudo -n id -u").strip() == "0"
    assert as_dev(d, ws.ref, "sudo -n -u nobody id -un").strip() == "nobody"
    # A root-only file, read through sudo.
    assert as_dev(d, ws.ref, "sudo -n head -c 5 /etc/shadow").startswith("root:")
    res = sh(d, ws.ref, "cat /etc/shadow", user=DEV_USER)
    assert res["exit_code"] != 0, res


# -- tmux ------------------------------------------------------------------------


def test_tmux_detached_session_runs_a_command(pool_daemon: Daemon, ws: Ws) -> None:
    d = pool_daemon
    session = f"s{secrets.token_hex(3)}"
    as_dev(
        d,
        ws.ref,
        f"tmux new-session -d -s {session} -x 120 -y 30 "
        "'echo tmux-says-$((6 * 7)); tty; exec sleep 300'",
    )
    try:
        shown = wait_for(
            lambda: "tmux-says-42" in as_dev(d, ws.ref, f"tmux capture-pane -p -t {session}")
        )
        pane = as_dev(d, ws.ref, f"tmux capture-pane -p -t {session}")
        assert shown, pane
        assert "/dev/pts/" in pane, pane
        # The session is alive and answers commands.
        assert session in as_dev(d, ws.ref, "tmux list-sessions -F '#S'").split()
    finally:
        sh(d, ws.ref, "tmux kill-server", user=DEV_USER, env={"HOME": f"/home/{DEV_USER}"})


# -- ping ------------------------------------------------------------------------


def test_ping_as_root_and_as_a_user(pool_daemon: Daemon, ws: Ws) -> None:
    d = pool_daemon
    for target in ("127.0.0.1", ws.address):
        for user in ("root", DEV_USER):
            res = sh(d, ws.ref, f"ping -c 2 -i 0.2 -W 2 {target}", user=user)
            assert res["exit_code"] == 0, (target, user, res)
            assert "2 received" in res["stdout"], res
    # What ping sends through: an ICMP datagram socket, open to every user.
    probe = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)"
    as_dev(d, ws.ref, f"python3 -c {shlex.quote(probe)}")


# -- the controls ran confined -------------------------------------------------------

CAP_MKNOD = 27
CAP_AUDIT_WRITE = 29
CAP_SYS_PTRACE = 19


def test_the_controls_run_confined(pool_daemon: Daemon, ws: Ws) -> None:
    """The tests above mean something only under the hardened sandbox itself."""
    status = dict(
        line.split(":\t", 1)
        for line in as_dev(pool_daemon, ws.ref, "cat /proc/self/status").splitlines()
        if ":\t" in line
    )
    assert status["Seccomp"].strip() == "2", status  # a filter, not "0" (none)
    bounding = int(status["CapBnd"], 16)
    dropped = 1 << CAP_SYS_PTRACE | 1 << CAP_MKNOD | 1 << CAP_AUDIT_WRITE
    assert not bounding & dropped, hex(bounding)
    assert status["NoNewPrivs"].strip() == "0", status  # sudo above needs setuid
