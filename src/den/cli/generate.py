"""CLI commands generated from the method registry.

Each method with a :class:`den.rpc.registry.Cli` becomes a Typer command at
its path (``den user add``): positional arguments and options come from its
params model, help from its docstring and field descriptions. The SSH shell
runs the same commands.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import orjson
import typer
from pydantic.fields import FieldInfo

from den.cli import render
from den.rpc.registry import CliArg, CliOpt, Method, Registry

Invoke = Callable[[typer.Context, Method, dict[str, Any]], Any]
_SIMPLE = (int, float, str, bool)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, is optional)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _meta(info: FieldInfo, cls: type) -> Any:
    return next((m for m in info.metadata if isinstance(m, cls)), None)


def read_input(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from None


class _Field:
    """How one params field is taken from the command line."""

    def __init__(self, name: str, info: FieldInfo) -> None:
        self.name = name
        tp, _optional = _unwrap(info.annotation)
        self.is_list = get_origin(tp) is list
        inner = get_args(tp)[0] if self.is_list else tp
        self.as_json = not (inner in _SIMPLE or get_origin(inner) is Literal)
        self.arg: CliArg | None = _meta(info, CliArg)
        self.opt: CliOpt | None = _meta(info, CliOpt)
        self.read_file = bool(
            (self.arg and self.arg.read_file) or (self.opt and self.opt.read_file)
        )
        self.flag_value = self.opt.flag_value if self.opt else None
        cli_inner = str if (self.as_json or self.read_file) else inner
        help_text = (info.description or "") + (
            " (a file; - reads stdin)" if self.read_file else ""
        )
        dash = name.replace("_", "-")
        required = info.is_required()
        metavar = "FILE" if self.read_file else None
        if self.arg is not None:
            ann: Any = list[cli_inner] if self.is_list else cli_inner  # type: ignore[valid-type]
            param: Any = typer.Argument(
                help=help_text, metavar=metavar or name.upper(), show_default=False
            )
            default: Any = ... if required else None
            if not required:
                ann = ann | None
        elif self.flag_value is not None:
            flags = self.opt.flags if self.opt and self.opt.flags else (f"--{dash}",)
            ann = bool
            param = typer.Option(*flags, help=help_text)
            default = False
        elif inner is bool:
            ann = bool | None
            param = typer.Option(f"--{dash}/--no-{dash}", help=help_text, show_default=False)
            default = None
        else:
            flags = self.opt.flags if self.opt and self.opt.flags else (f"--{dash}",)
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
        if self.is_list:
            if not value:
                return ...
            return [self._one(v) for v in value]
        return self._one(value)

    def _one(self, v: Any) -> Any:
        if self.read_file:
            return read_input(v)
        if self.arg is not None and self.arg.abs_path:
            return str(Path(v).expanduser().absolute())
        if self.as_json and isinstance(v, str):
            try:
                return orjson.loads(v)
            except orjson.JSONDecodeError:
                return v
        return v


def make_command(m: Method, invoke: Invoke) -> Callable[..., Any]:
    """A Typer command function for ``m`` with a generated signature."""
    assert m.cli is not None
    cli = m.cli
    fields = [_Field(name, info) for name, info in m.params.model_fields.items()]
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

    def command(ctx: typer.Context, **kwargs: Any) -> None:
        as_json = kwargs.pop("as_json", False)
        yes = kwargs.pop("yes", False)
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
        result = invoke(ctx, m, sent)
        if cli.follow_job:
            from den.cli.jobs import follow

            result = follow(ctx, invoke, result, quiet=as_json)
        if cli.exec_output and not as_json and isinstance(result, dict):
            sys.stdout.write(result.get("stdout", ""))
            sys.stdout.flush()
            sys.stderr.write(result.get("stderr", ""))
            sys.stderr.flush()
            raise typer.Exit(int(result.get("exit_code", 1)))
        if as_json:
            render.print_json(result)
        else:
            render.print_result(result, cli.columns)
            if cli.note:
                render.err_console.print(f"[yellow]{cli.note}[/yellow]")

    command.__signature__ = inspect.Signature(sig)  # type: ignore[attr-defined]
    command.__name__ = m.name.replace(".", "_")
    command.__doc__ = f"{m.doc}\n\nRPC method: {m.name} (right: {m.right.name})"
    return command


def attach(app: typer.Typer, registry: Registry, invoke: Invoke) -> None:
    """Add a command for every method that has a CLI path."""
    groups: dict[str, typer.Typer] = {}
    for m in sorted(registry.methods.values(), key=lambda m: m.name):
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
        target.command(leaf, short_help=m.summary)(make_command(m, invoke))
