"""What den's two SMTP services share: a connection cap and the message checks."""

from __future__ import annotations

import asyncio
import email.errors
import email.parser
import email.policy
import ipaddress
import re
from collections import Counter
from typing import Any

from aiosmtpd.smtp import SMTP


class Connections:
    """Open SMTP connections of one service against its cap (each may hold up to
    mail_max_bytes of a message in memory), and per key (a workspace) against
    ``per_key``, so that one workspace cannot take every slot from the others."""

    def __init__(self, limit: int, per_key: int = 0) -> None:
        self.limit = limit
        self.per_key = per_key or limit
        self.open: Counter[str] = Counter()

    def take(self, key: str) -> bool:
        if self.open.total() >= self.limit or self.open[key] >= self.per_key:
            return False
        self.open[key] += 1
        return True

    def release(self, key: str) -> None:
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]


def peer_key(transport: asyncio.BaseTransport) -> str:
    """Whom a connection counts against: its IPv4 address, or its IPv6 /64 (one
    host holds a whole /64 to pick addresses from)."""
    peer = transport.get_extra_info("peername")
    host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class CappedSMTP(SMTP):
    """aiosmtpd's session, turned away with 421 past the connection caps.

    ``key`` names whom the connection counts against; None: its peer's address
    (peer_key), so that one outside host cannot hold every slot (an idle
    session lives on as long as it sends a NOOP a minute)."""

    def __init__(self, handler: Any, conns: Connections, key: str | None = None, **kw: Any) -> None:
        super().__init__(handler, **kw)
        self._conns = conns
        self._key = key
        self._counted = False
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted:  # not STARTTLS's second call
            if self._key is None:
                self._key = peer_key(transport)
            if not self._conns.take(self._key):
                self._refused = True
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(b"421 4.7.0 too many connections; try again later\r\n")
                transport.close()
                return
            self._counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._counted and self._key is not None:
            self._counted = False
            self._conns.release(self._key)
        super().connection_lost(error)


def malformed(content: bytes) -> str | None:
    """Why ``content`` is not an RFC 5322 message den passes on, or None.

    A NUL (RFC 5321 4.1.1.4 allows none), no header section, or not exactly one
    From field (RFC 5322 3.6). The answer is 554 (RFC 5321 4.2.2: the data was
    refused for good); 5.6.0 is RFC 3463's "media error".
    """
    if b"\0" in content:
        return "554 5.6.0 malformed message: NUL byte"
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(content)
    if any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect) for d in msg.defects):
        return "554 5.6.0 malformed message: a header line without a colon"
    if not msg.keys():
        return "554 5.6.0 malformed message: no header section"
    if len(msg.get_all("From") or []) != 1:
        return "554 5.6.0 malformed message: it needs exactly one From header"
    return None


# Every line end a mail program may take for one: aiosmtplib sends each as CRLF.
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")


def crlf(content: bytes) -> bytes:
    """``content`` with each bare LF or CR made CRLF, as the relay will get it: a
    field hidden behind one (``X: 1\\nFrom: ...``) is then a field den sees."""
    return _LINE_END.sub(b"\r\n", content)


def split_headers(content: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its folded lines, CRLF-joined) and the body."""
    head, sep, body = content.partition(b"\r\n\r\n")
    if not sep:  # headers only
        head, body = content.removesuffix(b"\r\n"), b""
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, body


def field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def join(fields: list[bytes], body: bytes) -> bytes:
    return b"\r\n".join(fields) + b"\r\n\r\n" + body


def printable(text: str, limit: int = 200) -> str:
    """A client's word (HELO name, address) fit for a header or a log line."""
    return "".join(c for c in text if " " < c < "\x7f")[:limit] or "unknown"
