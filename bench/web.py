"""Benchmark: a workspace URL through Caddy with den's gate, beside the same Caddy
proxying straight to the workspace with no check.

In a workspace of den's dev image, two apps listen on every address:
python3's threaded http.server (HTTP/1.1) on 8080, serving a small page and a
100 MB file, and a minimal asyncio responder on 8081 (a published port) that
answers the same small page many times faster, so that the cost of the check
is not hidden behind a slow app. Side by side, in alternating rounds, through
den's own Caddy:

- (a) https://LABEL.den.localhost:PORT/ : den's access check (Caddy's
  subrequest to the gate) in the path; signed in with a browser session cookie
  (a real sign-in through a one-time link), with a den token as
  ``Authorization: Bearer``, and shared ``public`` with no credential;
- (b) https://direct.den.localhost:PORT/ : a route added to the same Caddy at
  run time through its admin API, proxying to the workspace's address with no
  check (the same streaming proxy den's route ends with);
- for the fast app, also den's own route with the gate replaced by a static
  answer from Caddy itself: the cost of the subrequest without den's Python.

Every route and server added to Caddy is removed at the end. Small page:
requests/s and p50/p99 latency with wrk (fixed threads, connections and
duration; the median of the rounds), and the CPU time per request of Caddy,
den, the workspace and wrk (where the time goes on a busy machine). 100 MB
body: MB/s with curl. Wake on request: suspend the workspace, then the time to
the first byte of a signed-in request on a new connection (curl's
time_starttransfer; TLS handshake included, and shown without it), beside the
same for the running workspace and for (b), and den's own timing of the
resume (its /metrics).

Goals: (a) >= 0.8x (b) in requests/s, >= 0.9x in throughput; wake p50 < 30 ms.

The dashboard (part ``dash``), among 20 members and 200 workspaces of a tiny
busybox image (spread round robin, all but a few stopped again) and an admin:
the admin's page of all workspaces (/admin/workspaces) and a member's home
page (/, their 10 workspaces), through Caddy at https://den.localhost:PORT.
Time to the first byte with curl (a new connection each: TLS handshake
included, and shown without it) and, in Debian's Chromium driven by
Playwright (in a network namespace of its own, see _browser.py; signed in
with a one-time link and its button), the first byte and the ``load`` event
from the page's PerformanceNavigationTiming (warm cache: one load first);
p50 and p95 of each.

Keystroke echo (part ``keys``), in the same run and the same workspace's
login shell: the browser terminal's websocket (/_den/term/OWNER/NAME through
Caddy, with the browser session cookie and den's Origin, as its page opens it)
beside ``ssh -t`` through den's SSH gateway (asyncssh with a PTY). One byte
sent, the time until its echo arrives; alternating sides, small pauses; p50
and p99. Goal: web p50 <= 1.5x ssh p50.

Prints tables and one JSON line. Needs root; makes its own daemon, pool,
images, users and workspaces, and removes them.

    .venv/bin/python bench/web.py [--parts gate,dash,keys] [--rounds 3] [--duration 10]
        [--connections 32] [--threads 2] [--downloads 6] [--wakes 20] [--users 20]
        [--workspaces 200] [--running 5] [--jobs 4] [--loads 20] [--keys 200] [--pause 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http.client
import json
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
from aiohttp.abc import AbstractResolver, ResolveResult
from playwright.sync_api import Browser
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from _browser import chromium
from _daemon import ROOT, BenchDaemon, busybox_image, free_port, wait_job
from den.backends.cgroups import cpu_seconds
from den.cli.client import Client
from den.web.caddy_config import workspace_route
from den.web.labels import label

CACHE_DIR = ROOT / ".cache" / "images"
IMAGE = "dev"
REF = "bench/box"
DOMAIN = "den.localhost"
DIRECT = f"direct.{DOMAIN}"  # (b) to the http.server app
DIRECT_FAST = f"direct-fast.{DOMAIN}"  # (b) to the fast app
STUB = f"stub.{DOMAIN}"  # den's route, the gate replaced by a static answer
STUB_SERVER = "den_bench_stub"
ROUTE_IDS = ("den-bench-direct", "den-bench-direct-fast", "den-bench-stub")
FAST_PORT = 8081
BIG_MB = 100

# The app: python3's http.server on HTTP/1.1 (keep-alive, as app servers do),
# a thread per connection, files from ~/www.
SERVER = """
import http.server, os
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
os.chdir(os.path.expanduser("~/www"))
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""
SMALL = "<!doctype html><title>den</title><p>" + "hello from a den workspace. " * 20 + "</p>\n"
# The fast app: one fixed answer per request head, keep-alive, one event loop.
FAST = f"""
import asyncio
BODY = {SMALL.encode()!r}
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Type: text/html\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(BODY) + BODY
class Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buf = transport, b""
    def data_received(self, data):
        self.buf += data
        while (end := self.buf.find(b"\\r\\n\\r\\n")) >= 0:
            self.buf = self.buf[end + 4:]
            self.transport.write(ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(Answer, "0.0.0.0", {FAST_PORT})
    await server.serve_forever()
asyncio.run(main())
"""


def sh(c: Client, script: str, stdin: str = "") -> str:
    res = c.call(
        "workspace.exec",
        {"ref": REF, "argv": ["sh", "-c", script], "stdin": stdin, "timeout": 120},
    )
    if res["exit_code"] != 0:
        raise RuntimeError(f"in the workspace: {script[:80]}: {res['stderr'][-500:]}")
    return str(res["stdout"])


