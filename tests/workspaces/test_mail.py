"""Mail: inbound SMTP into a workspace's Maildir, outbound from inside through a relay.

The session's pool daemon, which has mail on (tests/conftest.py), the bb
image, a relay (aiosmtpd) the test runs on loopback on the port den relays to, smtplib as the outside sender, and busybox's ``nc -e``
with a tiny sh SMTP dialogue as the program inside a workspace.
"""

from __future__ import annotations

import email.policy
import secrets
import smtplib
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from tests.conftest import Daemon
from tests.workspaces.conftest import Users, create, make_users, ok, sh, wait_for

DOMAIN = "mail.den.test"  # what tests/conftest.py gives the pool daemon
MAX_BYTES = 64 * 1024
PER_HOUR = 2


class Relay:
    """The admin's relay: keeps what it is given, and the logins it saw."""

    def __init__(self, port: int) -> None:
        self.got: list[Envelope] = []
        self.logins: list[tuple[bytes, bytes]] = []
        self.port = port
        self.controller: Controller | None = None

    def start(self) -> None:
        # A stopped Controller does not start again: a new one each time. AUTH is
        # offered in the clear: the test's loopback relay has no certificate.
        self.controller = Controller(
            self,
            hostname="127.0.0.1",
            port=self.port,
            authenticator=self.authenticate,
            auth_require_tls=False,
        )
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        self.logins.append((data.login, data.password))
        return AuthResult(success=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.got.append(envelope)
        return "250 OK"


@dataclass
class Env:
    d: Daemon
    owner: str
    ws: str  # its name
    port: int  # inbound SMTP
    relay: Relay
    users: Users

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.ws}"

    @property
    def address(self) -> str:
        return f"{self.ws}.{self.owner}@{DOMAIN}"


@pytest.fixture(scope="module")
def env(pool_daemon: Daemon, bb_image: str) -> Iterator[Env]:
    d = pool_daemon
    assert d.env["DEN_MAIL_DOMAIN"] == DOMAIN
    assert d.env["DEN_MAIL_MAX_BYTES"] == str(MAX_BYTES)
    assert d.env["DEN_MAIL_PER_HOUR"] == str(PER_HOUR)
    relay = Relay(int(d.env["DEN_MAIL_RELAY"].rpartition(":")[2]))
    relay.start()
    try:
        with make_users(d) as users:
            owner = users.make()
            create(d, owner, "inbox", image=bb_image)
            yield Env(d, owner, "inbox", int(d.env["DEN_MAIL_PORT"]), relay, users)
    finally:
        relay.stop()


def smtp(e: Env) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", e.port, timeout=30)


