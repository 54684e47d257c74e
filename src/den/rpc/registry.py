"""The one method registry.

A method is declared once, with :meth:`Registry.method` on an async function
``fn(ctx, params) -> result``: its dotted name, the right it needs, its
parameters and result (pydantic models, taken from the type hints), its
docstring, and how it appears in the CLI. The JSON-RPC endpoint, the OpenRPC
document, the CLI and the SSH shell all read this registry.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from den.errors import (
    DenError,
    Forbidden,
    InternalError,
    InvalidParams,
    MethodNotFound,
    Unauthenticated,
)
from den.log import redact

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from den.app import App

log = logging.getLogger("den.rpc")


class Right(IntEnum):
    """What a call needs; a credential carries the most it may do."""

    public = 0
    read = 1
    write = 2
    admin = 3


@dataclass(frozen=True)
class Caller:
    """Who is calling, as established by the transport."""

    name: str
    role: str  # "admin", "member" or "anonymous"
    right: Right
    via: str  # "unix", "tcp", "ssh", "local"
    user_id: int | None = None
    token_id: str | None = None
    addr: str = ""  # the client's IP address where the transport knows it (TCP, ssh, web)
    # A workspace id: the caller is code inside that workspace (den.meta's
    # token), allowed only SCOPED_METHODS and only on that workspace.
    scope: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def authenticated(self) -> bool:
        return self.role != "anonymous"


ANONYMOUS_UNIX = Caller("anonymous", "anonymous", Right.public, "unix")
ANONYMOUS_TCP = Caller("anonymous", "anonymous", Right.public, "tcp")
ROOT = Caller("root", "admin", Right.admin, "unix")


class Params(BaseModel):
    """Base of every params model: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class NoParams(Params):
    pass


@dataclass(frozen=True)
class CliArg:
    """Marks a params field as a positional CLI argument.

    ``read_file``: the argument is a path (``-`` for stdin) whose content is sent;
    ``abs_path``: the argument is a path, sent made absolute.
    """

    read_file: bool = False
    abs_path: bool = False


@dataclass(frozen=True)
class CliOpt:
    """How a params field appears as a CLI option.

    ``flags``: option names instead of ``--field-name``; ``flag_value``: the
    option is a switch that sets this value; ``read_file``: the option takes a
    path and sends the file's content.
    """

    flags: tuple[str, ...] = ()
    flag_value: Any = None
    read_file: bool = False


@dataclass(frozen=True)
class Cli:
    """Where a method lives in the CLI (``den user add``) and how it prints."""

    path: str
    confirm: str = ""  # a question asked unless --yes
    columns: tuple[str, ...] = ()
    note: str = ""  # printed after a successful call
    exec_output: bool = False  # the result is {exit_code, stdout, stderr}: print them raw, exit so
    follow_job: bool = False  # the result is a job: follow it with a progress bar to its end
    # A file of the caller's (~/...) that ``--install`` writes the text result
    # into, as a block den replaces on the next install (den.cli.install).
    install: str = ""


class Context:
    """What a method sees: the caller, the app and a lazily opened session."""

    def __init__(self, app: App, caller: Caller, method: Method) -> None:
        self.app = app
        self.caller = caller
        self.method = method
        self.target = ""
        self._db: AsyncSession | None = None

    @property
    def db(self) -> AsyncSession:
        if self._db is None:
            self._db = self.app.sessions()
        return self._db

    def require_admin(self, what: str) -> None:
        if not self.caller.is_admin:
            raise Forbidden(f"only an admin may {what}")


