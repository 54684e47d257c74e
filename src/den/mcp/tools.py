"""MCP tools: the method registry as the caller may call it, plus file tools.

Who calls is a :class:`den.rpc.registry.Caller` the transport established for
each request (den.mcp.http); a handler reads it with :func:`caller_of`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import mcp_types as types
import orjson
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPError
from pydantic import Field, ValidationError

from den import __version__
from den.errors import DenError, InvalidParams, MethodNotFound
from den.rpc import acl
from den.rpc.registry import REGISTRY, Caller, Method, Params, check_right, validation_errors

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
# Where the transport puts the request's caller in the ASGI scope.
CALLER_KEY = "den.caller"
EXEC_STREAM = "workspace.exec_stream"
READ_FILE = "workspace.read_file"
WRITE_FILE = "workspace.write_file"

# The file tools run these inside the workspace, as its user: den never reads or
# writes a workspace's files on the host. The size is checked before a byte is read.
_READ_SH = (
    '[ -f "$1" ] || { echo "no regular file $1" >&2; exit 2; }; '
    'n=$(wc -c < "$1") || exit 2; '
    '[ "$n" -le "$2" ] || { echo "$n" >&2; exit 3; }; '
    'exec cat -- "$1"'
)
_WRITE_SH = 'exec cat > "$1"'


class FileRef(Params):
    ref: str = Field(max_length=80, description="NAME or OWNER/NAME.")
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="The file's path inside the workspace (relative: to the user's home).",
    )
    user: str = Field(
        "",
        max_length=64,
        description="User inside the workspace (default: the owner's account; root: root).",
    )


class WriteFile(FileRef):
    content: str = Field(description="The file's whole new content (UTF-8 text).")


def caller_of(ctx: ServerRequestContext[Any, Any], fixed: Caller | None) -> Caller:
    if fixed is not None:
        return fixed
    request = ctx.request
    caller = request.scope.get(CALLER_KEY) if request is not None else None
    if not isinstance(caller, Caller):  # the transport always sets it: a bug if not
        raise MCPError(types.INTERNAL_ERROR, "no caller for this request")
    return caller


def may_call(caller: Caller, m: Method) -> bool:
    """The registry's own rule (check_right), asked without calling: a tool the
    caller can never call is not listed."""
    try:
        check_right(caller, m)
    except DenError:
        return False
    return True


def _tool(name: str, doc: str, params: type[Params], read_only: bool) -> types.Tool:
    schema = params.model_json_schema()
    if name == EXEC_STREAM:  # MCP's own form of it takes stdin too (den.mcp.execs)
        from den.mcp.execs import STDIN_SCHEMA

        schema["properties"]["stdin"] = STDIN_SCHEMA
    return types.Tool(
        name=name,
        description=doc,
        input_schema=schema,
        annotations=types.ToolAnnotations(read_only_hint=read_only),
    )


def _doc(m: Method) -> str:
    if m.name == EXEC_STREAM:  # its registry text describes the websocket
        from den.mcp.execs import DESCRIPTION

        return DESCRIPTION
    return m.doc


async def list_tools(app: App, caller: Caller) -> list[types.Tool]:
    # The node ACL's decision too (net.*, vol.*): a tool it would refuse is not listed.
    snap = await acl.snapshot(app)
    out = [
        _tool(m.name, f"{_doc(m)}\n\nRequired right: {m.right.name}.", m.params, not m.mutating)
        for m in sorted(REGISTRY.methods.values(), key=lambda m: m.name)
        if may_call(caller, m) and acl.permits(snap, caller, m)
    ]
    # The file tools ride workspace.exec: listed to whoever may call it.
    exec_m = REGISTRY.methods.get("workspace.exec")
    if exec_m is not None and may_call(caller, exec_m):
        out.append(
            _tool(
                READ_FILE,
                "Read a UTF-8 text file inside a workspace (run as `cat` in it, as its "
                "user). At most exec_max_output bytes; larger files: workspace.exec_stream.",
                FileRef,
                True,
            )
        )
        out.append(
            _tool(
                WRITE_FILE,
                "Write (create or replace) a UTF-8 text file inside a workspace (run in "
                "it, as its user, with the content on standard input). At most the "
                "server's max_body_bytes.",
                WriteFile,
                False,
            )
        )
    return out


def _text(data: Any) -> str:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


def result(data: Any) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=_text(data))],
        structured_content=data if isinstance(data, dict) else None,
    )


def error_result(err: DenError) -> types.CallToolResult:
    """A refusal or failure as the tool's result (is_error), the JSON-RPC error
    object den would answer on /rpc as its structured content."""
    error = err.to_error()
    text = f"error {err.code}: {err}"
    return types.CallToolResult(
        content=[types.TextContent(text=text)],
        structured_content={"error": error},
        is_error=True,
    )


def _parse(model: type[Params], args: dict[str, Any] | None) -> Any:
    try:
        return model.model_validate(args or {})
    except ValidationError as exc:
        raise InvalidParams(validation_errors(exc)) from None


async def _exec(app: App, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
    out = await REGISTRY.call(app, caller, "workspace.exec", params)
    assert isinstance(out, dict)
    return out


async def read_file(app: App, caller: Caller, args: dict[str, Any] | None) -> dict[str, Any]:
    p: FileRef = _parse(FileRef, args)
    limit = app.settings.exec_max_output
    out = await _exec(
        app,
        caller,
        {"ref": p.ref, "argv": ["sh", "-c", _READ_SH, "sh", p.path, str(limit)], "user": p.user},
    )
    if out["exit_code"] == 3:
        size = out["stderr"].strip()
        raise InvalidParams(
            f"{p.path} is {size} bytes; {READ_FILE} returns at most {limit} bytes "
            "(exec_max_output): read it with workspace.exec_stream",
            field="path",
        )
    if out["exit_code"] != 0:
        raise InvalidParams(f"cannot read {p.path}: {out['stderr'].strip()[:500]}", field="path")
    if out["truncated"]:  # it grew past the limit while read
        raise InvalidParams(f"{p.path} grew past {limit} bytes while read", field="path")
    return {"path": p.path, "content": out["stdout"]}


async def write_file(app: App, caller: Caller, args: dict[str, Any] | None) -> dict[str, Any]:
    p: WriteFile = _parse(WriteFile, args)
    size = len(p.content.encode())
    limit = app.settings.max_body_bytes
    if size > limit:
        raise InvalidParams(
            f"{size} bytes; {WRITE_FILE} takes at most {limit} bytes (max_body_bytes)",
            field="content",
        )
    out = await _exec(
        app,
        caller,
        {
            "ref": p.ref,
            "argv": ["sh", "-c", _WRITE_SH, "sh", p.path],
            "stdin": p.content,
            "user": p.user,
        },
    )
    if out["exit_code"] != 0:
        raise InvalidParams(f"cannot write {p.path}: {out['stderr'].strip()[:500]}", field="path")
    return {"path": p.path, "bytes": size}


def build_server(app: App, fixed: Caller | None = None) -> Server[Any]:
    """The MCP server; ``fixed``: the caller of every request (a connection whose
    caller cannot change), else each request's own from the transport."""

    async def on_list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=await list_tools(app, caller_of(ctx, fixed)))

    async def on_call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        caller = caller_of(ctx, fixed)
        name, args = params.name, params.arguments
        try:
            if name == READ_FILE:
                return result(await read_file(app, caller, args))
            if name == WRITE_FILE:
                return result(await write_file(app, caller, args))
            if name == EXEC_STREAM:
                from den.mcp.execs import exec_stream

                return result(await exec_stream(app, caller, ctx, args))
            return result(await REGISTRY.call(app, caller, name, args))
        except MethodNotFound:
            # An unknown tool is a protocol error (the spec's -32602), not a result.
            raise MCPError(types.INVALID_PARAMS, f"unknown tool {name[:200]!r}") from None
        except DenError as err:
            return error_result(err)

    return Server(
        "den",
        version=__version__,
        instructions=(
            "den: isolated workspaces. Tools are den's API methods (workspace.create, "
            "workspace.exec, ...); workspace.exec_stream reports output as progress."
        ),
        on_list_tools=on_list_tools,
        on_call_tool=on_call_tool,
    )
