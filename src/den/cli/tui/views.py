"""Screens of ``den tui``: a live table polled from one method, and its dialogs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Static
from textual.worker import get_current_worker

from den.cli.render import printable
from den.cli.tui.api import Api, CallError

Column = tuple[str, Callable[[dict[str, Any]], object]]


def plain(text: str) -> Text:
    """den's data as text: never markup, and no control character reaches the terminal
    (Textual writes a cell's text as it is: an escape sequence in a display name, an ssh
    client's version or a branch name a workspace chose would act there)."""
    return Text(printable(text))


def cell(value: object) -> str:
    """One value as the table shows it."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if len(text) >= 19 and text[4:5] == "-" and text[10:11] == "T":
        return text[:19].replace("T", " ")  # an ISO time, to the second
    return text


def field(name: str) -> Callable[[dict[str, Any]], object]:
    return lambda row: row.get(name)


class Table(DataTable[Text]):
    """A table refreshed in place: rows keyed, the cursor stays on its row."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.cells: dict[str, list[str]] = {}

    def set_columns(self, labels: Sequence[str]) -> None:
        self.clear(columns=True)
        self.cells = {}
        for label in labels:
            self.add_column(label, key=label)

    @property
    def selected(self) -> str | None:
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        return str(key) if key is not None else None

    def fill(self, rows: Sequence[tuple[str, list[str]]]) -> None:
        labels = [str(c.key.value) for c in self.columns.values()]
        keys = [k for k, _ in rows]
        if keys == list(self.cells):
            for key, values in rows:
                for label, old, new in zip(labels, self.cells[key], values, strict=True):
                    if old != new:
                        self.update_cell(key, label, plain(new), update_width=True)
                self.cells[key] = values
            return
        selected = self.selected
        self.clear()
        self.cells = {}
        for key, values in rows:
            self.add_row(*(plain(v) for v in values), key=key)
            self.cells[key] = values
        if selected in keys:
            self.move_cursor(row=keys.index(selected))


class Polled(Screen[None]):
    """A screen whose table a worker thread refreshes every ``interval`` seconds."""

    def __init__(self, api: Api, interval: float) -> None:
        super().__init__()
        self.api = api
        self.interval = interval
        self._wake = threading.Event()
        self._gone = False

    def fetch(self) -> Any:
        """Read the data (in the worker thread)."""
        raise NotImplementedError

    def show(self, data: Any) -> None:
        """Put the data on screen (in the UI thread)."""
        raise NotImplementedError

    def on_mount(self) -> None:
        self._poll()

    def on_unmount(self) -> None:
        self._gone = True
        self._wake.set()  # the worker is cancelled: let it see that now, not after its wait

    def _deliver(self, data: Any) -> None:
        # A list may arrive just after the screen was closed (escape while den answered),
        # when its widgets are being removed: nothing to show it on.
        if self._gone:
            return
        try:
            self.show(data)
        except NoMatches:
            return

    def poll_now(self) -> None:
        self._wake.set()

    def error(self, message: str) -> None:
        self.app.notify(plain(message).plain, severity="error", markup=False)

    @work(thread=True, exclusive=True, group="poll")
    def _poll(self) -> None:
        worker = get_current_worker()
        last_error = ""
        while not worker.is_cancelled:
            try:
                data, problem = self.fetch(), ""
            except CallError as exc:
                data, problem = None, str(exc)
            if worker.is_cancelled:
                return
            try:
                if not problem:
                    self.app.call_from_thread(self._deliver, data)
                elif problem != last_error:  # once per new problem, not every poll
                    self.app.call_from_thread(self.error, problem)
            except RuntimeError:  # the app has ended meanwhile
                return
            last_error = problem
            self._wake.wait(self.interval)
            self._wake.clear()

    def call(self, method: str, params: dict[str, Any], done: str) -> None:
        """Call a method in a worker thread; say ``done`` or the error, then refresh."""
        self._call(method, params, done)

    @work(thread=True, group="action")
    def _call(self, method: str, params: dict[str, Any], done: str) -> None:
        try:
            self.api.call(method, params)
        except CallError as exc:
            self.app.call_from_thread(self.error, f"{method}: {exc}")
        else:
            self.app.call_from_thread(self.app.notify, plain(done).plain, markup=False)
        self.poll_now()


class ListScreen(Polled):
    """The rows one method returns, as a live table; escape goes back."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(
        self,
        api: Api,
        interval: float,
        title: str,
        method: str,
        params: dict[str, Any],
        columns: Sequence[Column],
        key: str,
        empty: str = "nothing to show",
    ) -> None:
        super().__init__(api, interval)
        self.title = title
        self.method = method
        self.params = params
        self.columns = columns
        self.key = key
        self.empty = empty
        self.rows: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Table(id="rows")
        yield Static("", id="empty")
        yield Footer()

    def on_mount(self) -> None:
        # No super(): Textual calls every class's handler, Polled's (the poller) after this one.
        self.query_one(Table).set_columns([label for label, _ in self.columns])

    def fetch(self) -> Any:
        return self.api.call(self.method, self.params)

    def show(self, data: Any) -> None:
        self.rows = {str(r[self.key]): r for r in data}
        self.query_one(Table).fill(
            [(k, [cell(get(r)) for _, get in self.columns]) for k, r in self.rows.items()]
        )
        self.query_one("#empty", Static).update("" if self.rows else self.empty)

    @property
    def selected(self) -> dict[str, Any] | None:
        key = self.query_one(Table).selected
        return self.rows.get(key) if key is not None else None


class SessionsScreen(ListScreen):
    """Live sessions (``session.list``); k ends the selected one (``session.kill``)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("k", "kill", "Kill session")]

    def __init__(self, api: Api, interval: float) -> None:
        columns: list[Column] = [
            (c, field(c))
            for c in ("id", "user", "workspace", "kind", "client", "started_at", "requests")
        ]
        super().__init__(
            api, interval, "Sessions", "session.list", {}, columns, "id", "no live sessions"
        )

    def action_kill(self) -> None:
        s = self.selected
        if s is None:
            return
        sid = str(s["id"])

        def answered(yes: bool | None) -> None:
            if yes:
                self.call("session.kill", {"id": sid}, f"session {sid} ended")

        self.app.push_screen(
            Confirm(f"End session {sid} ({s['user']} on {s['workspace']})?"), answered
        )


