"""A small stdlib-only server the browser tests run inside a workspace.

GET /        an HTML page (the browser runs the test's script in it)
GET /events  server-sent events: ``COUNT`` events, one every ``GAP`` seconds
GET /ws      a websocket (RFC 6455) that echoes text frames back

It listens on 0.0.0.0:8080 (den's proxy reaches the workspace's address).
"""

import base64
import hashlib
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNT = 20
GAP = 0.1
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAGE = b"<!doctype html><title>stream</title><p>stream server</p>\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/events":
            self.events()
        elif self.path == "/ws":
            self.websocket()
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

    def events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for i in range(COUNT):
            self.wfile.write(f"id: {i}\ndata: tick {i}\n\n".encode())
            self.wfile.flush()
            time.sleep(GAP)

    def websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self.send_error(400, "not a websocket handshake")
            return
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            frame = self.read_frame()
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 0x8:  # close: answer it and stop
                self.send_frame(0x8, payload[:2])
                return
            if opcode == 0x9:  # ping
                self.send_frame(0xA, payload)
            elif opcode == 0x1:
                self.send_frame(0x1, b"echo: " + payload)

    def read_exact(self, n: int) -> bytes | None:
        data = self.rfile.read(n)
        return data if len(data) == n else None

    def read_frame(self) -> tuple[int, bytes] | None:
        head = self.read_exact(2)
        if head is None:
            return None
        opcode = head[0] & 0x0F
        masked = head[1] & 0x80
        size = head[1] & 0x7F
        if size == 126:
            ext = self.read_exact(2)
            if ext is None:
                return None
            size = struct.unpack("!H", ext)[0]
        elif size == 127:
            ext = self.read_exact(8)
            if ext is None:
                return None
            size = struct.unpack("!Q", ext)[0]
        mask = self.read_exact(4) if masked else b"\0\0\0\0"
        payload = self.read_exact(size) if size else b""
        if mask is None or payload is None:
            return None
        return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send_frame(self, opcode: int, payload: bytes) -> None:
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
        self.wfile.write(head + payload)
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(format % args + "\n")


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
