"""Printing results: Rich tables for people, JSON for scripts."""

from __future__ import annotations

import re
import sys
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Piped or redirected output keeps whole cells: Rich would cut tables to 80
# columns with an ellipsis. Messages are never hard-wrapped either.
console = Console(width=None if sys.stdout.isatty() else 4096)
err_console = Console(stderr=True, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _cell(value: Any) -> Text:
    """A table cell: plain text, so that data is never read as Rich markup."""
    return Text(_plain(value))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character replaced: names and messages may come
    from a workspace, and no escape sequence of theirs may reach the terminal."""
    return _CONTROL.sub("\ufffd", text)


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    text = printable(str(value))
    # ISO timestamps: seconds are enough on a screen.
    if len(text) >= 19 and text[4] == "-" and text[10] == "T":
        return text[:19].replace("T", " ")
    return text


def print_result(data: Any, columns: tuple[str, ...] = ()) -> None:
    if isinstance(data, list):
        if not data:
            console.print("(none)")
            return
        if all(isinstance(row, dict) for row in data):
            cols = list(columns) or list(data[0].keys())
            table = Table(show_edge=False, header_style="bold")
            for c in cols:
                table.add_column(c)
            for row in data:
                table.add_row(*(_cell(row.get(c)) for c in cols))
            console.print(table)
            return
        for row in data:
            console.print(_cell(row), markup=False, highlight=False)
        return
    if isinstance(data, dict):
        table = Table(show_header=False, show_edge=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for k, v in data.items():
            table.add_row(Text(str(k)), _cell(v))
        console.print(table)
        return
    if data is not None:
        console.print(_cell(data), markup=False, highlight=False)
