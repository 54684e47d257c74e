"""The ``den`` command: a thin client of the RPC API, plus ``serve``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.text import Text

from den.cli import init_cmd, render, top
from den.cli.client import Client, ConnectError, RpcError
from den.cli.generate import attach
from den.cli.spec import MethodSpec

app = typer.Typer(
    name="den",
    help="den: isolated, ssh-reachable workspaces for every developer and agent.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.command("init")(init_cmd.init)
app.command("top")(top.top)

# Exit codes by JSON-RPC error code, so scripts can tell failures apart.
EXIT_CODES = {-32001: 3, -32003: 4, -32006: 4, -32002: 5, -32004: 6, -32005: 7, -32602: 2}


class State:
    def __init__(
        self, socket: Path | None, url: str | None, token: str | None, instance: int | None
    ):
        self.socket = socket
        self.url = url
        self.token = token
        self.instance = instance
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            sock = self.socket
            if sock is None and not self.url:
                overrides = {"instance": self.instance} if self.instance is not None else {}
                from den import config as den_config

                settings, _ = den_config.load(overrides)
                sock = settings.socket
            self._client = Client(str(sock) if sock else None, self.url, self.token)
        return self._client


@app.callback()
def _global(
    ctx: typer.Context,
    socket: Annotated[
        Path | None, typer.Option(envvar="DEN_SOCKET", help="API unix socket.", show_envvar=True)
    ] = None,
    url: Annotated[
        str | None, typer.Option(envvar="DEN_URL", help="API base URL (instead of the socket).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="DEN_TOKEN", help="API token for --url.", show_default=False),
    ] = None,
    instance: Annotated[
        int | None, typer.Option("--instance", "-i", help="Talk to instance N.", min=0, max=99)
    ] = None,
) -> None:
    ctx.obj = State(socket, url, token, instance)


def fail(message: str, code: int = 1) -> None:
    # The message may hold user data: never read it as markup.
    render.err_console.print(Text.assemble(("error:", "red"), " ", message), highlight=False)
    raise typer.Exit(code)


def invoke(ctx: typer.Context, m: MethodSpec, params: dict[str, Any]) -> Any:
    state = ctx.find_object(State)
    assert state is not None
    if m.name == "ui.allow" and params.get("me") and not state.url:
        params = _me_over_ssh(params)
    return call(state, m.name, params)


def _me_over_ssh(params: dict[str, Any]) -> dict[str, Any]:
    """`den ui allow --me` on the unix socket, where den sees no address: the ssh
    login this CLI runs in names the client ($SSH_CONNECTION: its address first).
    Without one, --me goes as it is and the daemon asks for ADDR."""
    fields = os.environ.get("SSH_CONNECTION", "").split()
    if not fields:
        return params
    return {**{k: v for k, v in params.items() if k != "me"}, "addr": fields[0]}


def call(state: State, method: str, params: Any) -> Any:
    try:
        return state.client().call(method, params)
    except RpcError as exc:
        fail(str(exc), EXIT_CODES.get(exc.code, 1))
    except ConnectError as exc:
        fail(str(exc), 69)


@app.command()
def serve(
    instance: Annotated[
        int | None, typer.Option(help="Instance number N (ports +N).", min=0, max=99)
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Config file (default /etc/den/den.toml).")
    ] = None,
    socket: Annotated[Path | None, typer.Option("--socket", help="API unix socket.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory.")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port (0: any free port).")] = None,
    ssh_port: Annotated[
        int | None, typer.Option(help="SSH gateway port (0: any free port).")
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="Database URL.")] = None,
) -> None:
    """Run the den daemon in the foreground (SIGTERM or Ctrl-C stops it)."""
    from den import daemon

    if os.geteuid() != 0:
        fail("den serve runs as root: it manages accounts, mounts and namespaces")
    overrides = {
        "instance": instance,
        "socket": socket,
        "data_dir": data_dir,
        "http_port": http_port,
        "ssh_port": ssh_port,
        "database_url": database_url,
    }
    try:
        from den import config as den_config

        settings, _ = den_config.load(overrides, config)
        if settings.sandbox_seccomp:
            from den.backends import registry

            registry.seccomp_filter()  # a broken profile: one line here, not a traceback
    except ValueError as exc:
        fail(f"bad configuration: {exc}")
        return
    daemon.run(settings)


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    config: Annotated[Path | None, typer.Option(help="Config file to read.")] = None,
    instance: Annotated[int | None, typer.Option(help="Instance number.")] = None,
) -> None:
    """Print the effective configuration and where each value comes from."""
    try:
        from den import config as den_config

        settings, sources = den_config.load({"instance": instance}, config)
    except ValueError as exc:
        fail(f"bad configuration: {exc}")
        return
    values = settings.model_dump(mode="json")
    rows = [
        {
            "option": k,
            "value": v,
            "source": sources[k],
            "help": den_config.Settings.model_fields[k].description,
        }
        for k, v in values.items()
    ]
    if as_json:
        render.print_json(rows)
    else:
        render.print_result(rows, ("option", "value", "source"))


@app.command("tui")
def tui(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.5)] = 1.5,
) -> None:
    """An interactive terminal UI: workspaces with live state, start/stop/suspend/resume,
    a shell in one (ssh), sessions, code changes and push, users (admins). q quits, ? helps."""
    from den.cli.tui import run

    state = ctx.find_object(State)
    assert state is not None
    run(state.client(), interval)


@app.command("mcp")
def mcp(ctx: typer.Context) -> None:
    """Serve MCP (Model Context Protocol) on stdin/stdout for an agent: den's tools,
    as you (relayed to the daemon's unix socket). Over HTTP: URL/mcp with a token."""
    from den.mcp.stdio import main as mcp_main

    state = ctx.find_object(State)
    assert state is not None
    sock = state.client().socket_path
    if sock is None:
        fail("den mcp talks to the daemon's unix socket; over --url use URL/mcp with a token")
        return
    raise typer.Exit(mcp_main(sock))


@app.command("rpc")
def rpc(
    ctx: typer.Context,
    method: Annotated[str, typer.Argument(help="Method name, e.g. user.list.")],
    params: Annotated[str | None, typer.Argument(help="Params as a JSON object or array.")] = None,
) -> None:
    """Call any method with raw JSON params and print the result as JSON."""
    parsed = None
    if params is not None:
        try:
            parsed = orjson.loads(params)
        except orjson.JSONDecodeError as exc:
            fail(f"params are not valid JSON: {exc}", 2)
    render.print_json(call(ctx.obj, method, parsed))


_built = False


def build(specs: list[MethodSpec] | None = None) -> typer.Typer:
    """The whole CLI: the hand-written commands plus one per registered method."""
    global _built
    if not _built:
        attach(app, invoke, specs)
        _built = True
    return app


def for_words(words: list[str]) -> typer.Typer:
    """The CLI for one command line: the hand-written commands plus the method
    commands under the groups ``words`` name (making all 170-odd costs about as
    much as a call itself); every one when none is named, for help, suggestions
    and shell completion."""
    from den.cli import spec

    specs = spec.load()
    named = set(words)
    mine = [m for m in specs if m.cli is not None and m.cli.path.split()[0] in named]
    if not mine or any(k.endswith("_COMPLETE") for k in os.environ):
        return build(specs)
    attach(app, invoke, mine)
    return app


def main() -> None:
    try:
        for_words(sys.argv[1:])(prog_name="den")
    except KeyboardInterrupt:
        sys.exit(130)