def start_apps(c: Client) -> None:
    sh(
        c,
        "mkdir -p ~/www && cat > ~/www/small.html && "
        f"head -c {BIG_MB}M /dev/urandom > ~/www/big.bin",
        SMALL,
    )
    sh(c, "cat > ~/app.py", SERVER)
    sh(c, "cat > ~/fast.py", FAST)
    for app in ("app.py", "fast.py"):
        sh(c, f"setsid python3 ~/{app} </dev/null >/dev/null 2>&1 &")
    for port in (8080, FAST_PORT):
        sh(
            c,
            f"for i in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:{port}/small.html "
            "&& exit 0; sleep 0.1; done; exit 1",
        )


class CaddyAdmin:
    """Caddy's admin API on its unix socket (it accepts only an empty Host there)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def request(self, method: str, url: str, body: Any = None) -> None:
        conn = http.client.HTTPConnection("localhost", timeout=10)
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        try:
            sock.connect(self.path)
            conn.sock = sock
            data = b"" if body is None else json.dumps(body).encode()
            conn.putrequest(method, url, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", "")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(data)))
            conn.endheaders(data)
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace")
        finally:
            conn.close()
            sock.close()
        if resp.status >= 300:
            raise RuntimeError(f"Caddy's admin API: {method} {url}: {resp.status} {text}")

    def add_route(self, route: dict[str, Any]) -> None:
        """Before den's own routes: den's catch-all would take the host otherwise."""
        self.request("PUT", "/config/apps/http/servers/den/routes/0", route)


def direct_route(route_id: str, host: str, upstream: str) -> dict[str, Any]:
    """(b): the proxy den's route ends with, and nothing before it."""
    return {
        "@id": route_id,
        "match": [{"host": [host]}],
        "handle": [
            {
                "handler": "reverse_proxy",
                "upstreams": [{"dial": upstream}],
                "flush_interval": -1,
                "transport": {"protocol": "http", "dial_timeout": "3s"},
            }
        ],
        "terminal": True,
    }


def stub_server(port: int, upstream: str) -> dict[str, Any]:
    """A plain-HTTP Caddy server answering every check with a fixed 'yes, go to upstream'."""
    answer = {
        "X-Den-Upstream": [upstream],
        "X-Den-User": ["bench"],
        "X-Den-Share": ["owner"],
        "X-Den-Cookie": [""],
        "X-Den-Authorization": [""],
    }
    return {
        "listen": [f"127.0.0.1:{port}"],
        "automatic_https": {"disable": True},
        "routes": [{"handle": [{"handler": "static_response", "headers": answer}]}],
    }


def stub_route(port: int) -> dict[str, Any]:
    """den's own workspace route, its subrequest sent to the stub server instead of den."""
    sentinel = Path("/den-bench-gate")
    route = workspace_route(sentinel)
    for handler in route["handle"]:
        if handler.get("upstreams") == [{"dial": f"unix/{sentinel}"}]:
            handler["upstreams"] = [{"dial": f"127.0.0.1:{port}"}]
            break
    else:
        raise RuntimeError("den's workspace route has no subrequest to its gate")
    return {"@id": ROUTE_IDS[2], "match": [{"host": [STUB]}], **route}


class Curl:
    def __init__(self, ca: Path, port: int) -> None:
        self.ca = str(ca)
        self.port = port

    def url(self, host: str, path: str) -> str:
        return f"https://{host}:{self.port}{path}"

    def run(self, url: str, *args: str, headers: tuple[str, ...] = ()) -> str:
        argv = ["curl", "-sS", "--cacert", self.ca, "-m", "120", *args]
        for h in headers:
            argv += ["-H", h]
        res = subprocess.run([*argv, url], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"curl {url}: {res.stderr.strip()}")
        return res.stdout

    def get(self, url: str, headers: tuple[str, ...] = ()) -> tuple[int, str]:
        out = self.run(url, "-o", "-", "-w", "\n%{http_code}", headers=headers)
        body, _, code = out.rpartition("\n")
        return int(code), body

    def download(self, url: str, headers: tuple[str, ...] = ()) -> float:
        """MB/s of one whole download of the big file (checked complete)."""
        out = self.run(
            url,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            headers=headers,
        )
        code, size, total = out.split()
        if code != "200" or int(size) != BIG_MB << 20:
            raise RuntimeError(f"download {url}: status {code}, {size} bytes")
        return BIG_MB / float(total)

    def ttfb(self, url: str, headers: tuple[str, ...] = ()) -> tuple[float, float]:
        """ms to the first byte on a new connection: in all, and after the TLS handshake."""
        out = self.run(
            url,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_appconnect} %{time_starttransfer}",
            headers=headers,
        )
        code, tls, first = out.split()
        if code != "200":
            raise RuntimeError(f"{url}: status {code}")
        return float(first) * 1e3, (float(first) - float(tls)) * 1e3


def resume_seconds(sock: Path) -> tuple[float, int]:
    """den's own timing of resumes caused by HTTP requests (sum, count), from /metrics."""
    conn = http.client.HTTPConnection("localhost", timeout=10)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(sock))
        conn.sock = s
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
        s.close()
    got = dict(re.findall(r'^den_resume_seconds_(sum|count)\{cause="http"\} (\S+)$', text, re.M))
    return float(got.get("sum", 0)), int(float(got.get("count", 0)))


