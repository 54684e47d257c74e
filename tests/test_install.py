"""The install step installs what den, its tests and its benchmarks run.

A program that is on the machine where the suite passes but that
scripts/install-deps never installs breaks `make test` on a fresh machine
(busybox once did). So: collect, from the source, every program den (src/),
the tests and the benchmarks start; find each on this machine; ask dpkg which
package ships it; and require that package to be named by install-deps for
that target (run, test or bench), to be pulled in by one that is (apt
installs Depends and Pre-Depends), or to be on every Debian system
(Essential: yes or Priority: required, what a minimal debootstrap has).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("src", "tests", "bench")
# Where programs are looked up: den and the tests run as root.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Calls whose first argument is a program (or an argv starting with one).
RUNNERS = {
    "subprocess.run",
    "subprocess.Popen",
    "subprocess.call",
    "subprocess.check_call",
    "subprocess.check_output",
    "asyncio.create_subprocess_exec",
    "proc.run",
    "pexpect.spawn",
    "pexpect.run",
    "shutil.which",
    "os.execvp",
    "os.execv",
}
WORDS = RUNNERS | {"git.run"}  # a file naming none of these runs nothing
# Wrappers that put the program in front of the argv they are given.
PREFIXED = {"git.run": "git"}  # den.storage.git.run

# Programs the scan cannot see, because their argv is put together at run
# time, they are files copied rather than run, or a shell script or the
# Makefile runs them: (program or path, target, where).
# `test_explicit_programs_are_still_used` keeps this list honest.
EXPLICIT: list[tuple[str, str, str]] = [
    # src/den/storage/images.py: _run() runs "unshare ... sh -c 'exec \"$@\"' sh
    # debootstrap ..." (argv from debootstrap.argv()) or "tar -x ...".
    ("unshare", "run", "src/den/storage/images.py"),
    ("sh", "run", "src/den/storage/images.py"),
    ("debootstrap", "run", "src/den/storage/debootstrap.py"),
    ("tar", "run", "src/den/storage/images.py"),
    # tar runs these for `image.import` of compressed tarballs (COMPRESSIONS).
    ("gzip", "run", "src/den/storage/images.py"),
    ("xz", "run", "src/den/storage/images.py"),
    ("zstd", "run", "src/den/storage/images.py"),
    ("bzip2", "run", "src/den/storage/images.py"),
    # Host files copied into bundles and images, not run on the host.
    ("/usr/bin/tini-static", "run", "src/den/backends/bundle.py"),
    ("/bin/busybox", "bench", "bench/idle.py"),
    # scripts/with-postgres (make test) finds these by glob.
    ("runuser", "test", "scripts/with-postgres"),
    ("/usr/lib/postgresql/*/bin/pg_ctl", "test", "scripts/with-postgres"),
    ("/usr/lib/postgresql/*/bin/initdb", "test", "scripts/with-postgres"),
    ("/usr/lib/postgresql/*/bin/createdb", "test", "scripts/with-postgres"),
    # scripts/fetch-test-data (make test).
    ("npm", "test", "scripts/fetch-test-data"),
    ("node", "test", "scripts/fetch-test-data"),
    # scripts/install-deps and the Makefile.
    ("dpkg-query", "run", "scripts/install-deps"),
    ("apt-get", "run", "scripts/install-deps"),
    ("bash", "run", "Makefile"),
]

KIND = {"src": "run", "tests": "test", "bench": "bench"}
# The package lists a target installs.
TARGET_LISTS = {"run": ("RUN",), "test": ("RUN", "TEST"), "bench": ("RUN", "BENCH")}


@dataclass
class Use:
    """Where a program is used: the targets and one place for each."""

    where: dict[str, str] = field(default_factory=dict)  # target -> "file:line"

    def add(self, target: str, place: str) -> None:
        self.where.setdefault(target, place)


# --- the scan -----------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


@functools.cache
def _parse(path: Path) -> tuple[str, ast.Module]:
    text = path.read_text()
    return text, ast.parse(text, str(path))


Scope = ast.Module | ast.FunctionDef | ast.AsyncFunctionDef


class Module:
    """One source file, read in one pass into what the resolver looks up."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.scope_of: dict[ast.AST, Scope] = {}  # node -> innermost function (or module)
        self.functions: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]] = {}
        self.calls: dict[str, list[ast.Call]] = {}  # last name of the callee -> calls
        self.assigned: dict[tuple[Scope, str], list[ast.expr]] = {}
        todo: list[tuple[ast.AST, Scope]] = [(self.tree, self.tree)]
        while todo:
            node, scope = todo.pop()
            self.scope_of[node] = scope
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self.functions.setdefault(node.name, []).append(node)
                scope = node
            elif isinstance(node, ast.Call):
                self.calls.setdefault(_dotted(node.func).split(".")[-1], []).append(node)
            elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        self.assigned.setdefault((scope, t.id), []).append(node.value)
            todo.extend((child, scope) for child in ast.iter_child_nodes(node))

    def all_calls(self) -> Iterator[ast.Call]:
        for calls in self.calls.values():
            yield from calls


