"""``ssh -A``: the client's agent inside the workspace, at one stable socket per
(workspace, den user), served only by connections that asked to forward it.

Real OpenSSH clients with a real ssh-agent each, against the real daemon; the
git test clones from a real sshd in a network namespace the test makes."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from den.backends import seccomp
from den.ssh import join
from tests.conftest import ssh_key
from tests.helpers.outside import outside_host
from tests.ssh.conftest import Person, make_ws


@dataclass
class Agent:
    sock: Path
    fingerprint: str  # of the one key it holds
    pub: str


@contextlib.contextmanager
def ssh_agent(label: str) -> Iterator[Agent]:
    """A real ssh-agent (stopped by its PID) holding one fresh key."""
    base = Path(tempfile.mkdtemp(prefix="dag-"))
    sock = base / "agent.sock"
    proc = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "ssh-agent did not start"
            time.sleep(0.05)
        key = base / "id"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", label, "-f", str(key)],
            check=True,
        )
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True)
        out = subprocess.run(
            ["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True, check=True
        ).stdout
        yield Agent(sock, out.split()[1], Path(f"{key}.pub").read_text().strip())
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def fingerprint_of(pub: str) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", "-"], input=pub, capture_output=True, text=True, check=True
    ).stdout
    return out.split()[1]


def argv(p: Person, login: str, *cmd: str, forward: bool) -> list[str]:
    return ["ssh", *p.opts(), "-A" if forward else "-a", f"{login}@127.0.0.1", *cmd]


def env_of(agent: Agent | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    if agent is not None:
        env["SSH_AUTH_SOCK"] = str(agent.sock)
    return env


def run(
    p: Person, login: str, script: str, agent: Agent | None = None, forward: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv(p, login, script, forward=forward and agent is not None),
        env=env_of(agent),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def held(p: Person, login: str, agent: Agent, script: str = "") -> Iterator[subprocess.Popen[str]]:
    """A forwarding connection kept open (its session prints "ready" once running)."""
    proc = subprocess.Popen(
        argv(p, login, f"{script} echo ready; exec sleep 600", forward=True),
        env=env_of(agent),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() else "")
        yield proc
    finally:
        close(proc)


def close(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def listing(p: Person, ws: str, path: str) -> subprocess.CompletedProcess[str]:
    """``ssh-add -l`` against ``path`` from a connection that forwards nothing."""
    return run(p, ws, f"SSH_AUTH_SOCK={path} ssh-add -l")


def serves_nothing(p: Person, ws: str, path: str) -> bool:
    """The socket at ``path`` gives no keys (polled: the daemon sees a closed
    connection a moment after the client is gone)."""
    deadline = time.monotonic() + 10
    while True:
        res = listing(p, ws, path)
        if res.returncode != 0:  # ssh-add -l succeeds only listing keys
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def test_forwarded_agent_lists_the_client_key(alice: Person, dev_image: str) -> None:
    ws = make_ws(alice, image=dev_image)
    before = set(Path("/tmp").glob("asyncssh-*"))
    with ssh_agent("laptop") as agent:
        res = run(alice, ws, 'echo "sock=$SSH_AUTH_SOCK"; ssh-add -l', agent)
        assert res.returncode == 0, res.stderr
        assert f"sock=/run/den-agent/{alice.name}.sock" in res.stdout
        assert agent.fingerprint in res.stdout, res.stdout
        # The socket file inside is the session account's alone.
        res = run(alice, ws, 'stat -c "%u %a" $SSH_AUTH_SOCK; id -u', agent)
        (owner, mode), uid = (line.split() for line in res.stdout.splitlines()[:2])
        assert (owner, mode) == (uid[0], "600"), res.stdout
    # asyncssh's own listener (a directory in the host's /tmp) was never made.
    assert set(Path("/tmp").glob("asyncssh-*")) == before


def test_without_forwarding_no_agent_is_served(alice: Person, dev_image: str) -> None:
    ws = make_ws(alice, image=dev_image)
    path = f"/run/den-agent/{alice.name}.sock"
    with ssh_agent("laptop") as agent:
        # Made once by a forwarding connection, then that connection closed.
        assert run(alice, ws, "ssh-add -l", agent).returncode == 0
        res = run(
            alice,
            ws,
            f'echo "[$SSH_AUTH_SOCK]"; SSH_AUTH_SOCK={path} ssh-add -l',
            agent,
            forward=False,
        )
        assert "[]" in res.stdout, res.stdout
        assert agent.fingerprint not in res.stdout
        assert res.returncode != 0, (res.stdout, res.stderr)  # no keys


def test_consent_is_per_connection(alice: Person, dev_image: str) -> None:
    """With one connection forwarding agent A, a connection without -A whose
    client has agent B can use the workspace's socket, but B is never asked."""
    ws = make_ws(alice, image=dev_image)
    path = f"/run/den-agent/{alice.name}.sock"
    with ssh_agent("a") as a, ssh_agent("b") as b, held(alice, ws, a):
        res = run(alice, ws, f"SSH_AUTH_SOCK={path} ssh-add -l", b, forward=False)
        assert res.returncode == 0, res.stderr
        assert a.fingerprint in res.stdout and b.fingerprint not in res.stdout