def sign_in(curl: Curl, link: str) -> str:
    """A browser's sign-in with a one-time link: POST its form; the session cookie."""
    token = link.split("t=", 1)[1]
    home = curl.url(DOMAIN, "")
    out = curl.run(
        home + "/_den/login",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--data-urlencode",
        f"t={token}",
        headers=(f"Origin: {home}",),
    )
    # den_session (for workspace URLs) and __Host-den_session (den's own pages at the
    # apex read only this one): what a browser sends the apex after signing in.
    cookies = [
        line.split(":", 1)[1].strip().split(";", 1)[0]
        for line in out.splitlines()
        if line.lower().startswith(("set-cookie: den_session=", "set-cookie: __host-den_session="))
    ]
    if len(cookies) != 2:
        raise RuntimeError(f"the sign-in gave no session cookies: {out[:300]}")
    return "; ".join(cookies)


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
PARTS = ("caddy", "den", "app", "wrk")
TICKS = os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent so far by each part a request crosses: Caddy, den (the
    gate runs in its event loop), the workspace (the app) and wrk (the client)."""

    def __init__(self, d: BenchDaemon, ws_id: str) -> None:
        self.caddy_pid = d.data_dir / "caddy.pid"
        self.den_pid = d.proc.pid if d.proc is not None else 0
        self.cgroup = f"/den{d.instance}/{ws_id}"

    @staticmethod
    def _proc(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def sample(self) -> dict[str, float]:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "caddy": self._proc(int(self.caddy_pid.read_text())),
            "den": self._proc(self.den_pid),
            "app": cpu_seconds(self.cgroup),
            "wrk": kids.ru_utime + kids.ru_stime,
        }


def wrk(
    hosts: Path, url: str, args: argparse.Namespace, headers: tuple[str, ...], cpu: CpuMeter
) -> dict[str, float]:
    """One wrk run: requests/s, p50 and p99 ms; every answer must be a 2xx.

    glibc does not resolve *.localhost (curl does by itself): wrk runs in a
    mount namespace of its own whose /etc/hosts names them, so it connects and
    sends SNI and Host as a browser would.
    """
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    before = cpu.sample()
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(hosts), *argv, url],
        capture_output=True,
        text=True,
        check=False,
        timeout=args.duration + 60,
    )
    after = cpu.sample()
    out = res.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"^\s+(\d+) requests in", out, re.M)
    if (
        res.returncode != 0
        or rps is None
        or count is None
        or "Non-2xx" in out
        or "Socket errors" in out
    ):
        raise RuntimeError(f"wrk {url}: exit {res.returncode}\n{out}{res.stderr}")

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            raise RuntimeError(f"no {p}% in wrk's output:\n{out}")
        return float(m.group(1)) * UNITS[m.group(2)]

    n = int(count.group(1))
    used = {f"cpu_{k}": (after[k] - before[k]) / n * 1e6 for k in PARTS}
    return {"rps": float(rps.group(1)), "p50": pct("50"), "p99": pct("99"), **used}


def med(values: list[float], nd: int = 1) -> float:
    return round(statistics.median(values), nd)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Short run: --parts dash,keys --workspaces 40 --users 4 --loads 5 --keys 50",
    )
    ap.add_argument(
        "--parts",
        default=",".join(PARTS_ALL),
        help="which measures, comma-separated: gate (workspace URLs), dash (page loads), "
        "keys (keystroke echo); default all",
    )
    ap.add_argument("--rounds", type=int, default=3, help="gate: wrk runs per variant, alternating")
    ap.add_argument("--duration", type=int, default=10, help="gate: seconds per wrk run")
    ap.add_argument("--connections", type=int, default=32, help="gate: wrk connections")
    ap.add_argument("--threads", type=int, default=2, help="gate: wrk threads")
    ap.add_argument("--downloads", type=int, default=6, help="gate: 100 MB downloads per side")
    ap.add_argument("--wakes", type=int, default=20, help="gate: suspend -> first byte rounds")
    ap.add_argument("--users", type=int, default=20, help="dash: members made")
    ap.add_argument("--workspaces", type=int, default=200, help="dash: workspaces, round robin")
    ap.add_argument("--running", type=int, default=5, help="dash: workspaces left running")
    ap.add_argument(
        "--jobs",
        type=int,
        default=4,
        help="dash: concurrent API calls in setup (workspace.create: one at a time, see make_fleet)",
    )
    ap.add_argument("--loads", type=int, default=20, help="dash: page loads per page and client")
    ap.add_argument("--keys", type=int, default=200, help="keys: keystrokes per side")
    ap.add_argument("--pause", type=float, default=0.02, help="keys: seconds between keystrokes")
    ap.add_argument(
        "--xterm",
        type=int,
        default=50,
        help="keys: keystrokes typed into the terminal page in Chromium too (0: none)",
    )
    args = ap.parse_args()
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts or not args.parts <= set(PARTS_ALL):
        ap.error(f"--parts: a comma-separated subset of {','.join(PARTS_ALL)}")
    if args.users < 1 or args.workspaces < args.users:
        ap.error("--workspaces must be at least --users, and --users at least 1")
    need = ["curl"]
    if "gate" in args.parts:
        need += ["wrk", "unshare"]
    if "dash" in args.parts:
        need += ["chromium", "certutil"]
    for prog in need:
        if shutil.which(prog) is None:
            sys.exit(f"{prog} is missing: run `make bench-deps` (scripts/install-deps bench)")
    work = Path(tempfile.mkdtemp(prefix="den-bench-http-"))
    try:
        env = {
            "DEN_WEB": "true",
            "DEN_HTTPS_PORT": str(free_port()),
            "DEN_APT_CACHE": str(ROOT / ".cache" / "apt"),
            # An 8G pool: the 10G default disk limit would pass the member quota.
            "DEN_DEFAULT_DISK": "2G",
        }
        with BenchDaemon(pool_size="8G", extra_env=env) as d:
            results = run(d, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)


def run(d: BenchDaemon, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    c = Client(socket_path=str(d.socket), timeout=600)
    curl = Curl(
        d.data_dir / "caddy" / "data" / "pki" / "authorities" / "local" / "root.crt",
        int(d.info["https_port"]),
    )
    out: dict[str, Any] = {}
    try:
        if "gate" in args.parts:
            out.update(run_gate(d, c, curl, work, args))
        if args.parts & {"dash", "keys"}:
            fleet = make_fleet(d, c, args)
            member_cookie = sign_in(curl, user_call(d, c, fleet.member, "login.link")["url"])
            if "dash" in args.parts:
                out["dash"] = measure_dash(d, c, curl, fleet, member_cookie, args)
            if "keys" in args.parts:
                out["keys"] = measure_keys(d, c, curl, fleet, member_cookie, args)
        return out
    finally:
        c.close()


def run_gate(
    d: BenchDaemon, c: Client, curl: Curl, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    # den's dev image (python3 and curl inside): the tests' cached copy, else built.
    cached = sorted(CACHE_DIR.glob("bookworm-dev-*.tar.zst"))
    job = (
        c.call("image.import", {"name": IMAGE, "path": str(cached[-1])})
        if cached
        else c.call("image.build", {"name": IMAGE, "suite": "bookworm", "preset": "dev"})
    )
    wait_job(c, job)
    c.call("user.create", {"name": "bench", "role": "member"})
    ws = c.call("workspace.create", {"name": "box", "user": "bench", "image": IMAGE})
    start_apps(c)
    c.call("web.publish", {"ref": REF, "port": FAST_PORT})
    # The user's credentials: a den token (scripts) and a browser session (people).
    token = c.call("token.create", {"user": "bench", "right": "write"})["token"]
    cookie = sign_in(curl, user_call(d, c, "bench", "login.link", token=token)["url"])
    hosts = work / "hosts"
    names = [
        DOMAIN,
        DIRECT,
        DIRECT_FAST,
        STUB,
        f"{label('bench', 'box')}.{DOMAIN}",
        f"{label('bench', 'box', FAST_PORT)}.{DOMAIN}",
    ]
    hosts.write_text(f"127.0.0.1 localhost {' '.join(names)}\n")
    admin = CaddyAdmin(d.data_dir / "caddy" / "admin.sock")
    stub_port = free_port()
    try:
        admin.add_route(direct_route(ROUTE_IDS[0], DIRECT, f"{ws['address']}:8080"))
        admin.add_route(direct_route(ROUTE_IDS[1], DIRECT_FAST, f"{ws['address']}:{FAST_PORT}"))
        admin.request(
            "PUT",
            f"/config/apps/http/servers/{STUB_SERVER}",
            stub_server(stub_port, f"{ws['address']}:{FAST_PORT}"),
        )
        admin.add_route(stub_route(stub_port))
        return measure(c, curl, hosts, cookie, token, args, CpuMeter(d, ws["id"]), d.socket)
    finally:
        # Not there when the run failed before adding them: nothing to remove.
        for rid in ROUTE_IDS:
            with contextlib.suppress(RuntimeError, OSError):
                admin.request("DELETE", f"/id/{rid}")
        with contextlib.suppress(RuntimeError, OSError):
            admin.request("DELETE", f"/config/apps/http/servers/{STUB_SERVER}")
        # The gate's workspace stops: the page loads and keystrokes share the machine.
        with contextlib.suppress(Exception):
            c.call("workspace.stop", {"ref": REF})


def user_call(
    d: BenchDaemon, c: Client, user: str, method: str, token: str | None = None
) -> dict[str, Any]:
    """``method`` called as ``user`` (over den's TCP listener, with a token of theirs):
    what only a user's own credential may do, such as making a sign-in link."""
    if token is None:
        token = c.call("token.create", {"user": user, "right": "write"})["token"]
    as_user = Client(url=f"http://127.0.0.1:{d.info['http_port']}", token=token)
    try:
        result: dict[str, Any] = as_user.call(method)
        return result
    finally:
        as_user.close()


def measure(
    c: Client,
    curl: Curl,
    hosts: Path,
    cookie: str,
    token: str,
    args: argparse.Namespace,
    cpu: CpuMeter,
    sock: Path,
) -> dict[str, Any]:
    host = f"{label('bench', 'box')}.{DOMAIN}"
    fast = f"{label('bench', 'box', FAST_PORT)}.{DOMAIN}"
    signed = (f"Cookie: {cookie}",)
    bearer = (f"Authorization: Bearer {token}",)
    # name -> (host, headers); the page is /small.html on every one.
    variants: dict[str, tuple[str, tuple[str, ...]]] = {
        "direct": (DIRECT, ()),
        "cookie": (host, signed),
        "bearer": (host, bearer),
        "public": (host, ()),
        "fast_direct": (DIRECT_FAST, ()),
        "fast_stub": (STUB, ()),
        "fast_cookie": (fast, signed),
    }
    # Each path answers the page before anything is timed (a sign-in page
    # would be fast and wrong); a stranger is sent to sign in.
    for name, (h, hdr) in variants.items():
        if name != "public":
            code, body = curl.get(curl.url(h, "/small.html"), hdr)
            if code != 200 or body != SMALL:
                raise RuntimeError(f"{name}: status {code}: {body[:200]}")
    code, _ = curl.get(curl.url(host, "/small.html"))
    if code != 302:
        raise RuntimeError(f"a stranger got {code} on the private URL, not a sign-in redirect")

    small: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (h, hdr) in variants.items():
            if name == "public":
                c.call("share.set", {"ref": REF, "mode": "public"})
            try:
                small[name].append(wrk(hosts, curl.url(h, "/small.html"), args, hdr, cpu))
            finally:
                if name == "public":
                    c.call("share.set", {"ref": REF, "mode": "private"})

    big: dict[str, list[float]] = {"direct": [], "cookie": []}
    for _ in range(args.downloads):
        big["direct"].append(curl.download(curl.url(DIRECT, "/big.bin")))
        big["cookie"].append(curl.download(curl.url(host, "/big.bin"), signed))

    page = curl.url(host, "/small.html")
    ttfb: dict[str, list[tuple[float, float]]] = {"running": [], "direct": [], "woken": []}
    for _ in range(args.wakes):
        ttfb["running"].append(curl.ttfb(page, signed))
        ttfb["direct"].append(curl.ttfb(curl.url(DIRECT, "/small.html")))
    resumed_before = resume_seconds(sock)
    for _ in range(args.wakes):
        c.call("workspace.suspend", {"ref": REF})
        state = c.call("workspace.get", {"ref": REF})["state"]
        if state != "suspended":
            raise RuntimeError(f"the workspace is {state} after workspace.suspend")
        ttfb["woken"].append(curl.ttfb(page, signed))
        # The next suspend finds it settled (not mid-wake bookkeeping).
        curl.ttfb(page, signed)
    if c.call("workspace.get", {"ref": REF})["state"] != "running":
        raise RuntimeError("a request did not leave the workspace running")
    resumed_after = resume_seconds(sock)
    resumes = resumed_after[1] - resumed_before[1]
    if resumes != args.wakes:
        raise RuntimeError(f"{args.wakes} wakes, but den counted {resumes} resumes by HTTP")

    out: dict[str, Any] = {}
    for name, runs in small.items():
        out[f"small_{name}"] = {
            "rps": med([r["rps"] for r in runs], 0),
            "p50_ms": med([r["p50"] for r in runs], 2),
            "p99_ms": med([r["p99"] for r in runs], 2),
            # CPU per request of each part: where the time goes, whatever else runs.
            "cpu_us": {k: med([r[f"cpu_{k}"] for r in runs], 0) for k in PARTS},
        }
    for name in ("cookie", "bearer", "public"):
        out[f"rps_ratio_{name}"] = round(
            out[f"small_{name}"]["rps"] / out["small_direct"]["rps"], 2
        )
    for name in ("stub", "cookie"):
        out[f"rps_ratio_fast_{name}"] = round(
            out[f"small_fast_{name}"]["rps"] / out["small_fast_direct"]["rps"], 2
        )
    out["big_mb_s"] = {k: med(v) for k, v in big.items()}
    out["throughput_ratio"] = round(
        statistics.median(big["cookie"]) / statistics.median(big["direct"]), 2
    )
    out["ttfb_ms"] = {
        name: {
            "p50": med([t for t, _ in pairs], 2),
            "p90": round(sorted(t for t, _ in pairs)[int(0.9 * (len(pairs) - 1))], 2),
            "p50_after_tls": med([a for _, a in pairs], 2),
        }
        for name, pairs in ttfb.items()
    }
    # Of the wake: den's thaw of the workspace (its own timing: lock, backend, commit).
    out["ttfb_ms"]["resume_mean"] = round((resumed_after[0] - resumed_before[0]) / resumes * 1e3, 2)
    out["params"] = {
        "rounds": args.rounds,
        "duration_s": args.duration,
        "connections": args.connections,
        "threads": args.threads,
        "downloads": args.downloads,
        "wakes": args.wakes,
    }
    return out


# -- the dashboard and the browser terminal, among many users and workspaces -----------

PARTS_ALL = ("gate", "dash", "keys")
BB = "bb"
ADMIN = "boss"
UNLIMITED = dict.fromkeys(("max_workspaces", "max_cpu", "max_memory_mb", "max_disk_mb"), -1)
# The load event's time and the first byte's, as Chromium measured them for the page.
NAV_TIMING = """() => {
  const n = performance.getEntriesByType("navigation")[0];
  return [n.responseStart - n.startTime, n.loadEventStart - n.startTime];
}"""


@dataclasses.dataclass
class Fleet:
    users: list[str]
    refs: list[str]  # OWNER/NAME, every workspace made
    member: str  # the member whose home page is timed; their first workspace is the terminal's
    running: list[str]


def calls(d: BenchDaemon, jobs: int, what: str, todo: list[tuple[str, dict[str, Any]]]) -> None:
    """API calls, ``jobs`` at a time (each thread a client of its own), with progress."""
    local = threading.local()
    clients: list[Client] = []
    lock = threading.Lock()

    def one(method: str, params: dict[str, Any]) -> None:
        c = getattr(local, "client", None)
        if c is None:
            c = local.client = Client(socket_path=str(d.socket), timeout=600)
            with lock:
                clients.append(c)
        c.call(method, params)

    pool = ThreadPoolExecutor(jobs)
    try:
        with Progress(console=Console(stderr=True)) as progress:
            task = progress.add_task(what, total=len(todo))
            for fut in as_completed([pool.submit(one, m, p) for m, p in todo]):
                fut.result()
                progress.advance(task)
    finally:
        # On a failure, what has not started yet does not start.
        pool.shutdown(cancel_futures=True)
        for c in clients:
            c.close()


def make_fleet(d: BenchDaemon, c: Client, args: argparse.Namespace) -> Fleet:
    """An admin, ``--users`` members and ``--workspaces`` busybox workspaces spread over
    them round robin; all but ``--running`` of them stopped again."""
    busybox_image(c, BB)
    users = [f"u{i:02d}" for i in range(args.users)]
    c.call("user.create", {"name": ADMIN, "role": "admin"})
    calls(d, args.jobs, "users", [("user.create", {"name": u, **UNLIMITED}) for u in users])
    refs = [f"{users[i % len(users)]}/w{i // len(users)}" for i in range(args.workspaces)]
    small = {"image": BB, "mem": "64M", "disk": "256M"}
    # One create at a time: concurrent creates that pick the same address retry after a
    # rollback, and den then fails them with "Internal error" (the owner's row expired).
    calls(
        d,
        1,
        "workspaces",
        [
            ("workspace.create", {"user": r.split("/")[0], "name": r.split("/")[1], **small})
            for r in refs
        ],
    )
    running = refs[: max(1, args.running)]
    stop = [("workspace.stop", {"ref": r}) for r in refs[len(running) :]]
    calls(d, args.jobs, "stopping", stop)
    return Fleet(users, refs, users[0], running)


def rows_shown(body: str, refs: list[str]) -> int:
    """How many of ``refs`` the page names (OWNER/NAME, whole)."""
    return sum(1 for r in refs if re.search(rf"(?<![\w/]){re.escape(r)}(?![\w/])", body))


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank below)."""
    ordered = sorted(values)
    return round(ordered[int(p / 100 * (len(ordered) - 1))], 2)


def measure_dash(
    d: BenchDaemon,
    c: Client,
    curl: Curl,
    fleet: Fleet,
    member_cookie: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Time to first byte (curl) and to the load event (Chromium) of the admin's page of
    every workspace and a member's home page, through Caddy."""
    admin_cookie = sign_in(curl, user_call(d, c, ADMIN, "login.link")["url"])
    mine = [r for r in fleet.refs if r.startswith(fleet.member + "/")]
    # The admin page of all workspaces, where it exists yet; else the admin's home page.
    admin_path = "/admin/workspaces"
    code, body = curl.get(curl.url(DOMAIN, admin_path), (f"Cookie: {admin_cookie}",))
    if code == 404:
        admin_path = "/"
        code, body = curl.get(curl.url(DOMAIN, admin_path), (f"Cookie: {admin_cookie}",))
    if code != 200:
        raise RuntimeError(f"the admin's {admin_path}: status {code}: {body[:300]}")
    pages = {
        "admin": (ADMIN, admin_path, admin_cookie, fleet.refs, rows_shown(body, fleet.refs)),
    }
    code, body = curl.get(curl.url(DOMAIN, "/"), (f"Cookie: {member_cookie}",))
    shown = rows_shown(body, fleet.refs)
    if code != 200 or shown != len(mine) or rows_shown(body, mine) != len(mine):
        raise RuntimeError(f"the member's home page: status {code}, {shown} of {len(mine)} rows")
    pages["member"] = (fleet.member, "/", member_cookie, mine, shown)

    out: dict[str, Any] = {}
    for role, (_, path, cookie, _, shown) in pages.items():
        url = curl.url(DOMAIN, path)
        curl.ttfb(url, (f"Cookie: {cookie}",))  # warm up (den's caches, Caddy's session)
        firsts = [curl.ttfb(url, (f"Cookie: {cookie}",)) for _ in range(args.loads)]
        out[role] = {
            "path": path,
            "rows": shown,
            "bytes": len(curl.get(url, (f"Cookie: {cookie}",))[1].encode()),
            "curl_ttfb_ms": spread([t for t, _ in firsts]),
            "curl_ttfb_after_tls_ms": spread([a for _, a in firsts]),
        }
    with chromium(Path(curl.ca), curl.port) as browser:
        for role, (user, path, _, _, _) in pages.items():
            link = user_call(d, c, user, "login.link")["url"]
            timings = browser_loads(browser, link, curl.url(DOMAIN, path), args.loads)
            out[role]["chromium_ttfb_ms"] = spread([t for t, _ in timings])
            out[role]["chromium_load_ms"] = spread([t for _, t in timings])
    out["admin_page_missing"] = admin_path != "/admin/workspaces"
    out["users"] = len(fleet.users)
    out["workspaces"] = len(fleet.refs)
    out["running"] = len(fleet.running)
    out["loads"] = args.loads
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 50), "p95": pct(values, 95)}