def _programs(mod: Module, expr: ast.expr, at: ast.AST, depth: int = 0) -> set[str]:
    """The program names ``expr`` (an argv, or its first word) can start with;
    empty when it is built at run time in a way this does not follow."""
    if depth > 6:
        return set()
    if isinstance(expr, ast.Constant):
        return {expr.value} if isinstance(expr.value, str) and expr.value else set()
    if isinstance(expr, ast.List | ast.Tuple):
        return _programs(mod, expr.elts[0], at, depth + 1) if expr.elts else set()
    if isinstance(expr, ast.Starred):
        return _programs(mod, expr.value, at, depth + 1)
    if isinstance(expr, ast.Call):
        fn = _dotted(expr.func)
        if fn in ("str", "Path", "os.fspath") and expr.args:
            return _programs(mod, expr.args[0], at, depth + 1)
        out: set[str] = set()
        for f in mod.functions.get(fn.split(".")[-1], []):  # a helper returning an argv
            for node in ast.walk(f):
                if isinstance(node, ast.Return) and node.value is not None:
                    out |= _programs(mod, node.value, node, depth + 1)
        return out
    if isinstance(expr, ast.Name):
        scope = mod.scope_of[at]
        out = set()
        for scope_ in dict.fromkeys((scope, mod.tree)):  # the function's, else the module's
            for value in mod.assigned.get((scope_, expr.id), []):
                out |= _programs(mod, value, value, depth + 1)
            if out:
                return out
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
            return _from_callers(mod, scope, expr.id, depth)
    return set()


def _from_callers(
    mod: Module, fn: ast.FunctionDef | ast.AsyncFunctionDef, param: str, depth: int
) -> set[str]:
    """``param`` of a wrapper like ``def sh(*argv)``: what its callers pass."""
    positional = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]
    if positional and positional[0] in ("self", "cls"):
        positional = positional[1:]
    out: set[str] = set()
    for call in mod.calls.get(fn.name, []):
        if fn.args.vararg is not None and fn.args.vararg.arg == param:
            idx = len(positional)
        elif param in positional:
            idx = positional.index(param)
        else:
            continue
        if idx < len(call.args):
            out |= _programs(mod, call.args[idx], call, depth + 1)
        for kw in call.keywords:
            if kw.arg == param:
                out |= _programs(mod, kw.value, call, depth + 1)
    return out


def scan(root: Path = ROOT) -> dict[str, Use]:
    """Program -> where it is used, from the runner calls in src/, tests/, bench/."""
    found: dict[str, Use] = {}
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            text, tree = _parse(path)
            if not any(word in text for word in WORDS):
                continue
            mod = Module(tree)
            rel = path.relative_to(root)
            for node in sorted(mod.all_calls(), key=lambda n: n.lineno):
                if not node.args:
                    continue
                fn = _dotted(node.func)
                if fn in PREFIXED:
                    names = {PREFIXED[fn]}
                elif fn in RUNNERS:
                    names = _programs(mod, node.args[0], node)
                else:
                    continue
                for name in names:
                    found.setdefault(name, Use()).add(KIND[top], f"{rel}:{node.lineno}")
    for name, target, place in EXPLICIT:
        found.setdefault(name, Use()).add(target, place)
    return found


