"""What the CLI needs to know of each registered method, and a cache of it.

The CLI is generated from the method registry; importing every service module
(and SQLAlchemy, asyncssh, ...) to learn the methods costs most of a second
per command. So the description is kept as JSON, keyed by a fingerprint of
den's source files: when any of them changes, it is built again from the
registry. Nothing here is written by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from den import __version__
from den.rpc.registry import Cli, CliArg, CliOpt

PACKAGE = Path(__file__).resolve().parent.parent
_SIMPLE = {int: "int", float: "float", str: "str", bool: "bool"}


@dataclass
class FieldSpec:
    name: str
    description: str
    required: bool
    is_list: bool
    kind: str  # int, float, str, bool, choice, map (str -> str) or json
    choices: list[str] = field(default_factory=list)
    arg: bool = False
    read_file: bool = False
    abs_path: bool = False
    flags: list[str] = field(default_factory=list)
    flag_value: Any = None


@dataclass
class MethodSpec:
    name: str
    doc: str
    summary: str
    right: str
    cli: Cli | None
    fields: list[FieldSpec] = field(default_factory=list)

    @classmethod
    def named(cls, name: str) -> MethodSpec:
        """A bare reference to a method, for a command that calls another one."""
        return cls(name=name, doc="", summary="", right="", cli=None)


def _unwrap(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            tp = args[0]
    # A validated str (a Name) is still a str: taken as JSON, "null" would turn
    # into None and mean "not given".
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _field(name: str, info: Any) -> FieldSpec:
    tp = _unwrap(info.annotation)
    is_list = get_origin(tp) is list
    inner = get_args(tp)[0] if is_list else tp
    arg = next((m for m in info.metadata if isinstance(m, CliArg)), None)
    opt = next((m for m in info.metadata if isinstance(m, CliOpt)), None)
    if inner in _SIMPLE:
        kind, choices = _SIMPLE[inner], []
    elif get_origin(inner) is Literal:
        kind, choices = "choice", [str(a) for a in get_args(inner)]
    elif get_origin(inner) is dict and get_args(inner) == (str, str):
        kind, choices = "map", []
    else:
        kind, choices = "json", []
    return FieldSpec(
        name=name,
        description=info.description or "",
        required=info.is_required(),
        is_list=is_list,
        kind=kind,
        choices=choices,
        arg=arg is not None,
        read_file=bool((arg and arg.read_file) or (opt and opt.read_file)),
        abs_path=bool(arg and getattr(arg, "abs_path", False)),
        flags=list(opt.flags) if opt and opt.flags else [],
        flag_value=opt.flag_value if opt else None,
    )


def from_registry() -> list[MethodSpec]:
    """Every method with a CLI path, described from the live registry."""
    from den.rpc.registry import REGISTRY
    from den.services import load_all

    load_all()
    out = []
    for m in sorted(REGISTRY.methods.values(), key=lambda m: m.name):
        if m.cli is None:
            continue
        out.append(
            MethodSpec(
                name=m.name,
                doc=m.doc,
                summary=m.summary,
                right=m.right.name,
                cli=m.cli,
                fields=[_field(n, info) for n, info in m.params.model_fields.items()],
            )
        )
    return out


def _fingerprint() -> str:
    """Changes whenever any source file of den changes."""
    h = hashlib.sha256(__version__.encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(PACKAGE)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _dump(specs: list[MethodSpec]) -> str:
    return json.dumps([asdict(s) for s in specs])


def _load(text: str) -> list[MethodSpec]:
    out = []
    for d in json.loads(text):
        fields = [FieldSpec(**f) for f in d.pop("fields")]
        cli = Cli(**d.pop("cli")) if d.get("cli") else None
        d.pop("cli", None)
        out.append(MethodSpec(**d, cli=cli, fields=fields))
    return out


def _cache_dirs() -> list[Path]:
    dirs = [PACKAGE / "cli" / "__pycache__"]
    xdg = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache").as_posix()
    dirs.append(Path(xdg) / "den")
    return dirs


def load() -> list[MethodSpec]:
    """The method descriptions: from the cache when it matches the source, else built."""
    name = f"cli-spec-{_fingerprint()}.json"
    for d in _cache_dirs():
        try:
            return _load((d / name).read_text())
        except (OSError, ValueError, TypeError, KeyError):
            continue
    specs = from_registry()
    text = _dump(specs)
    for d in _cache_dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob("cli-spec-*.json"):
                old.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".cli-spec-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, d / name)
            break
        except OSError:
            continue
    return specs