class ChangesScreen(ListScreen):
    """A workspace's repos with work not pushed (``code.changes``); p pushes (``code.push``)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("p", "push", "Push")]

    def __init__(self, api: Api, interval: float, ref: str) -> None:
        columns: list[Column] = [
            (c, field(c)) for c in ("path", "branch", "upstream", "dirty", "unpushed", "problem")
        ]
        super().__init__(
            api,
            max(interval, 5.0),  # each read snapshots the workspace's /code: not every second
            f"Code changes of {ref}",
            "code.changes",
            {"workspace": ref},
            columns,
            "path",
            "no uncommitted or unpushed work in /code",
        )
        self.ref = ref

    def action_push(self) -> None:
        row = self.selected
        repo = str(row["path"]) if row else ""

        def answered(values: dict[str, str] | None) -> None:
            if values is None:
                return
            params: dict[str, Any] = {"workspace": self.ref, "message": values["message"]}
            if values["repo"]:
                params["repo"] = values["repo"]
            self.call("code.push", params, f"pushed {values['repo'] or 'the changes'}")

        self.app.push_screen(
            Prompt(
                f"Commit and push from {self.ref}",
                [
                    ("repo", "repo in /code (empty: the one with changes)", repo),
                    ("message", "commit message", ""),
                ],
            ),
            answered,
        )


def users_screen(api: Api, interval: float) -> ListScreen:
    columns: list[Column] = [
        (c, field(c)) for c in ("name", "role", "display_name", "account", "keys", "created_at")
    ]
    return ListScreen(api, interval, "Users", "user.list", {}, columns, "name", "no users")


class Confirm(ModalScreen[bool]):
    """A yes/no question; y or n answers, escape is no."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(plain(self.question))
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class Prompt(ModalScreen[dict[str, str] | None]):
    """A small form: one input per field; enter on the last one submits, escape cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, fields: Sequence[tuple[str, str, str]]) -> None:
        super().__init__()
        self.heading = title
        self.fields = fields

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(plain(self.heading))
            for name, placeholder, value in self.fields:
                yield Input(value=plain(value).plain, placeholder=placeholder, id=name)
            with Horizontal(classes="buttons"):
                yield Button("OK", id="ok", variant="primary")
                yield Button("Cancel", id="cancel")

    def values(self) -> dict[str, str]:
        return {name: self.query_one(f"#{name}", Input).value.strip() for name, _, _ in self.fields}

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == self.fields[-1][0]:
            self.dismiss(self.values())
        else:
            self.focus_next()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.values() if event.button.id == "ok" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Help(ModalScreen[None]):
    """The keys of the screen below; any key closes it."""

    def __init__(self, keys: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        lines = [f"{key:>8}  {what}" for key, what in self.keys]
        with Vertical(classes="dialog"):
            yield Label("den tui: keys (any key closes)")
            yield Static(Text("\n".join(lines)))

    def on_key(self) -> None:
        self.dismiss(None)