# --- install-deps and dpkg ------------------------------------------------------


def install_lists(text: str | None = None) -> dict[str, set[str]]:
    """RUN, TEST and BENCH: the package lists in scripts/install-deps."""
    if text is None:
        text = (ROOT / "scripts" / "install-deps").read_text()
    lists = {k: set(v.split()) for k, v in re.findall(r'^(\w+)_PKGS="([^"]*)"', text, re.M)}
    assert {"RUN", "TEST", "BENCH"} <= lists.keys(), f"install-deps lists: {sorted(lists)}"
    return lists


def locate(name: str) -> Path | None:
    """Where program or file ``name`` is on this machine."""
    if name.startswith("/"):
        hits = sorted(Path("/").glob(name[1:]))
        return hits[-1] if hits else None
    found = shutil.which(name, path=PATH)
    return Path(found) if found else None


def _candidates(path: Path) -> list[str]:
    """``path`` as dpkg may have recorded it: as given, resolved, and on the
    other side of the merged /usr (dpkg lists /bin/x for what /usr/bin/x is)."""
    out: list[str] = []
    for p in (str(path), os.path.realpath(path)):
        for q in (p, p.removeprefix("/usr") if p.startswith("/usr/") else "/usr" + p):
            if q not in out:
                out.append(q)
    return out


_OWNER: dict[Path, str | None] = {}  # dpkg -S reads every file list: once per path


def owners(paths: Iterable[Path]) -> dict[Path, str]:
    """The package that ships each path (one dpkg -S call for the new ones)."""
    cands = {p: _candidates(p) for p in paths if p not in _OWNER}
    every = sorted({c for cs in cands.values() for c in cs})
    res = subprocess.run(["dpkg", "-S", *every], capture_output=True, text=True, check=False)
    by_file: dict[str, str] = {}
    for line in res.stdout.splitlines() if every else []:
        if line.startswith("diversion by") or ": " not in line:
            continue
        pkgs, _, file = line.partition(": ")
        by_file[file.strip()] = pkgs.split(",")[0].strip().split(":")[0]
    for p, cs in cands.items():
        _OWNER[p] = next((by_file[c] for c in cs if c in by_file), None)
    return {p: pkg for p, pkg in _OWNER.items() if pkg is not None}


@dataclass
class Installed:
    """What dpkg knows of the installed packages that matters here."""

    base: set[str]  # Essential: yes or Priority: required
    deps: dict[str, list[list[str]]]  # package -> Depends + Pre-Depends (alternatives)
    provides: dict[str, set[str]]  # virtual name -> installed packages providing it


def installed() -> Installed:
    fmt = r"${Package}\t${Status}\t${Essential}\t${Priority}\t${Depends}, ${Pre-Depends}\t${Provides}\n"
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True, check=True
    ).stdout
    inst = Installed(set(), {}, {})
    for line in out.splitlines():
        pkg, status, essential, priority, deps, provides = line.split("\t")
        if not status.endswith(" installed"):
            continue
        if essential == "yes" or priority == "required":
            inst.base.add(pkg)
        inst.deps[pkg] = [
            [re.split(r"[\s:(]", alt.strip())[0] for alt in group.split("|")]
            for group in deps.split(",")
            if group.strip()
        ]
        for prov in provides.split(","):
            if prov.strip():
                inst.provides.setdefault(re.split(r"[\s(]", prov.strip())[0], set()).add(pkg)
    return inst


def pulled_in(named: set[str], inst: Installed) -> set[str]:
    """``named`` and everything apt installs with them (Depends, Pre-Depends)."""
    seen: set[str] = set()
    todo = list(named)
    while todo:
        pkg = todo.pop()
        real = {pkg} if pkg in inst.deps else inst.provides.get(pkg, set())
        for r in real - seen:
            seen.add(r)
            for group in inst.deps[r]:
                todo.extend(alt for alt in group if alt not in seen)
    return seen


