"""The backend contract: nothing outside den.backends names a concrete backend, the
registry makes them by name, and an optional feature a backend lacks says so."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import socket
from pathlib import Path

import pytest

from den.backends import registry
from den.backends.base import (
    Backend,
    ExecRequest,
    ExecResult,
    ExecStream,
    HostContext,
    Spec,
    State,
    Stats,
    Status,
    Terminal,
)
from den.config import Settings
from den.errors import BackendFailure, InvalidParams
from den.net.network import Network

SRC = Path(__file__).resolve().parent.parent / "src" / "den"
CONCRETE = {"sandbox", "crun", "microvm", "bundle", "cgroups", "view", "seccomp"}
# module -> why it may import a concrete backend module anyway.
ALLOWED = {
    "den.ssh.join": (
        "the sandbox's worker processes (sftp_worker, socket_worker) join a container "
        "with it; it compiles the seccomp filter of an old bundle the sandbox wrote"
    ),
}


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth, also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _concrete(name: str) -> bool:
    parts = name.split(".")
    return parts[:2] == ["den", "backends"] and len(parts) > 2 and parts[2] in CONCRETE


def test_no_module_outside_backends_imports_a_concrete_backend() -> None:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        mod = _module(path)
        if mod.startswith("den.backends") or mod in ALLOWED:
            continue
        bad += [f"{mod} imports {name}" for name in sorted(_imports(path)) if _concrete(name)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_such_an_import(tmp_path: Path) -> None:
    """The walk catches the forms an import takes (else the test above proves nothing)."""
    f = tmp_path / "m.py"
    f.write_text(
        "def f():\n    from den.backends import crun\n    import den.backends.sandbox\n"
        "from den.backends.microvm.backend import MicroVMBackend\n"
    )
    assert {n for n in _imports(f) if _concrete(n)} == {
        "den.backends.crun",
        "den.backends.sandbox",
        "den.backends.microvm.backend",
        "den.backends.microvm.backend.MicroVMBackend",
    }


def _host(tmp_path: Path) -> HostContext:
    net = Network(99, "10.176.0.0/16", True, [])  # never set up: nothing touches the host
    return HostContext(99, tmp_path, tmp_path / "volumes", net, None, Settings(instance=99))


def test_the_registry_lists_and_makes_the_sandbox(tmp_path: Path) -> None:
    assert "sandbox" in registry.names()
    backend = registry.make("sandbox", _host(tmp_path))
    assert isinstance(backend, Backend)
    assert backend.name == "sandbox"
    assert backend.host.instance == 99
    assert backend.on_up == [] and backend.on_down == []
    assert not backend.running("nosuchworkspace")


def test_an_unknown_backend_is_invalid_params(tmp_path: Path) -> None:
    with pytest.raises(InvalidParams) as err:
        registry.make("nosuch", _host(tmp_path))
    assert "nosuch" in str(err.value) and "sandbox" in str(err.value)


class Minimal(Backend):
    """Only the required methods (never run): what base gives the optional ones."""

    name = "minimal"

    async def create(self, spec: Spec) -> State:
        raise NotImplementedError

    async def start(self, spec: Spec, state: State) -> State:
        raise NotImplementedError

    async def stop(self, spec: Spec, state: State) -> State:
        raise NotImplementedError

    async def suspend(self, spec: Spec, state: State) -> State:
        raise NotImplementedError

    async def resume(self, spec: Spec, state: State) -> State:
        raise NotImplementedError

    async def delete(self, spec: Spec, state: State) -> None:
        raise NotImplementedError

    async def update_resources(self, spec: Spec, state: State) -> State:
        raise NotImplementedError

    async def exec(self, spec: Spec, state: State, req: ExecRequest) -> ExecResult:
        raise NotImplementedError

    async def exec_stream(
        self, spec: Spec, state: State, req: ExecRequest, *, tty: Terminal | None = None
    ) -> ExecStream:
        raise NotImplementedError

    async def sftp(self, spec: Spec, state: State, user: str) -> ExecStream:
        raise NotImplementedError

    async def connect(self, spec: Spec, state: State, host: str, port: int) -> socket.socket:
        raise NotImplementedError

    async def status(self, spec: Spec, state: State) -> Status:
        raise NotImplementedError

    async def stats(self, spec: Spec, state: State) -> Stats:
        raise NotImplementedError

    async def orphans(self, known_ids: set[str]) -> list[str]:
        raise NotImplementedError

    async def remove_orphan(self, ws_id: str) -> None:
        raise NotImplementedError

    async def teardown_host(self) -> None:
        raise NotImplementedError

    def running(self, ws_id: str) -> bool:
        raise NotImplementedError


def test_an_optional_feature_a_backend_lacks_says_so(tmp_path: Path) -> None:
    b = Minimal(_host(tmp_path))
    spec = Spec("x", "o", "n", "img", tmp_path, tmp_path, 0, 1, 1.0, 64, 64, "", "n")
    calls = {
        "remote forwarding (ssh -R)": lambda: asyncio.run(
            b.listen_tcp(spec, {}, socket.AF_INET, "127.0.0.1", 0)
        ),
        "Unix socket forwarding": lambda: asyncio.run(
            b.unix_socket(spec, {}, "connect", "/x.sock", ids="0:0")
        ),
        "watching a workspace stop": lambda: b.watch_stopped(spec, {}, lambda: None),
    }
    for feature, call in calls.items():
        with pytest.raises(BackendFailure) as err:
            call()
        assert err.value.message == f"the minimal backend does not offer {feature}"


def test_a_backend_missing_a_required_method_fails_at_once() -> None:
    with pytest.raises(TypeError, match="running"):

        class Half(Backend):
            name = "half"
            create = Minimal.create
            start = Minimal.start
            stop = Minimal.stop
            suspend = Minimal.suspend
            resume = Minimal.resume
            delete = Minimal.delete
            update_resources = Minimal.update_resources
            exec = Minimal.exec
            exec_stream = Minimal.exec_stream
            sftp = Minimal.sftp
            connect = Minimal.connect
            status = Minimal.status
            stats = Minimal.stats
            orphans = Minimal.orphans
            remove_orphan = Minimal.remove_orphan
            teardown_host = Minimal.teardown_host


def test_a_closed_terminal_is_unwatched_before_its_number_is_reused(tmp_path: Path) -> None:
    """An ssh or browser terminal closed while its read waits (the relay cancels the
    read and closes in one step): the event loop must stop watching the terminal's
    descriptor before it is closed, or a socket that gets the same number next is
    never heard (asyncio keeps the stale registration and only swaps its callback)."""
    from den.backends.terminal import PtyExec

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        master, slave = os.openpty()
        try:
            term = PtyExec(proc, None, tmp_path / "pid")
            os.set_blocking(master, False)
            term.master = master
            reading = asyncio.ensure_future(term.read())
            await asyncio.sleep(0.05)  # the read waits on the terminal
            reading.cancel()
            await term.close()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            r, w = os.pipe()
            if r != master:  # the next file the kernel numbers so (it often is)
                os.dup2(r, master)
                os.close(r)
            heard = loop.create_future()
            loop.add_reader(master, lambda: heard.done() or heard.set_result(True))
            os.write(w, b"x")
            try:
                return bool(await asyncio.wait_for(heard, 2))
            except TimeoutError:
                return False
            finally:
                loop.remove_reader(master)
                os.close(master)
                os.close(w)
        finally:
            os.close(slave)
            proc.kill()
            await proc.wait()

    assert asyncio.run(scenario()), "the reused descriptor is not watched"