MethodFn = Callable[[Context, Any], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass
class Method:
    name: str
    fn: MethodFn
    params: type[Params]
    result: Any
    right: Right
    doc: str
    mutating: bool
    cli: Cli | None
    result_adapter: TypeAdapter[Any] = field(repr=False)

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def parse(self, raw: Any) -> Params:
        if raw is None:
            raw = {}
        if isinstance(raw, list):
            names = list(self.params.model_fields)
            if len(raw) > len(names):
                raise InvalidParams(
                    f"expected at most {len(names)} positional parameters, got {len(raw)}"
                )
            raw = dict(zip(names, raw, strict=False))
        if not isinstance(raw, dict):
            raise InvalidParams("params must be an object or an array")
        try:
            return self.params.model_validate(raw)
        except ValidationError as exc:
            raise InvalidParams(validation_errors(exc)) from None


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as ``{"field", "message"}``, never echoing the input."""
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append({"field": loc, "message": msg})
    return out


class Registry:
    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}

    def method(
        self,
        name: str,
        *,
        right: Right,
        mutating: bool | None = None,
        cli: Cli | None = None,
    ) -> Callable[[F], F]:
        """Register ``fn(ctx, params) -> result`` as the method ``name``."""

        def deco(fn: F) -> F:
            if name in self.methods:
                raise RuntimeError(f"method {name} registered twice")
            hints = get_type_hints(fn)
            sig = list(inspect.signature(fn).parameters)
            if len(sig) != 2:
                raise TypeError(f"{name}: a method takes (ctx, params)")
            params = hints[sig[1]]
            if not (isinstance(params, type) and issubclass(params, Params)):
                raise TypeError(f"{name}: params must be a Params model")
            if not fn.__doc__:
                raise TypeError(f"{name}: a method needs a docstring")
            result = hints.get("return", Any)
            self.methods[name] = Method(
                name=name,
                fn=fn,
                params=params,
                result=result,
                right=right,
                doc=inspect.cleandoc(fn.__doc__),
                mutating=right >= Right.write if mutating is None else mutating,
                cli=cli,
                result_adapter=TypeAdapter(result),
            )
            return fn

        return deco

    def get(self, name: str) -> Method:
        m = self.methods.get(name)
        if m is None:
            raise MethodNotFound("Method not found", data={"method": name[:200]})
        return m

    async def call(self, app: App, caller: Caller, name: str, raw_params: Any) -> Any:
        """Authorize, validate, run, audit and commit one call; return JSON data."""
        m = self.get(name)
        start = time.perf_counter()
        ctx = Context(app, caller, m)
        params: Params | None = None
        try:
            check_right(caller, m)
            if caller.role != "admin" and m.name.startswith(("net.", "vol.")):
                from den.rpc import acl  # imports this module

                await acl.authorize(app, caller, m)  # the node ACL, read at call time
            params = m.parse(raw_params)
            result = await m.fn(ctx, params)
            data = m.result_adapter.dump_python(result, mode="json")
            if m.mutating:
                ctx.db.add(app.audit_event(ctx, params, raw_params, "ok", "", start))
            if ctx._db is not None:
                await ctx._db.commit()
        except DenError as exc:
            await _close(ctx)
            if m.mutating and caller.authenticated:
                await app.write_audit(ctx, params, raw_params, exc.kind, exc.message, start)
            _log_call(ctx, start, exc.kind)
            raise
        except Exception as exc:
            await _close(ctx)
            log.exception("method %s failed", name, extra={"ctx": {"user": caller.name}})
            if m.mutating and caller.authenticated:
                await app.write_audit(ctx, params, raw_params, "internal", repr(exc)[:500], start)
            raise InternalError("Internal error") from exc
        finally:
            if ctx._db is not None:
                await ctx._db.close()
        _log_call(ctx, start, "ok")
        return data


async def _close(ctx: Context) -> None:
    if ctx._db is not None:
        await ctx._db.rollback()


def _log_call(ctx: Context, start: float, outcome: str) -> None:
    seconds = time.perf_counter() - start
    ctx.app.metrics.rpc_calls.labels(ctx.method.name, outcome).inc()
    ctx.app.metrics.rpc_latency.labels(ctx.method.name).observe(seconds)
    if ctx.method.right == Right.public and outcome == "ok":
        return  # health checks and discovery would drown the log
    # An open dashboard reads its lists every second (live updates): a debug line.
    quiet = ctx.caller.via == "web" and not ctx.method.mutating and outcome == "ok"
    log.log(
        logging.DEBUG if quiet else logging.INFO,
        "call",
        extra={
            "ctx": {
                "method": ctx.method.name,
                "user": ctx.caller.name,
                "via": ctx.caller.via,
                "target": ctx.target or None,
                "outcome": outcome,
                "ms": round(seconds * 1e3, 2),
            }
        },
    )


# What a workspace-scoped caller may call: about its own workspace, never a list.
SCOPED_METHODS = frozenset(
    {
        "workspace.get",
        "workspace.exec",
        "workspace.exec_stream",
        "workspace.why",
        "workspace.busy",
        "web.port",
        "web.publish",
        "web.unpublish",
        "share.show",
        "share.set",
        "share.link",
        "share.unlink",
    }
)


def check_right(caller: Caller, m: Method) -> None:
    if m.right == Right.public:
        return
    if caller.scope is not None and m.name not in SCOPED_METHODS:
        raise Forbidden(
            f"{m.name} is not open to a workspace token; it may call only "
            + ", ".join(sorted(SCOPED_METHODS))
        )
    if m.name.startswith(("net.", "vol.")):
        from den.rpc import acl  # imports this module

        acl.check_credential(caller, m)  # the grant is checked in call(), by den.rpc.acl
        return
    if not caller.authenticated:
        raise Unauthenticated(
            f"{m.name} needs an identity: call over the unix socket as root or as a den "
            "user's account, or send 'Authorization: Bearer <token>'"
        )
    if caller.right < m.right:
        raise Forbidden(
            f"{m.name} needs the '{m.right.name}' right; your credential has '{caller.right.name}'"
        )
    if m.right == Right.admin and not caller.is_admin:
        raise Forbidden(f"{m.name} is for admins only")


def audit_params(params: Params | None, raw: Any) -> dict[str, Any]:
    """Params for the audit log, secrets removed."""
    if params is not None:
        data = params.model_dump(mode="json")
    elif isinstance(raw, dict):
        data = {str(k)[:64]: v for k, v in list(raw.items())[:50]}
    else:
        data = {}
    red = redact(data)
    return red if isinstance(red, dict) else {}


REGISTRY = Registry()
method = REGISTRY.method
