"""CLI commands generated from the method registry.

Each method with a :class:`den.rpc.registry.Cli` becomes a Typer command at
its path (``den user add``): positional arguments and options come from its
params model, help from its docstring and field descriptions. The SSH shell
runs the same commands.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import typer

from den.cli import render, spec
from den.cli.spec import FieldSpec, MethodSpec

Invoke = Callable[[typer.Context, MethodSpec, dict[str, Any]], Any]
_SIMPLE = (int, float, str, bool)
# Values a user field may never take: a shell's or a JSON habit for "nothing".
NULL_LIKE = frozenset({"", "null", "none", "nil"})
INT64 = (-(1 << 63), (1 << 63) - 1)


def read_input(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from None


class _Field:
    """How one params field is taken from the command line."""

    def __init__(self, f: FieldSpec) -> None:
        self.name = name = f.name
        self.is_list = f.is_list
        self.as_json = f.kind == "json"
        self.kind = f.kind
        self.arg = f.arg
        self.abs_path = f.abs_path
        self.read_file = f.read_file
        self.flag_value = f.flag_value
        inner: Any = {"int": int, "float": float, "bool": bool}.get(f.kind, str)
        if f.kind == "choice":
            inner = Literal.__getitem__(tuple(f.choices))
        cli_inner = str if (self.as_json or self.read_file or f.kind == "map") else inner
        help_text = f.description + (" (a file; - reads stdin)" if self.read_file else "")
        self.dash = dash = name.replace("_", "-")
        required = f.required
        metavar = "FILE" if self.read_file else None
        flags = tuple(f.flags) or (f"--{dash}",)
        if self.arg:
            ann: Any = list[cli_inner] if self.is_list else cli_inner  # type: ignore[valid-type]
            param: Any = typer.Argument(
                help=help_text, metavar=metavar or name.upper(), show_default=False
            )
            default: Any = ... if required else None
            if not required:
                ann = ann | None
        elif self.flag_value is not None:
            ann = bool
            param = typer.Option(*flags, help=help_text)
            default = False
        elif f.kind == "map":
            # Repeatable: --env A=1 --env B=2, or a JSON object, or both.
            ann = list[str] | None
            param = typer.Option(
                *flags,
                help=help_text + " KEY=VALUE (repeat) or a JSON object.",
                metavar="KEY=VALUE",
            )
            default = None
        elif f.kind == "bool":
            ann = bool | None
            param = typer.Option(f"--{dash}/--no-{dash}", help=help_text, show_default=False)
            default = None
        else:
            ann = list[cli_inner] | None if self.is_list else cli_inner | None  # type: ignore[valid-type]
            param = typer.Option(*flags, help=help_text, metavar=metavar, show_default=False)
            default = ... if required else None
        self.parameter = inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[ann, param], default=default
        )

    def convert(self, value: Any) -> Any:
        """The value to send, or ``...`` to send nothing."""
        if value is None or (value is False and self.flag_value is not None):
            return ...
        if self.flag_value is not None:
            return self.flag_value
        if self.kind == "map":
            return self._map(value) if value else ...
        if self.is_list:
            if not value:
                return ...
            return [self._one(v) for v in value]
        return self._one(value)

    def _map(self, values: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for v in values:
            if v.lstrip().startswith("{"):
                try:
                    obj = orjson.loads(v)
                except orjson.JSONDecodeError as exc:
                    raise typer.BadParameter(f"--{self.dash}: not a JSON object: {exc}") from None
                if not isinstance(obj, dict):
                    raise typer.BadParameter(f"--{self.dash}: not a JSON object")
                out.update(obj)
                continue
            key, eq, val = v.partition("=")
            if not eq or not key:
                raise typer.BadParameter(
                    f"--{self.dash}: {v[:40]!r} is not KEY=VALUE (nor a JSON object)"
                )
            out[key] = val
        return out

    def _one(self, v: Any) -> Any:
        if self.name == "user" and isinstance(v, str) and v.strip().lower() in NULL_LIKE:
            # Never "no user": leaving --user out is how to mean yourself.
            raise typer.BadParameter(
                f"--user: {v!r} is not a user name (leave --user out to mean yourself)"
            )
        if isinstance(v, int) and not isinstance(v, bool) and not INT64[0] <= v <= INT64[1]:
            raise typer.BadParameter(f"--{self.dash}: {v} is out of range")
        if isinstance(v, float) and not math.isfinite(v):
            raise typer.BadParameter(f"--{self.dash}: {v} is not a finite number")
        if self.read_file:
            return read_input(v)
        if self.abs_path:
            return str(Path(v).expanduser().absolute())
        if self.as_json and isinstance(v, str):
            try:
                return orjson.loads(v)
            except orjson.JSONDecodeError:
                return v
        return v


def make_command(m: MethodSpec, invoke: Invoke, local: bool = True) -> Callable[..., Any]:
    """A Typer command function for ``m`` with a generated signature.

    ``local``: the command runs on the caller's own machine (the den CLI, not
    the den shell over ssh), so ``--install`` may write the caller's files.
    """
    assert m.cli is not None
    cli = m.cli
    fields = [_Field(f) for f in m.fields]
    sig = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(f.parameter for f in fields),
        inspect.Parameter(
            "as_json",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[bool, typer.Option("--json", help="Print the result as JSON.")],
            default=False,
        ),
    ]
    if cli.confirm:
        sig.append(
            inspect.Parameter(
                "yes",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[
                    bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")
                ],
                default=False,
            )
        )

    if cli.install:
        sig.append(
            inspect.Parameter(
                "install",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[
                    bool,
                    typer.Option(
                        "--install", help=f"Write it into {cli.install} (again: replaced)."
                    ),
                ],
                default=False,
            )
        )

    def command(ctx: typer.Context, **kwargs: Any) -> None:
        as_json = kwargs.pop("as_json", False)
        yes = kwargs.pop("yes", False)
        if kwargs.pop("install", False):
            _install(ctx, **kwargs)
            return
        sent: dict[str, Any] = {}
        for f in fields:
            value = f.convert(kwargs.get(f.name))
            if value is not ...:
                sent[f.name] = value
        if cli.confirm and not yes:
            question = cli.confirm.format(**{f.name: sent.get(f.name, "") for f in fields})
            if not sys.stdin.isatty():
                raise typer.BadParameter(f"{question} Pass --yes to confirm without a terminal.")
            typer.confirm(question, abort=True)
        if cli.exec_output and not as_json and local:
            from den.cli.execstream import from_cli  # output as it comes (--json: at the end)

            raise typer.Exit(from_cli(ctx, sent))
        result = invoke(ctx, m, sent)
        if cli.follow_job:
            from den.cli.jobs import follow

            result = follow(ctx, invoke, result, quiet=as_json)
        if cli.exec_output and not as_json and isinstance(result, dict):
            sys.stdout.write(result.get("stdout", ""))
            sys.stdout.flush()
            sys.stderr.write(result.get("stderr", ""))
            if result.get("truncated"):
                sys.stderr.write(
                    "\nden: output truncated at the server's exec_max_output bytes per stream "
                    "(use ssh to stream all of it)\n"
                )
            sys.stderr.flush()
            raise typer.Exit(int(result.get("exit_code", 1)))
        if as_json:
            render.print_json(result)
        else:
            render.print_result(result, cli.columns)
            if cli.note:
                render.err_console.print(f"[yellow]{cli.note}[/yellow]")

    def _install(ctx: typer.Context, **kwargs: Any) -> None:
        from den.cli import install

        if not local:
            raise typer.BadParameter(
                f"--install writes {cli.install} on your own machine: run this command with "
                f"the den CLI there, or save this output into {cli.install} yourself"
            )
        sent = {f.name: v for f in fields if (v := f.convert(kwargs.get(f.name))) is not ...}
        path = Path(cli.install).expanduser()
        text = invoke(ctx, m, sent)
        if "identity_file" not in sent and any(f.name == "identity_file" for f in fields):
            found = install.pick_identity(str(text), path.parent)
            if found is not None:
                text = invoke(ctx, m, {**sent, "identity_file": found})
        try:
            render.console.print(install.install(path, str(text)), highlight=False)
        except ValueError as exc:
            render.err_console.print(f"error: nothing written to {path}: {exc}", highlight=False)
            raise typer.Exit(1) from None
        except OSError as exc:
            render.err_console.print(f"error: cannot write {path}: {exc}", highlight=False)
            raise typer.Exit(1) from None

    command.__signature__ = inspect.Signature(sig)  # type: ignore[attr-defined]
    command.__name__ = m.name.replace(".", "_")
    command.__doc__ = f"{m.doc}\n\nRPC method: {m.name} (right: {m.right})"
    return command


def attach(
    app: typer.Typer, invoke: Invoke, specs: list[MethodSpec] | None = None, local: bool = True
) -> None:
    """Add a command for every method that has a CLI path (from :mod:`den.cli.spec`)."""
    groups: dict[str, typer.Typer] = {}
    for m in specs if specs is not None else spec.load():
        if m.cli is None:
            continue
        *parents, leaf = m.cli.path.split()
        target = app
        path = ""
        for part in parents:
            path = f"{path} {part}".strip()
            if path not in groups:
                groups[path] = typer.Typer(
                    help=f"{part.capitalize()} commands.", no_args_is_help=True
                )
                target.add_typer(groups[path], name=part)
            target = groups[path]
        target.command(leaf, short_help=m.summary)(make_command(m, invoke, local))
