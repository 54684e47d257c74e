"""A small authoritative DNS server on loopback for tests (dnspython messages, asyncio).

It answers from ``records`` (lowercase name without the final dot, record type)
-> rdata texts, over UDP and TCP on one port, in a thread of its own: the
daemon under test resolves through it (``DEN_DNS_SERVERS``). A name it has no
record of at all is NXDOMAIN; a known name without the asked type, an empty
answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.records: dict[tuple[str, str], list[str]] = {}
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._closers: list[asyncio.BaseTransport | asyncio.Server] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- records -----------------------------------------------------------------
    def set(self, name: str, rdtype: str, *values: str) -> None:
        """Records of ``name``; TXT values are plain strings (quoted here)."""
        if rdtype == "TXT":
            values = tuple('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
        with self._lock:
            self.records[(name.lower().rstrip("."), rdtype)] = list(values)

    def clear(self, name: str) -> None:
        key = name.lower().rstrip(".")
        with self._lock:
            for k in [k for k in self.records if k[0] == key]:
                del self.records[k]

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        for q in query.question:
            name = q.name.to_text().lower().rstrip(".")
            rdtype = dns.rdatatype.to_text(q.rdtype)
            with self._lock:
                self.queries.append((name, rdtype))
                values = list(self.records.get((name, rdtype), []))
                known = any(k[0] == name for k in self.records)
            if values:
                resp.answer.append(
                    dns.rrset.from_text_list(q.name, 5, dns.rdataclass.IN, q.rdtype, values)
                )
            elif not known:
                resp.set_rcode(dns.rcode.NXDOMAIN)
        return resp.to_wire()

    # -- serving -----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)

    async def _serve(self) -> None:
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                with contextlib.suppress(Exception):
                    self.transport.sendto(server.answer(data), addr)  # type: ignore[attr-defined]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while True:
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    out = server.answer(await reader.readexactly(size))
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
            writer.close()

        # One port for both: take a free UDP port, then the same one in TCP.
        for _ in range(20):
            udp, _proto = await self._loop.create_datagram_endpoint(
                Udp, local_addr=(self.host, 0), family=socket.AF_INET
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                tcp_server = await asyncio.start_server(tcp, self.host, port)
            except OSError:
                udp.close()
                continue
            self.port = port
            self._closers = [udp, tcp_server]
            return
        raise RuntimeError("no free port for the test DNS server")

    def stop(self) -> None:
        async def close() -> None:
            for c in self._closers:
                c.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@contextlib.contextmanager
def dns_server(host: str = "127.0.0.1") -> Iterator[DnsServer]:
    """A running DNS server, stopped afterwards."""
    server = DnsServer(host)
    server.start()
    try:
        yield server
    finally:
        server.stop()