def problems(found: dict[str, Use], lists: dict[str, set[str]], inst: Installed) -> list[str]:
    """Every program used for a target whose package that target does not install."""
    located = {name: locate(name) for name in found}
    pkg_of = owners(p for p in located.values() if p is not None and not p.is_relative_to(ROOT))
    covers = {
        target: pulled_in(set().union(*(lists[k] for k in keys)), inst) | inst.base
        for target, keys in TARGET_LISTS.items()
    }
    out = []
    for name, use in sorted(found.items()):
        path = located[name]
        places = ", ".join(f"{t} ({p})" for t, p in sorted(use.where.items()))
        if path is None:
            out.append(f"{name}: not found on this machine (PATH={PATH}); used by {places}")
            continue
        if path.is_relative_to(ROOT):  # den's own (.venv/bin/den)
            continue
        pkg = pkg_of.get(path)
        if pkg is None:
            out.append(f"{name}: {path} belongs to no Debian package; used by {places}")
            continue
        for target, place in sorted(use.where.items()):
            if pkg not in covers[target]:
                lists_ = "+".join(TARGET_LISTS[target])
                out.append(
                    f"{name} ({path}, package {pkg}) is used by {place} ({target}) but "
                    f"scripts/install-deps does not install it: add {pkg} to its {lists_} lists"
                )
    return out


# --- the tests --------------------------------------------------------------------


@pytest.fixture(scope="module")
def found() -> dict[str, Use]:
    return scan()


@pytest.fixture(scope="module")
def inst() -> Installed:
    return installed()


def _for(found: dict[str, Use], target: str) -> dict[str, Use]:
    """The programs used for ``target``, with only that use."""
    return {n: Use({target: u.where[target]}) for n, u in found.items() if target in u.where}


@pytest.mark.parametrize("target", ["run", "test"])
def test_every_program_comes_from_an_installed_package(
    found: dict[str, Use], inst: Installed, target: str
) -> None:
    # The scan itself must see the programs it is known to use, or it is blind.
    for name in ("git", "ssh", "ssh-keygen", "btrfs", "mount", "ip", "nft", "useradd", "crun"):
        assert name in found, f"the scan no longer finds {name}"
    assert "bench" in found["ssh"].where and "test" in found["ssh"].where
    assert problems(_for(found, target), install_lists(), inst) == []


def test_every_benchmark_program_comes_from_an_installed_package(
    found: dict[str, Use], inst: Installed
) -> None:
    """As above for `make bench`; CI installs its packages (.ci/run), a
    developer's machine may not have them yet."""
    bench = _for(found, "bench")
    absent = sorted(n for n in bench if locate(n) is None)
    if absent and os.environ.get("CI") != "true":
        pytest.skip(f"not installed: {absent}; run scripts/install-deps bench")
    assert problems(bench, install_lists(), inst) == []


def test_a_missing_package_is_caught(found: dict[str, Use], inst: Installed) -> None:
    """The check would have caught busybox: drop busybox-static from the lists
    and the test image's /bin/busybox is reported, naming the package."""
    lists = install_lists()
    assert "busybox-static" in lists["TEST"]
    without = {k: v - {"busybox-static"} for k, v in lists.items()}
    msgs = problems(found, without, inst)
    assert any(m.startswith("/bin/busybox") and "busybox-static" in m for m in msgs), msgs
    # A program that exists nowhere is reported as such, not skipped.
    ghost = {"den-no-such-program": Use({"test": "tests/x.py:1"})}
    (msg,) = problems(ghost, lists, inst)
    assert "not found on this machine" in msg


def test_explicit_programs_are_still_used() -> None:
    """Each hand-listed program still occurs in the file it is listed for."""
    for name, _, place in EXPLICIT:
        text = (ROOT / place).read_text()
        word = name.rsplit("/", 1)[-1]
        assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text), (name, place)


