"""`den tui` driven by Textual's pilot against the session's real pool daemon.

One workspace of a member with an SSH key; the TUI runs as root over the unix
socket (an admin, like `den` on the host) and as members over TCP with their
API tokens (like `den --url --token`).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from textual.app import App, ComposeResult
from textual.pilot import Pilot

from den.cli.client import Client
from den.cli.tui import Api, DenTui
from den.cli.tui.app import Workspaces
from den.cli.tui.views import (
    ChangesScreen,
    Confirm,
    Help,
    ListScreen,
    Prompt,
    SessionsScreen,
    Table,
)
from tests.conftest import Daemon
from tests.ssh.conftest import Person, person, ssh_opts
from tests.workspaces.conftest import Users, import_bb

BB = "tuibb"


@dataclass
class World:
    d: Daemon
    owner: Person
    other: str
    ws: str
    tokens: dict[str, str]

    @property
    def ref(self) -> str:
        return f"{self.owner.name}/{self.ws}"

    def client(self, user: str | None = None) -> Client:
        """root over the unix socket, or a member over TCP with an API token."""
        return self.d.client() if user is None else self.d.client(token=self.tokens[user])


@pytest.fixture(scope="module")
def world(pool_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import_bb(pool_daemon, BB)
    users = Users(pool_daemon)
    try:
        owner = person(pool_daemon, users, tmp_path_factory.mktemp("tui"))
        other = users.make()
        ws = f"tui{secrets.token_hex(2)}"
        pool_daemon.call("workspace.create", name=ws, user=owner.name, image=BB)
        tokens = {
            u: pool_daemon.call("token.create", user=u, right="write")["token"]
            for u in (owner.name, other)
        }
        yield World(pool_daemon, owner, other, ws, tokens)
    finally:
        users.cleanup()
        pool_daemon.call("image.delete", name=BB)


async def until(
    pilot: Pilot[None],
    check: Callable[[], object],
    timeout: float = 60,
    why: Callable[[], object] | None = None,
) -> None:
    """Let the app run until ``check()`` holds (``why()`` says what it saw instead).

    Generous: on a loaded 2-core host a stop or start may take many seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            app = pilot.app
            seen = why() if why else ""
            tables = app.screen.query(Table)
            cells = tables.first().cells if tables else None
            said = [n.message for n in app._notifications]
            raise AssertionError(f"timed out on {type(app.screen).__name__}: {cells} {said} {seen}")
        await pilot.pause(0.05)


def table(app: DenTui) -> Table:
    return app.screen.query_one(Table)


def row(app: DenTui, key: str) -> list[str] | None:
    return table(app).cells.get(key)


def notes(app: DenTui) -> list[str]:
    return [n.message for n in app._notifications]


