"""``den tui``: workspaces with live state, and the daily actions on them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from textual import work
from textual.app import App, ComposeResult, SuspendNotSupported
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Header, Static

from den.cli.tui.api import Api, CallError, Runner, run_foreground, ssh_command
from den.cli.tui.views import (
    ChangesScreen,
    Confirm,
    Help,
    Polled,
    SessionsScreen,
    Table,
    cell,
    plain,
    users_screen,
)

CSS = """
#empty { padding: 1 2; color: $text-muted; }
Table { height: 1fr; }
ModalScreen { align: center middle; }
.dialog { width: 72; height: auto; padding: 1 2; border: thick $accent; background: $surface; }
.dialog Input { margin-top: 1; }
.buttons { height: auto; margin-top: 1; }
.buttons Button { margin-right: 2; }
"""


def _resources(ws: dict[str, Any]) -> str:
    return f"{ws['cpu']:g} cpu / {ws['memory_mb']}M"


class Workspaces(Polled):
    """The caller's workspaces (admins: everyone's), polled from ``workspace.list``."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "shell", "Shell"),
        Binding("s", "power('start')", "Start"),
        Binding("x", "power('stop')", "Stop"),
        Binding("z", "power('suspend')", "Suspend"),
        Binding("r", "power('resume')", "Resume"),
        Binding("d", "delete", "Delete"),
        Binding("c", "changes", "Code"),
        Binding("w", "sessions", "Sessions"),
        Binding("u", "users", "Users"),
    ]

    def __init__(self, api: Api, interval: float) -> None:
        super().__init__(api, interval)
        self.me: dict[str, Any] | None = None
        self.rows: dict[str, dict[str, Any]] = {}
        self.info: dict[str, Any] | None = None

    @property
    def admin(self) -> bool:
        return self.me is not None and self.me.get("role") == "admin"

    def compose(self) -> ComposeResult:
        yield Header()
        yield Table(id="workspaces")
        yield Static("", id="empty")
        yield Footer()

    def fetch(self) -> Any:
        me = self.me or self.api.call("auth.whoami")
        params = {"all": True} if me.get("role") == "admin" else {}
        return me, self.api.call("workspace.list", params)

    def show(self, data: Any) -> None:
        me, rows = data
        table = self.query_one(Table)
        if self.me is None:
            self.me = me
            self.sub_title = f"{me['name']} ({me['role']})"
            labels = ["workspace", "owner"] if self.admin else ["workspace"]
            table.set_columns([*labels, "state", "image", "cpu/mem", "url"])
            self.refresh_bindings()  # the users view is for admins only
        self.rows = {str(ws["ref"]): ws for ws in rows}
        table.fill([(ref, self._cells(ws)) for ref, ws in self.rows.items()])
        self.query_one("#empty", Static).update(
            "" if self.rows else "no workspaces yet: `den new NAME` makes one"
        )

    def _cells(self, ws: dict[str, Any]) -> list[str]:
        state = ws["state"] + (f" ({ws['state_reason']})" if ws.get("state_reason") else "")
        head = [ws["name"], ws["owner"]] if self.admin else [ws["name"]]
        return [*head, state, ws["image"], _resources(ws), cell(ws.get("url"))]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "users":
            return self.admin
        return True

    @property
    def selected(self) -> dict[str, Any] | None:
        ref = self.query_one(Table).selected
        ws = self.rows.get(ref) if ref is not None else None
        if ws is None:
            self.app.notify("no workspace selected", severity="warning")
        return ws

    def action_power(self, verb: str) -> None:
        ws = self.selected
        if ws is not None:
            done = {"stop": "stopped", "start": "started"}.get(verb, f"{verb}d")
            self.call(f"workspace.{verb}", {"ref": ws["ref"]}, f"{ws['ref']} {done}")

    def action_delete(self) -> None:
        ws = self.selected
        if ws is None:
            return
        ref = str(ws["ref"])

        def answered(yes: bool | None) -> None:
            if yes:
                self.call("workspace.delete", {"ref": ref}, f"{ref} deleted")

        self.app.push_screen(Confirm(f"Delete workspace {ref} and its files?"), answered)

    def action_changes(self) -> None:
        ws = self.selected
        if ws is not None:
            self.app.push_screen(ChangesScreen(self.api, self.interval, str(ws["ref"])))

    def action_sessions(self) -> None:
        self.app.push_screen(SessionsScreen(self.api, self.interval))

    def action_users(self) -> None:
        if self.admin:
            self.app.push_screen(users_screen(self.api, self.interval))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_shell()  # enter on a row: a shell in it

    def action_shell(self) -> None:
        ws = self.selected
        if ws is not None and self.me is not None:
            self._shell(str(ws["owner"]), str(ws["name"]))

    @work(thread=True, group="action")
    def _shell(self, owner: str, name: str) -> None:
        try:
            self.info = self.info or self.api.call("system.info")
        except CallError as exc:
            self.app.call_from_thread(self.error, f"system.info: {exc}")
            return
        assert self.me is not None and self.info is not None
        argv = ssh_command(self.info, self.api.base.url, self.me["name"], owner, name)
        tui = self.app
        assert isinstance(tui, DenTui)
        self.app.call_from_thread(tui.hand_over, argv)
        self.poll_now()


class DenTui(App[None]):
    """den's terminal UI: a client of den's API, like the CLI."""

    TITLE = "den"
    CSS = CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    def __init__(self, api: Api, interval: float = 1.5, runner: Runner = run_foreground) -> None:
        super().__init__()
        self.api = api
        self.interval = interval
        self.runner = runner

    def get_default_screen(self) -> Workspaces:
        return Workspaces(self.api, self.interval)  # the first screen: escape never leaves it

    def on_unmount(self) -> None:
        self.api.close()

    def action_help(self) -> None:
        if isinstance(self.screen, Help):
            return
        keys = [
            (b.binding.key_display or b.binding.key, b.binding.description)
            for b in self.screen.active_bindings.values()
            if b.binding.description and b.enabled
        ]
        self.push_screen(Help(keys))

    def hand_over(self, argv: Sequence[str]) -> None:
        """Give the terminal to ``argv`` (ssh) until it exits, then take it back."""
        try:
            with self.suspend():
                outcome = self._run(argv)
        except SuspendNotSupported:
            if not self.is_headless:  # e.g. in a browser: there is no terminal to give
                self.notify("this terminal cannot be handed over to ssh", severity="error")
                return
            outcome = self._run(argv)  # headless (tests): nothing to hand over
        if outcome:
            self.notify(plain(outcome).plain, severity="warning", markup=False)

    def _run(self, argv: Sequence[str]) -> str:
        """Run ``argv``; what went wrong ('' when it exited 0).

        Nothing may escape: suspend() takes the terminal back only when its block ends normally.
        """
        try:
            rc = self.runner(argv)
        except OSError as exc:
            return f"cannot run {argv[0]}: {exc}"
        return f"{' '.join(argv)} exited with status {rc}" if rc else ""