def browser_loads(browser: Browser, link: str, url: str, n: int) -> list[tuple[float, float]]:
    """Sign a fresh browser profile in with a one-time link (its button, as a person does),
    then load ``url`` n times (after one more that fills the cache): (first byte, load) ms."""
    ctx = browser.new_context()
    try:
        ctx.set_default_timeout(60_000)
        page = ctx.new_page()
        page.goto(link)
        with page.expect_navigation():
            page.get_by_role("button", name="Sign in").click()
        timings: list[tuple[float, float]] = []
        for i in range(n + 1):
            resp = page.goto(url, wait_until="load")
            if resp is None or resp.status != 200 or page.url != url:
                status = resp.status if resp else None
                raise RuntimeError(f"Chromium: {url}: status {status}, at {page.url}")
            page.wait_for_function(
                '() => performance.getEntriesByType("navigation")[0].loadEventEnd > 0'
            )
            first, load = page.evaluate(NAV_TIMING)
            if i:
                timings.append((float(first), float(load)))
        return timings
    finally:
        ctx.close()


class Localhost(AbstractResolver):
    """*.localhost is 127.0.0.1 (glibc does not say so; curl and browsers do by themselves)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


class Tty:
    """One terminal's output as it comes (a queue of chunks; b"" at its end) and a way in."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self.send = send
        self.out: asyncio.Queue[bytes] = asyncio.Queue()

    def drain(self) -> None:
        while not self.out.empty():
            if not self.out.get_nowait():
                raise RuntimeError("the terminal ended")

    async def quiet(self, first: float = 20, idle: float = 0.3) -> None:
        """Wait for output, then for ``idle`` seconds of none (a prompt drawn, a line redrawn)."""
        timeout = first
        while True:
            try:
                chunk = await asyncio.wait_for(self.out.get(), timeout)
            except TimeoutError:
                return
            if not chunk:
                raise RuntimeError("the terminal ended")
            timeout = idle

    async def echo(self, key: bytes = b"a", timeout: float = 10) -> float:
        """ms from sending one byte to its echo arriving."""
        self.drain()
        t = time.perf_counter()
        await self.send(key)
        got = b""
        while key not in got:
            chunk = await asyncio.wait_for(self.out.get(), timeout)
            if not chunk:
                raise RuntimeError("the terminal ended")
            got += chunk
        return (time.perf_counter() - t) * 1e3