def test_the_socket_outlives_the_connection_that_made_it(alice: Person, dev_image: str) -> None:
    """The tmux case: a process started in the first connection asks the agent
    after that connection closed; the second, newer one serves it. When the last
    closes, the socket serves nothing."""
    ws = make_ws(alice, image=dev_image)
    path = f"/run/den-agent/{alice.name}.sock"
    late = f"/tmp/late-{secrets.token_hex(3)}"
    waiter = (
        f"setsid sh -c 'while [ ! -e {late}.go ]; do sleep 0.1; done; "
        f"ssh-add -l > {late} 2>&1; echo rc=$? >> {late}' </dev/null >/dev/null 2>&1 &"
    )
    with ssh_agent("first") as a, ssh_agent("second") as b:
        with held(alice, ws, a, waiter) as first, held(alice, ws, b):
            # Both forward: the newest is asked.
            res = listing(alice, ws, path)
            assert b.fingerprint in res.stdout and a.fingerprint not in res.stdout, res
            close(first)
            assert run(alice, ws, f"touch {late}.go").returncode == 0
            deadline = time.monotonic() + 20
            while "rc=" not in (out := run(alice, ws, f"cat {late} 2>/dev/null").stdout):
                assert time.monotonic() < deadline, "the waiting process never asked"
                time.sleep(0.2)
            assert "rc=0" in out and b.fingerprint in out, out
        assert serves_nothing(alice, ws, path)
        # A later forwarding connection brings it back at the same path.
        res = run(alice, ws, 'echo "$SSH_AUTH_SOCK"; ssh-add -l', a)
        assert res.returncode == 0 and path in res.stdout and a.fingerprint in res.stdout


def test_restarted_workspace_gets_a_new_socket(alice: Person, dev_image: str) -> None:
    ws = make_ws(alice, image=dev_image)
    ref = f"{alice.name}/{ws}"
    with ssh_agent("laptop") as agent, held(alice, ws, agent):
        alice.d.call("workspace.stop", ref=ref)
        alice.d.call("workspace.start", ref=ref)
        # A new container: the connection still open serves its next sessions there.
        res = run(alice, ws, "ssh-add -l", agent)
        assert res.returncode == 0 and agent.fingerprint in res.stdout, res


