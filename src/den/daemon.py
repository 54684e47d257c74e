"""``den serve``: one asyncio process for every listener and background loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from den import log as den_log
from den import tasks
from den.app import App
from den.config import Settings
from den.host import checks
from den.meta import server as meta
from den.net import overlay
from den.node import vol_state
from den.rpc.server import make_web_app, prepare_socket
from den.services import idle, load_all, metrics, net, reconciler
from den.ssh.server import Gateway

log = logging.getLogger("den.daemon")
STOP_THREADS_SECONDS = 10.0  # how long a stop waits for threads still busy


async def _load_acl(app: App) -> None:
    """The node ACL file (acl_file), before any call: a broken one stops den here."""
    from den.rpc.acl import AclFileError, load_file

    try:
        warnings = await load_file(app)
    except AclFileError as err:
        raise SystemExit(f"den: {err}") from None
    for w in warnings:
        log.warning("acl file: %s", w)


class _Threads(ThreadPoolExecutor):
    """The loop's threads for blocking work (asyncio.to_thread). At shutdown
    asyncio waits for them; a thread still busy after STOP_THREADS_SECONDS is left
    to the process's exit, and said, rather than holding up the stop for ever."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)
        if not wait:
            return
        deadline = time.monotonic() + STOP_THREADS_SECONDS
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = sum(t.is_alive() for t in self._threads)
        if busy:
            log.warning("stopping with %d thread(s) still busy", busy)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    asyncio.get_running_loop().set_default_executor(_Threads(thread_name_prefix="den"))
    load_all()
    try:
        # A thread: pyroute2's netlink socket runs an event loop of its own.
        overlay_addr = await asyncio.to_thread(overlay.choose, settings.http_overlay)
    except ValueError as err:
        raise SystemExit(f"den: {err}") from None
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    for clash in checks.ephemeral_clashes(settings):
        log.warning("port in the ephemeral range: %s", clash)
    app = App(settings)
    if settings.web:
        from den.web.caddy import ensure_account

        # Before the network is first put in place: Caddy's account may reach workspaces.
        app.network.web_uid = await ensure_account(settings)
    await app.start()
    await net.restore(app)  # what net.* made, back in the kernel (den.services.net)
    await vol_state.restore(app)  # mounts vol.mount made (den.node.vol_state)
    await _load_acl(app)
    # Before the reconciler starts workspaces: it follows the backend from here.
    await meta.start(app)
    await reconciler.reconcile(app, startup=True)
    reconciler.start_loop(app)
    metrics.start(app)
    idle.start(app)
    runner = web.AppRunner(make_web_app(app), access_log=None, handle_signals=False)
    await runner.setup()
    sock = prepare_socket(str(settings.socket), settings.socket_group, settings.socket_mode)
    unix_site = web.SockSite(runner, sock)
    await unix_site.start()
    tcp_site = web.TCPSite(runner, settings.http_host, settings.http_port, reuse_address=True)
    await tcp_site.start()
    gateway = Gateway(app)
    ssh_port = await gateway.start()
    from den.mail import run as mail

    mail_server = await mail.start(app)  # None: mail_domain unset
    server = tcp_site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else 0
    overlay_addr = await _serve_overlay(app, runner, overlay_addr, port)
    # Workspaces may reach den's own listeners on the bridge: with port 0 the
    # real ports are known only now.
    await app.network.set_ports([ssh_port, port])
    gate_runner = await _start_web(app, port) if settings.web else None
    state = {
        "pid": os.getpid(),
        "socket": str(settings.socket),
        "http": f"http://{settings.http_host}:{port}",
        "http_port": port,
        "ssh_port": ssh_port,
        "instance": settings.instance,
        "overlay": overlay_addr,  # None: not served on an overlay network
    }
    if app.caddy is not None:
        from den.web.urls import home_url

        state["https"] = home_url(settings)
        state["https_port"] = settings.web_port
    settings.state_file.write_text(json.dumps(state))
    log.info(
        "den serving",
        extra={
            "ctx": {"socket": settings.socket, "http": state["http"], "instance": settings.instance}
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await gateway.stop()
        if mail_server is not None:
            mail_server.close()
        if app.caddy is not None:
            await app.caddy.stop()
        await tasks.cancel_all()
        await meta.stop(app)
        if gate_runner is not None:
            await gate_runner.cleanup()
        await runner.cleanup()
        await app.close()
        for path in (settings.socket, settings.state_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("stopped")


async def _serve_overlay(
    app: App, runner: web.AppRunner, addr: str | None, port: int
) -> str | None:
    """The HTTP listener on the overlay address too; an address found (auto) that
    cannot be bound is skipped, one the config names stops den."""
    if addr is None:
        return None
    try:
        await web.TCPSite(runner, addr, port, reuse_address=True).start()
    except OSError as err:
        if app.settings.http_overlay != "auto":
            raise SystemExit(f"den: cannot listen on http_overlay [{addr}]:{port}: {err}") from None
        log.warning("overlay address not served", extra={"ctx": {"addr": addr, "error": str(err)}})
        return None
    overlay.record(app, addr, port)
    log.info("serving on the overlay network", extra={"ctx": {"http": overlay.url(addr, port)}})
    return addr


async def _start_web(app: App, http_port: int) -> web.AppRunner:
    """The gate's listener (for Caddy alone), then Caddy itself."""
    from den.web.caddy import Caddy, bind_gate
    from den.web.gate import Gate
    from den.web.server import make_gate_app

    app.gate = Gate(app)
    runner = web.AppRunner(make_gate_app(app, app.gate), access_log=None, handle_signals=False)
    await runner.setup()
    caddy = Caddy(app)
    await web.SockSite(runner, bind_gate(caddy.paths.gate, caddy.account)).start()
    try:
        await caddy.start(http_port)
    except (OSError, RuntimeError) as err:
        await caddy.stop()
        await runner.cleanup()
        raise SystemExit(f"den: the web front door did not start: {err}") from None
    app.caddy = caddy
    return runner


def run(settings: Settings) -> None:
    den_log.setup(settings.log_level, settings.log_file)
    # The stock event loop, not uvloop: uvloop spawns subprocesses with fork(),
    # which costs ~10 ms for a daemon of this size on every crun call, while
    # asyncio uses vfork (~1 ms). Measured in bench/lifecycle.py.
    asyncio.run(serve(settings))
    # Shut down cleanly by now: every listener, workspace handle and database
    # connection is closed and the log says "stopped". Leave without the
    # interpreter's teardown, which frees a heap the kernel frees at once
    # (0.5-0.9 s of CPU on every stop and restart, measured with strace).
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(0)