async def web_tty(
    http: aiohttp.ClientSession, curl: Curl, ref: str, cookie: str
) -> tuple[Tty, aiohttp.ClientWebSocketResponse, asyncio.Task[None]]:
    """The browser terminal's websocket, as its page opens it (the session cookie, den's
    Origin), through Caddy; its output read into a Tty."""
    home = curl.url(DOMAIN, "")
    ws = await http.ws_connect(
        f"wss://{DOMAIN}:{curl.port}/_den/term/{ref}",
        headers={"Cookie": cookie, "Origin": home},
        max_msg_size=0,
    )
    hello = await ws.receive()
    if hello.type != aiohttp.WSMsgType.TEXT or json.loads(hello.data).get("type") != "attached":
        raise RuntimeError(f"the browser terminal did not attach: {hello.type} {hello.data!r}")
    await ws.send_str(json.dumps({"type": "resize", "cols": 80, "rows": 24}))

    async def send(data: bytes) -> None:
        await ws.send_bytes(data)

    tty = Tty(send)

    async def read() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                tty.out.put_nowait(msg.data)
        tty.out.put_nowait(b"")

    return tty, ws, asyncio.create_task(read())


async def ssh_tty(
    port: int, name: str, key: asyncssh.SSHKey
) -> tuple[Tty, asyncssh.SSHClientConnection, asyncio.Task[None]]:
    """``ssh -t NAME@den``: a login shell on a PTY through den's SSH gateway."""
    conn = await asyncssh.connect(
        "127.0.0.1", port, username=name, client_keys=[key], known_hosts=None
    )
    proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)

    async def send(data: bytes) -> None:
        proc.stdin.write(data)

    tty = Tty(send)

    async def read() -> None:
        while data := await proc.stdout.read(65536):
            tty.out.put_nowait(data)
        tty.out.put_nowait(b"")

    return tty, conn, asyncio.create_task(read())