def message(to: str, subject: str, body: str = "hello\n", **headers: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "someone@outside.example"
    m["To"] = to
    m["Subject"] = subject
    for k, v in headers.items():
        m[k] = v
    m.set_content(body)
    return m


def maildir(e: Env, ref: str | None = None) -> str:
    """Every message in ~/Maildir/new, read from inside the workspace."""
    return ok(e.d, ref or e.ref, 'cat "$HOME"/Maildir/new/* 2>/dev/null; true')


def test_delivered_into_maildir_inside(env: Env) -> None:
    with smtp(env) as s:
        s.send_message(message(env.address, "first"))
    text = maildir(env)
    assert "Subject: first" in text and "hello" in text
    assert f"by {DOMAIN} (den)" in text  # den's Received line
    # Written by the login user: the file is theirs, readable by them alone.
    listing = ok(env.d, env.ref, 'ls -ln "$HOME"/Maildir/new; id -u; ls "$HOME"/Maildir')
    lines = listing.splitlines()
    uid = lines[-4]
    file_line = next(line for line in lines if line.startswith("-"))
    assert file_line.startswith("-rw-------"), file_line
    assert file_line.split()[2] == uid, listing
    assert lines[-3:] == ["cur", "new", "tmp"], listing


def test_refused_recipients(env: Env) -> None:
    with smtp(env) as s:
        s.ehlo()
        s.mail("a@outside.example")
        code, text = s.rcpt(f"nosuch.{env.owner}@{DOMAIN}")
        assert code == 550 and b"5.1.1" in text
        code, text = s.rcpt(f"{env.ws}.nobody@{DOMAIN}")
        assert code == 550 and b"5.1.1" in text
        code, text = s.rcpt(f"{env.ws}.{env.owner}@elsewhere.example")
        assert code == 550 and b"relaying denied" in text
        # Bad syntax: of the command 501, of the address 553 (RFC 5321 4.2.3).
        assert s.docmd("RCPT", "nonsense")[0] == 501
        assert s.docmd("RCPT TO:", "<<not an address")[0] == 553
        for _ in range(3):
            assert s.rcpt(env.address)[0] == 250
        code, text = s.rcpt(env.address)
        assert code == 452 and b"too many recipients" in text


def test_oversized_and_malformed_refused(env: Env) -> None:
    big = message(env.address, "big", ("y" * 70 + "\n") * (MAX_BYTES // 70 + 10))
    with smtp(env) as s:
        # Declared in MAIL FROM (smtplib sends SIZE=): refused before the data.
        with pytest.raises(smtplib.SMTPSenderRefused) as err:
            s.send_message(big)
        assert err.value.smtp_code == 552
    with smtp(env) as s:
        # Undeclared: refused after the data.
        s.ehlo()
        s.mail("a@outside.example")
        s.rcpt(env.address)
        code, _ = s.data(big.as_bytes(policy=email.policy.SMTP))
        assert code == 552
        s.rset()
        s.mail("a@outside.example")
        s.rcpt(env.address)
        code, text = s.data(b"Subject: no sender\r\n\r\nbody\r\n")
        assert code == 554 and b"From" in text
        s.rset()
        s.mail("a@outside.example")
        s.rcpt(env.address)
        code, text = s.data(b"this is not a header\r\nFrom: x@y\r\n\r\nbody\r\n")
        assert code == 554
    assert "Subject: big" not in maildir(env)
    assert "no sender" not in maildir(env)


def test_suspended_is_resumed_stopped_deferred(env: Env) -> None:
    d = env.d
    create(d, env.owner, "sleepy")
    ref = f"{env.owner}/sleepy"
    to = f"sleepy.{env.owner}@{DOMAIN}"
    d.call("workspace.suspend", ref=ref)
    with smtp(env) as s:
        s.send_message(message(to, "wake up"))
    assert d.call("workspace.get", ref=ref)["state"] == "running"
    assert "Subject: wake up" in maildir(env, ref)
    d.call("workspace.stop", ref=ref)
    with smtp(env) as s:
        s.ehlo()
        s.mail("a@outside.example")
        code, text = s.rcpt(to)
        assert code == 450 and b"stopped" in text
    assert d.call("workspace.get", ref=ref)["state"] == "stopped"


# -- outbound ------------------------------------------------------------------------

# A client of 169.254.169.254:25 in busybox sh: nc runs it with the connection
# on its stdin and stdout; den's replies go to stderr (the exec's output).
DIALOGUE = r"""cat > /tmp/smtp.sh <<'EOF'
#!/bin/sh
r() { while IFS= read -r l; do echo "$l" >&2; case "$l" in [0-9][0-9][0-9]-*) ;; *) break;; esac; done; }
r
printf 'EHLO inside\r\n'; r
printf 'MAIL FROM:<ceo@bank.example>\r\n'; r
printf 'RCPT TO:<friend@far.example>\r\n'; r
printf 'DATA\r\n'; r
printf 'MESSAGE'; r
printf 'QUIT\r\n'; r
EOF
chmod +x /tmp/smtp.sh
"""
SPOOFING = (
    "From: The Bank <ceo@bank.example>\\r\\nSender: ceo@bank.example\\r\\n"
    "To: friend@far.example\\r\\nSubject: SUBJ\\r\\n\\r\\nhi from inside\\r\\n.\\r\\n"
)


def send_inside(e: Env, subject: str, ref: str = "", message: str = SPOOFING) -> str:
    """Send ``message`` (printf's format: \\r, \\n) from inside; den's replies."""
    script = DIALOGUE.replace("MESSAGE", message).replace("SUBJ", subject)
    ok(e.d, ref or e.ref, script, user="root")
    res = sh(e.d, ref or e.ref, "nc -w 20 169.254.169.254 25 -e /tmp/smtp.sh")
    return str(res["stderr"])


def relayed(e: Env, subject: str) -> Any:
    for env in e.relay.got:
        if f"Subject: {subject}".encode() in (env.original_content or b""):
            return env
    return None


def test_outbound_relayed_with_dens_from_and_limited(env: Env) -> None:
    reply = send_inside(env, "out-1")
    assert f"250 2.1.0 sender is {env.address}" in reply, reply
    assert "250 2.0.0 sent" in reply, reply
    got = wait_for(lambda: relayed(env, "out-1"))
    assert got is not None
    assert got.mail_from == env.address
    assert got.rcpt_tos == ["friend@far.example"]
    content = (got.original_content or b"").decode()
    assert f"From: {env.address}\r\n" in content
    assert "bank.example" not in content.split("\r\nTo:")[0]  # From and Sender replaced
    assert "Sender:" not in content
    assert "hi from inside" in content
    # The audit log: the recipients' count and the size, not who or what.
    events = env.d.client().call("audit.list", {"method": "mail.send"})
    ev = next(x for x in events if x["target"] == f"workspace:{env.ref}")
    assert ev["params"]["recipients"] == 1 and "friend" not in str(ev)

    # PER_HOUR messages per user: the next one is told when to retry.
    for i in range(2, PER_HOUR + 2):
        reply = send_inside(env, f"out-{i}")
    assert "450 4.7.1 rate limit" in reply and "retry after" in reply, reply
    assert relayed(env, f"out-{PER_HOUR + 1}") is None


def test_relay_login_sealed_and_relay_down(env: Env, tmp_path: Path) -> None:
    d = env.d
    other = env.users.make()  # a user of their own: the first one used up their hour
    create(d, other, "out")
    ref = f"{other}/out"
    secret = f"pw-{secrets.token_hex(8)}"
    pw_file = tmp_path / "pw"
    pw_file.write_text(secret + "\n")
    d.cli("mail", "relay-login", "--user", "den-relay", "--password-file", str(pw_file), check=True)
    stored = (d.data_dir / "mail-relay.json").read_text()
    assert secret not in stored and "den-relay" in stored
    assert stat.S_IMODE((d.data_dir / "mail-relay.json").stat().st_mode) == 0o600

    reply = send_inside(env, "with-login", ref)
    assert "250 2.0.0 sent" in reply, reply
    assert (b"den-relay", secret.encode()) in env.relay.logins
    audit = str(d.client().call("audit.list", {"method": "mail.relay_login"}))
    assert "den-relay" in audit and secret not in audit
    assert secret not in d.log_text()

    env.relay.stop()
    try:
        reply = send_inside(env, "relay-down", ref)
        assert "451 4.4.1" in reply and "unreachable" in reply, reply
    finally:
        env.relay.start()


def test_bare_line_ends_smuggle_no_header(env: Env) -> None:
    """A bare LF or CR inside the header section is a line end to the relay (and to
    aiosmtplib, which turns it into CRLF): a From or Sender hidden behind one must go
    like any other, not ride along as part of the field before it."""
    d = env.d
    other = env.users.make()  # an hour of their own
    create(d, other, "lf")
    ref = f"{other}/lf"
    hidden = (
        "X-A: 1\\nFrom: The Bank <ceo@bank.example>\\rSender: ceo@bank.example\\r\\n"
        "To: friend@far.example\\r\\nSubject: SUBJ\\r\\n\\r\\nhi\\r\\n.\\r\\n"
    )
    reply = send_inside(env, "bare-lf", ref, hidden)
    assert "250 2.0.0 sent" in reply, reply
    got = wait_for(lambda: relayed(env, "bare-lf"))
    assert got is not None
    head = (got.original_content or b"").decode().split("\r\n\r\n")[0]
    assert "bank.example" not in head, head
    assert head.count("From:") == 1 and f"From: lf.{other}@{DOMAIN}" in head, head


def test_one_outside_host_cannot_hold_every_connection(env: Env) -> None:
    """A host's idle sessions (a NOOP a minute keeps each) take at most its share of
    mail_max_connections (64 here: 8); another host still gets in."""
    held: list[smtplib.SMTP] = []
    try:
        for _ in range(8):
            held.append(smtp(env))
        with pytest.raises(smtplib.SMTPConnectError) as err:
            smtp(env)
        assert err.value.smtp_code == 421, err.value
        with smtplib.SMTP(
            "127.0.0.1", env.port, timeout=30, source_address=("127.0.0.2", 0)
        ) as other:
            assert other.noop()[0] == 250
    finally:
        for s in held:
            s.close()
    # Their slots are free again once they hang up.
    assert wait_for(lambda: _connects(env))


def _connects(env: Env) -> bool:
    try:
        with smtp(env) as s:
            return s.noop()[0] == 250
    except smtplib.SMTPConnectError:
        return False


def test_a_relay_password_never_goes_out_without_tls() -> None:
    """auto takes STARTTLS when offered, but with a password for a relay off this
    host it requires it (an attacker on the path could strip the offer)."""
    from den.mail.outbound import tls_options

    assert tls_options("auto", True, "smtp.example.org") == {"start_tls": True}
    assert tls_options("auto", True, "192.0.2.7") == {"start_tls": True}
    assert tls_options("auto", True, "127.0.0.1") == {}  # the tests' relay, on this host
    assert tls_options("auto", True, "::1") == {}
    assert tls_options("auto", False, "smtp.example.org") == {}
    assert tls_options("tls", True, "smtp.example.org") == {"use_tls": True}
    assert tls_options("none", True, "smtp.example.org") == {"start_tls": False}