def drive(app: App[None], script: Callable[[Pilot[None]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with app.run_test(size=(140, 36)) as pilot:
            await script(pilot)

    asyncio.run(main())


class Recorder:
    """Runs the shell command the TUI hands the terminal to, recording it."""

    def __init__(self, wrap: Callable[[Sequence[str]], list[str]] | None = None) -> None:
        self.wrap = wrap
        self.argv: list[str] = []
        self.output = ""

    def __call__(self, argv: Sequence[str]) -> int:
        self.argv = list(argv)
        run = self.wrap(argv) if self.wrap else ["/bin/true"]
        res = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
        self.output = res.stdout + res.stderr
        return res.returncode


def test_admin_sees_all_suspends_resumes_and_views_sessions_and_users(
    world: World, tmp_path: Path
) -> None:
    o = world.owner
    live: list[subprocess.Popen[bytes]] = []
    shell = Recorder()
    app = DenTui(Api(world.client()), interval=0.5, runner=shell)

    async def script(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: row(app, world.ref))
        cells = row(app, world.ref)
        assert cells is not None and cells[:3] == [world.ws, o.name, "running"], cells
        assert [str(c.label) for c in table(app).columns.values()][:3] == [
            "workspace",
            "owner",
            "state",
        ]
        table(app).move_cursor(row=list(table(app).cells).index(world.ref))

        await pilot.press("z")
        await until(pilot, lambda: (row(app, world.ref) or [""])[2][:9] == "suspended")
        assert world.d.call("workspace.get", ref=world.ref)["state"] == "suspended"
        assert table(app).selected == world.ref  # refreshes keep the cursor on its row
        await pilot.press("r")
        await until(pilot, lambda: (row(app, world.ref) or [""])[2] == "running")
        # Stopped, it cannot be suspended: den's refusal is a notification, not a traceback.
        await pilot.press("x")
        await until(pilot, lambda: (row(app, world.ref) or [""])[2][:7] == "stopped")
        await pilot.press("z")
        await until(pilot, lambda: any("cannot suspend" in n for n in notes(app)))
        assert app.is_running
        await pilot.press("s")
        await until(pilot, lambda: (row(app, world.ref) or [""])[2] == "running")

        # root is no den user: another owner's workspace is OWNER.NAME@host.
        await pilot.press("o")
        await until(pilot, lambda: shell.argv)
        port = world.d.call("system.info")["ssh_port"]
        login = f"{o.name}.{world.ws}@{socket.gethostname()}"
        assert shell.argv == ["ssh", "-p", str(port), login]

        # A live ssh session of the owner's, for the sessions view.
        live.append(
            subprocess.Popen(
                ["ssh", *ssh_opts(o.key, o.port), f"{world.ws}@127.0.0.1", "sleep 60"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "ssh.err", "wb"),  # noqa: SIM115
            )
        )
        await pilot.press("w")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen))
        await until(
            pilot,
            lambda: any(
                r["workspace"] == world.ref and r["user"] == o.name
                for r in app.screen.rows.values()  # type: ignore[attr-defined]
            ),
            why=lambda: (app.screen.rows, live[0].poll(), notes(app)),  # type: ignore[attr-defined]
        )
        shot = Path(app.save_screenshot("sessions.svg", str(tmp_path)))
        assert world.ref in shot.read_text()
        sessions = app.screen
        assert isinstance(sessions, SessionsScreen)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, ListScreen))
        # A list den sends just after the view closed is dropped, not a crash.
        sessions._deliver([])
        await pilot.pause(0.1)
        assert app.is_running

        await pilot.press("u")
        await until(pilot, lambda: isinstance(app.screen, ListScreen))
        await until(pilot, lambda: {o.name, world.other} <= set(table(app).cells))
        await pilot.press("escape")

        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, Help))
        await pilot.press("space")
        await until(pilot, lambda: not isinstance(app.screen, Help))

        # Delete asks first; no keeps it.
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, Confirm))
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, Confirm))
        await pilot.pause(0.6)
        assert world.d.call("workspace.get", ref=world.ref)["state"] == "running"

        shot = Path(app.save_screenshot("workspaces.svg", str(tmp_path)))
        text = shot.read_text()
        assert shot.stat().st_size > 2000 and world.ws in text and "suspend" in text.lower()
        await pilot.press("q")

    try:
        drive(app, script)
    finally:
        for p in live:
            p.kill()
            p.wait()
    assert not app.is_running