def test_den_init_names_the_packages_install_deps_installs(inst: Installed) -> None:
    """`den init` installs checks.TOOLS/MODULES' packages itself: the names must
    be real packages that ship the tool, and `make run` must install them too."""
    from den.host.checks import MODULES, TOOLS

    run = pulled_in(install_lists()["RUN"], inst) | inst.base
    paths = {tool: locate(tool) for tool in TOOLS}
    missing = [t for t, p in paths.items() if p is None]
    assert not missing, f"tools den checks for are not installed: {missing}"
    pkg_of = owners(p for p in paths.values() if p is not None)
    for tool, pkg in TOOLS.items():
        path = paths[tool]
        assert path is not None
        assert pkg_of.get(path) == pkg, f"checks.TOOLS says {tool} is in {pkg}: {pkg_of.get(path)}"
        assert pkg in run, f"{pkg} ({tool}) is not installed by `scripts/install-deps run`"
    for mod, pkg in MODULES.items():
        spec = importlib.util.find_spec(mod)
        assert spec is not None and spec.origin is not None, f"python module {mod} missing"
        assert owners([Path(spec.origin)]).get(Path(spec.origin)) == pkg, (mod, pkg)
        assert pkg in run, f"{pkg} (python {mod}) is not installed by `scripts/install-deps run`"


def _imports(paths: Iterable[Path]) -> set[str]:
    out: set[str] = set()
    for path in paths:
        for node in ast.walk(_parse(path)[1]):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module.split(".")[0])
    return out


def test_python_imports_come_from_the_lock_file_or_install_deps(inst: Installed) -> None:
    """Every third-party module src/, tests/ and bench/ import is pinned in
    requirements.lock, or ships in a Debian package install-deps names."""
    files = [p for top in SCANNED for p in (ROOT / top).rglob("*.py")]
    local = {"den", "tests", "bench"} | {p.stem for p in (ROOT / "bench").glob("*.py")}
    third = sorted(_imports(files) - set(sys.stdlib_module_names) - local - {"__future__"})

    def norm(name: str) -> str:  # a distribution's name as PEP 503 compares them
        return re.sub(r"[-_.]+", "-", name).lower()

    locked = {
        norm(m.group(1))
        for m in re.finditer(
            r"^([A-Za-z0-9_.-]+)==", (ROOT / "requirements.lock").read_text(), re.M
        )
    }
    dists = importlib.metadata.packages_distributions()
    lists = install_lists()
    debian = pulled_in(lists["RUN"] | lists["TEST"] | lists["BENCH"], inst) | inst.base
    origins = {}
    for mod in third:
        names = {norm(d) for d in dists.get(mod, [])}
        if not names & locked:
            spec = importlib.util.find_spec(mod)
            origins[mod] = Path(spec.origin) if spec is not None and spec.origin else None
    pkg_of = owners(p for p in origins.values() if p is not None)
    bad = [
        f"{mod} (file {origin}, package {pkg_of.get(origin) if origin else None})"
        for mod, origin in origins.items()
        if origin is None or pkg_of.get(origin) not in debian
    ]
    assert not bad, f"imported but neither locked nor installed by install-deps: {bad}"


def test_the_editable_install_finds_its_build_tools(inst: Installed) -> None:
    """install-deps runs `pip install --no-build-isolation -e .`: pyproject's
    build requirements and wheel (setuptools' bdist_wheel) come from the venv
    (which `python3 -m venv` fills from /usr/share/python-wheels) or the system
    site-packages, so from Debian packages install-deps must name."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = [re.split(r"[<>=!~\[ ;]", r)[0] for r in pyproject["build-system"]["requires"]]
    run = pulled_in(install_lists()["RUN"], inst) | inst.base
    venv = Path(sys.prefix)
    for name in [*needed, "wheel"]:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, f"{name} is not importable"
        origin = Path(spec.origin)
        if origin.is_relative_to(venv):  # put there by ensurepip from a bundled wheel
            wheels = sorted(Path("/usr/share/python-wheels").glob(f"{name}-*.whl"))
            assert wheels, f"{name} is in {venv} but not from /usr/share/python-wheels"
            origin = wheels[-1]
        pkg = owners([origin]).get(origin)
        assert pkg in run, f"{name} ({origin}) is from {pkg}, which install-deps run does not name"