def test_a_revoked_key_stops_serving(alice: Person, dev_image: str, tmp_path: Path) -> None:
    """The connection of a removed key ends, and its agent is asked nothing more."""
    ws = make_ws(alice, image=dev_image)
    path = f"/run/den-agent/{alice.name}.sock"
    key, pub = ssh_key(tmp_path, "second")
    alice.d.call("key.add", user=alice.name, key=pub)
    other = Person(alice.d, alice.name, key, alice.port)
    with ssh_agent("laptop") as agent, held(alice, ws, agent) as conn:
        assert agent.fingerprint in listing(other, ws, path).stdout
        fp = next(
            k
            for k in alice.d.call("key.list", user=alice.name)
            if k["fingerprint"] != fingerprint_of(pub)
        )["fingerprint"]
        alice.d.call("key.remove", user=alice.name, fingerprint=fp)
        conn.wait(20)
        assert serves_nothing(other, ws, path)


def test_git_clone_over_ssh_with_the_forwarded_key(
    alice: Person, dev_image: str, tmp_path: Path
) -> None:
    """A git server (Debian's sshd, in a network namespace of the test's own)
    that knows only the key in the client's agent."""
    ws = make_ws(alice, image=dev_image)
    base = Path(tempfile.mkdtemp(prefix="dgit-"))
    try:
        repo = base / "repo.git"
        work = base / "work"
        subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
        subprocess.run(["git", "init", "-q", str(work)], check=True)
        (work / "README").write_text("from the forwarded key\n")
        git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "add", "README"], check=True)
        subprocess.run([*git, "commit", "-qm", "first"], check=True)
        subprocess.run([*git, "push", "-q", str(repo), "HEAD:refs/heads/main"], check=True)
        subprocess.run(["git", "-C", str(repo), "symbolic-ref", "HEAD", "refs/heads/main"])
        with ssh_agent("deploy") as agent, outside_host() as host:
            hostkey = base / "hostkey"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)])
            # The key may only fetch this repository.
            (base / "authorized_keys").write_text(
                f'restrict,command="git-upload-pack {repo}" {agent.pub}\n'
            )
            (base / "sshd_config").write_text(
                f"HostKey {hostkey}\nAuthorizedKeysFile {base}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n"
            )
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
            host.start(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(base / "sshd_config")], base / "sshd.log"
            )
            opts = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"
            clone = (
                f'GIT_SSH_COMMAND="ssh {opts}" timeout 60 '
                f"git clone -q root@{host.address}:{repo} /tmp/clone-$$ && cat /tmp/clone-$$/README"
            )
            deadline = time.monotonic() + 15
            while True:  # sshd comes up
                res = run(alice, ws, clone, agent)
                if res.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert res.returncode == 0, (res.stderr, (base / "sshd.log").read_text())
            assert "from the forwarded key" in res.stdout
            res = run(alice, ws, clone, agent, forward=False)
            assert res.returncode != 0 and "Permission denied" in res.stderr, res
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_workers_read_the_annotation_den_writes() -> None:
    assert join.BPF_ANNOTATION == seccomp.BPF_ANNOTATION


def test_a_root_forwarding_outlives_a_plain_one(alice: Person, dev_image: str) -> None:
    """An open ``ssh -A root+ws`` stays served after a plain ``ssh -A ws`` of the
    same user came and went (the socket, made again for the account at the same
    path, keeps every forwarding connection)."""
    ws = make_ws(alice, image=dev_image)
    path = f"/run/den-agent/{alice.name}.sock"
    with ssh_agent("root-side") as agent, held(alice, f"root+{ws}", agent):
        assert agent.fingerprint in listing(alice, f"root+{ws}", path).stdout
        res = run(alice, ws, 'stat -c "%u" "$SSH_AUTH_SOCK"; id -u; ssh-add -l', agent)
        owner, uid = res.stdout.split()[:2]
        assert res.returncode == 0 and owner == uid != "0", res
        time.sleep(1)  # the plain connection is gone from the daemon too
        for login in (f"root+{ws}", ws):
            res = listing(alice, login, path)
            assert res.returncode == 0 and agent.fingerprint in res.stdout, (login, res)