def test_member_sees_own_workspace_opens_a_shell_and_pushes(world: World) -> None:
    o = world.owner
    # The real ssh client with the owner's key, into the gateway, running one command.
    shell = Recorder(
        lambda argv: [argv[0], *ssh_opts(o.key, o.port)[:-2], *argv[1:], "echo tui-shell-ok"]
    )
    app = DenTui(Api(world.client(o.name)), interval=0.5, runner=shell)

    async def script(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: row(app, world.ref))
        assert (row(app, world.ref) or [])[:3] == [world.ws, "running", BB]
        assert "owner" not in [str(c.label) for c in table(app).columns.values()]

        await pilot.press("o")
        await until(pilot, lambda: shell.output)
        host = world.d.http_url.split("//")[1].split(":")[0]
        assert shell.argv == ["ssh", "-p", str(o.port), f"{world.ws}@{host}"]
        assert "tui-shell-ok" in shell.output, shell.output

        # Code changes of the workspace, and a push with nothing to push: den's refusal
        # is a notification.
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ChangesScreen))
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, Prompt))
        await pilot.press("tab")
        for ch in "tui":
            await pilot.press(ch)
        await pilot.press("enter")
        await until(pilot, lambda: any("repos with changes: none" in n for n in notes(app)))
        await pilot.press("escape")
        await pilot.press("q")

    drive(app, script)


def test_member_does_not_see_anothers_workspace_nor_users(world: World) -> None:
    app = DenTui(Api(world.client(world.other)), interval=0.5)

    async def script(pilot: Pilot[None]) -> None:
        screen = app.screen
        assert isinstance(screen, Workspaces)
        await until(pilot, lambda: screen.me)  # set with the first list den returned
        await pilot.pause(0.6)  # a second poll: still nothing of the owner's
        assert table(app).cells == {}
        await pilot.press("u")  # the users view is for admins: the key does nothing
        await pilot.pause(0.2)
        assert app.screen is screen
        await pilot.press("q")

    drive(app, script)


def test_table_keeps_the_cursor_on_its_row() -> None:
    """Rows added, removed or changed around the selected one: the cursor stays on it."""

    class One(App[None]):
        def compose(self) -> ComposeResult:
            yield Table()

    app = One()

    async def script(pilot: Pilot[None]) -> None:
        t = app.query_one(Table)
        t.set_columns(["name", "state"])
        t.fill([(k, [k, "running"]) for k in ("a", "b", "c")])
        t.move_cursor(row=1)
        t.fill([(k, [k, "running"]) for k in ("a", "b", "c")])
        assert t.selected == "b"
        t.fill([("b", ["b", "suspended"]), ("c", ["c", "running"])])  # in place
        assert t.selected == "b" and t.get_row("b")[1].plain == "suspended"
        t.fill([(k, [k, "running"]) for k in ("0", "a", "b", "c")])  # a row before it
        assert t.selected == "b" and t.cursor_row == 2
        t.fill([("x", ["[red]x[/]", "running"])])  # gone; den's data is no markup
        assert t.selected == "x" and t.get_row("x")[0].plain == "[red]x[/]"

    drive(app, script)


def test_den_data_reaches_the_terminal_without_escape_sequences(world: World) -> None:
    """A member's display name with terminal escapes (a window title, a clipboard write,
    a cleared screen): the admin's users view shows it with the controls replaced,
    since Textual writes a cell's text to the terminal as it is."""
    hostile = "ada\x1b]0;owned\x1b\\\x1b]52;c;ZWNobyBoaQ==\x1b\\\x1b[2J\x9b31m"
    # den refuses control characters in a display name (den.services.common.Line), but a
    # row stored before it did still holds them: put one there as such a row.
    db = sqlite3.connect(world.d.data_dir / "den.db")
    try:
        with db:
            db.execute("UPDATE users SET display_name = ? WHERE name = ?", (hostile, world.other))
    finally:
        db.close()
    app = DenTui(Api(world.client()), interval=0.5, runner=Recorder())

    async def script(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: row(app, world.ref))
        await pilot.press("u")
        await until(pilot, lambda: isinstance(app.screen, ListScreen))
        await until(pilot, lambda: world.other in table(app).cells)
        shown = [c.plain for c in table(app).get_row(world.other)]
        assert not any(ch in s for s in shown for ch in "\x1b\x9b"), shown
        assert "ada\ufffd]0;owned" in " ".join(shown), shown
        await pilot.press("q")

    try:
        drive(app, script)
    finally:
        world.d.call("user.update", name=world.other, display_name="")