def measure_keys(
    d: BenchDaemon,
    c: Client,
    curl: Curl,
    fleet: Fleet,
    cookie: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Keystroke echo in the same workspace's shell: the browser terminal beside ssh."""
    ref = fleet.running[0]
    owner = ref.split("/")[0]
    key = asyncssh.generate_private_key("ssh-ed25519")
    c.call("key.add", {"user": owner, "key": key.export_public_key().decode().strip()})
    web_ms, ssh_ms = asyncio.run(keystrokes(curl, int(d.info["ssh_port"]), ref, cookie, key, args))
    xterm: dict[str, float] = {}
    if args.xterm > 0:
        link = user_call(d, c, owner, "login.link")["url"]
        with chromium(Path(curl.ca), curl.port) as browser:
            typed = xterm_keystrokes(browser, link, curl.url(DOMAIN, f"/terminal/{ref}"), args)
        xterm = {"p50": pct(typed, 50), "p99": pct(typed, 99), "n": len(typed)}
    return {
        "workspace": ref,
        "keystrokes": args.keys,
        "web_ms": {"p50": pct(web_ms, 50), "p99": pct(web_ms, 99)},
        "ssh_ms": {"p50": pct(ssh_ms, 50), "p99": pct(ssh_ms, 99)},
        "ratio_p50": round(statistics.median(web_ms) / statistics.median(ssh_ms), 2),
        "chromium_xterm_ms": xterm,
    }


# Armed before a key is pressed: from the keydown to the screen (xterm's rows in the DOM)
# showing one more "a" than before.
XTERM_ARM = """() => {
  const rows = document.querySelector("#terminal .xterm-rows");
  const count = () => (rows.textContent.match(/a/g) || []).length;
  const before = count();
  let t0 = null;
  document.addEventListener("keydown", () => { t0 = performance.now(); },
                            {capture: true, once: true});
  window.denEcho = new Promise(resolve => {
    const seen = new MutationObserver(() => {
      if (t0 !== null && count() > before) {
        seen.disconnect();
        resolve(performance.now() - t0);
      }
    });
    seen.observe(rows, {subtree: true, childList: true, characterData: true});
  });
}"""


def xterm_keystrokes(
    browser: Browser, link: str, url: str, args: argparse.Namespace
) -> list[float]:
    """Keystrokes typed into the terminal page (xterm.js) in Chromium: ms from keydown
    to the echo drawn."""
    ctx = browser.new_context()
    try:
        ctx.set_default_timeout(30_000)
        page = ctx.new_page()
        page.goto(link)
        with page.expect_navigation():
            page.get_by_role("button", name="Sign in").click()
        page.goto(url)
        page.wait_for_function(
            '() => document.querySelector("#terminal .xterm-rows")?.textContent.trim()'
        )
        page.click("#terminal")
        page.wait_for_timeout(500)  # the whole prompt drawn
        times: list[float] = []
        for i in range(args.xterm):
            page.evaluate(XTERM_ARM)
            page.keyboard.press("a")
            times.append(float(page.evaluate("() => window.denEcho")))
            page.wait_for_timeout(args.pause * 1e3)
            if i % 40 == 39:
                page.keyboard.press("Control+u")
                page.wait_for_timeout(200)
        return times
    finally:
        ctx.close()


async def keystrokes(
    curl: Curl, ssh_port: int, ref: str, cookie: str, key: asyncssh.SSHKey, args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    ssl_ctx = ssl.create_default_context(cafile=str(curl.ca))
    connector = aiohttp.TCPConnector(resolver=Localhost(), ssl=ssl_ctx)
    async with aiohttp.ClientSession(connector=connector) as http:
        web, ws, web_reader = await web_tty(http, curl, ref, cookie)
        ssh, conn, ssh_reader = await ssh_tty(ssh_port, ref.split("/")[1], key)
        try:
            for tty in (web, ssh):
                await tty.quiet()  # the login shell's prompt
            times: dict[str, list[float]] = {"web": [], "ssh": []}
            for i in range(args.keys):
                # Alternate who goes first: neither always finds the machine quieter.
                order = (("web", web), ("ssh", ssh)) if i % 2 == 0 else (("ssh", ssh), ("web", web))
                for side, tty in order:
                    times[side].append(await tty.echo())
                    await asyncio.sleep(args.pause)
                if i % 40 == 39:  # ^U: an empty line again, before it wraps
                    for tty in (web, ssh):
                        await tty.send(b"\x15")
                        await tty.quiet(first=1, idle=0.1)
            return times["web"], times["ssh"]
        finally:
            await ws.close()
            conn.close()
            await conn.wait_closed()
            for task in (web_reader, ssh_reader):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def report(r: dict[str, Any]) -> None:
    if "small_direct" in r:
        report_gate(r)
    if "dash" in r:
        report_dash(r["dash"])
    if "keys" in r:
        report_keys(r["keys"])
    print(json.dumps({"bench": "http", **r}))


def report_dash(r: dict[str, Any]) -> None:
    title = (
        f"dashboard page load through Caddy: {r['workspaces']} workspaces "
        f"({r['running']} running), {r['users']} members, {r['loads']} loads each"
    )
    table = Table(title=title)
    for col in (
        "page",
        "rows",
        "KiB",
        "curl first byte p50 / p95 ms",
        "  after TLS",
        "Chromium first byte",
        "Chromium load",
    ):
        table.add_column(col)
    for role, what in (("admin", "admin"), ("member", "member")):
        m = r[role]
        page = f"{what}: {m['path']}"
        if role == "admin" and r["admin_page_missing"]:
            page += " (no /admin/workspaces yet)"
        table.add_row(
            page,
            str(m["rows"]),
            str(round(m["bytes"] / 1024, 1)),
            *(
                f"{m[k]['p50']} / {m[k]['p95']}"
                for k in (
                    "curl_ttfb_ms",
                    "curl_ttfb_after_tls_ms",
                    "chromium_ttfb_ms",
                    "chromium_load_ms",
                )
            ),
        )
    Console().print(table)


def report_keys(r: dict[str, Any]) -> None:
    table = Table(title=f"keystroke echo in {r['workspace']}'s shell, {r['keystrokes']} each")
    for col in ("path", "p50 ms", "p99 ms", "web p50 / ssh p50", "goal"):
        table.add_column(col)
    w, s = r["web_ms"], r["ssh_ms"]
    table.add_row(
        "browser terminal (websocket via Caddy)",
        str(w["p50"]),
        str(w["p99"]),
        str(r["ratio_p50"]),
        "<= 1.5",
    )
    table.add_row("ssh -t (den's gateway)", str(s["p50"]), str(s["p99"]), "", "")
    if x := r["chromium_xterm_ms"]:
        table.add_row(
            f"  Chromium: keydown to echo drawn by xterm.js ({x['n']})",
            str(x["p50"]),
            str(x["p99"]),
            "",
            "",
        )
    Console().print(table)


def report_gate(r: dict[str, Any]) -> None:
    table = Table(title="workspace URL: Caddy + den's gate (a) vs the same Caddy, no check (b)")
    for col in ("measure", "(a) gate", "(b) direct", "a/b", "goal"):
        table.add_column(col)

    def small_rows(
        what: str, a: dict[str, Any], b: dict[str, Any], ratio: float, goal: str
    ) -> None:
        table.add_row(f"{what}: req/s", str(a["rps"]), str(b["rps"]), str(ratio), goal)
        table.add_row(
            "  p50 / p99 ms",
            f"{a['p50_ms']} / {a['p99_ms']}",
            f"{b['p50_ms']} / {b['p99_ms']}",
            "",
            "",
        )
        table.add_row(
            "  CPU us/request: " + " / ".join(PARTS),
            " / ".join(str(a["cpu_us"][k]) for k in PARTS),
            " / ".join(str(b["cpu_us"][k]) for k in PARTS),
            "",
            "",
        )

    d = r["small_direct"]
    for name, what in (
        ("cookie", "session cookie"),
        ("bearer", "bearer token"),
        ("public", "public"),
    ):
        small_rows(
            f"http.server page, {what}", r[f"small_{name}"], d, r[f"rps_ratio_{name}"], ">= 0.8"
        )
    fd = r["small_fast_direct"]
    small_rows(
        "fast app page, session cookie",
        r["small_fast_cookie"],
        fd,
        r["rps_ratio_fast_cookie"],
        ">= 0.8",
    )
    small_rows(
        "fast app page, Caddy subrequest to a static answer",
        r["small_fast_stub"],
        fd,
        r["rps_ratio_fast_stub"],
        "(breakdown)",
    )
    table.add_row(
        f"{BIG_MB} MB download (cookie), MB/s",
        str(r["big_mb_s"]["cookie"]),
        str(r["big_mb_s"]["direct"]),
        str(r["throughput_ratio"]),
        ">= 0.9",
    )
    t = r["ttfb_ms"]
    table.add_row(
        "first byte, suspended -> woken, p50 (p90) ms",
        f"{t['woken']['p50']} ({t['woken']['p90']})",
        "-",
        "",
        "< 30",
    )
    table.add_row(
        "first byte, running, p50 (p90) ms",
        f"{t['running']['p50']} ({t['running']['p90']})",
        f"{t['direct']['p50']} ({t['direct']['p90']})",
        "",
        "",
    )
    table.add_row(
        "  the same after the TLS handshake, p50 ms",
        f"woken {t['woken']['p50_after_tls']}, running {t['running']['p50_after_tls']}",
        str(t["direct"]["p50_after_tls"]),
        "",
        "",
    )
    table.add_row("  of the wake: den's resume, mean ms", str(t["resume_mean"]), "", "", "")
    Console().print(table)


if __name__ == "__main__":
    main()
