"""debootstrap: its command line, the Debian mirror, and its progress protocol.

With ``--debian-installer`` debootstrap writes machine-readable lines to file
descriptor 3 (see ``/usr/share/debootstrap/functions``)::

    P: NOW END [PHASE]    progress within a phase; PA: args, PF: printf format
    I: NAME               information; IA: args, IF: printf format
    W: NAME / E: NAME     warning / error, with WA/WF and EA/EF

Phases restart from 0, so :class:`ProgressParser` maps each onto its share
of one overall scale.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from den.errors import InvalidParams

SCRIPTS = Path("/usr/share/debootstrap/scripts")
SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
SUITE_RE = re.compile(r"[a-z][a-z0-9-]{1,30}")
VARIANTS = ("minbase", "buildd", "default")

ProgressFn = Callable[[int, int, str], None]
"""``report(now, end, step)``: overall progress and what is being done."""

# Share of the overall scale (0..1000) per phase, by the time each took here.
PHASES: dict[str, tuple[int, int]] = {
    "DOWNREL": (0, 10),
    "DOWNRELSIG": (10, 20),
    "DOWNPKGS": (20, 90),
    "SIZEDEBS": (90, 100),
    "DOWNDEBS": (100, 400),
    "EXTRACTPKGS": (400, 500),
    "INSTCORE": (500, 550),
    "UNPACKREQ": (550, 700),
    "CONFREQ": (700, 820),
    "UNPACKBASE": (820, 870),
    "CONFBASE": (870, 920),
}
SCALE = 1000


def check_suite(suite: str) -> None:
    if not SUITE_RE.fullmatch(suite):
        raise InvalidParams("a suite is a Debian release name such as bookworm", field="suite")
    if SCRIPTS.is_dir() and not (SCRIPTS / suite).exists():
        raise InvalidParams(f"debootstrap knows no suite {suite!r}", field="suite")


def check_package(name: str) -> str:
    if not PACKAGE_RE.fullmatch(name) or len(name) > 100:
        raise ValueError(
            "a Debian package name is lowercase letters, digits, '+', '-' and '.', "
            "starting with a letter or digit"
        )
    return name


def _mirror_in(text: str) -> str:
    """The first Debian archive URI of an apt sources file (deb822 or one-line)."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("deb "):
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and "security" not in parts[2]:
                    return parts[1]
                continue
            key, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "\t", "#")):
                fields[key.strip().lower()] = value.strip()
        types = fields.get("types", "").split()
        suites = fields.get("suites", "")
        if "deb" in types and "uris" in fields and "security" not in suites:
            return fields["uris"].split()[0]
    return ""


def mirror(configured: str, sources: tuple[Path, ...] = SOURCES) -> str:
    """The configured mirror, else the host's own apt mirror, else deb.debian.org."""
    if configured:
        return configured
    for path in sources:
        try:
            found = _mirror_in(path.read_text())
        except OSError:
            continue
        if found:
            return found
    return DEFAULT_MIRROR


def argv(
    target: Path,
    suite: str,
    mirror: str,
    includes: list[str],
    variant: str,
    cache_dir: Path | None = None,
) -> list[str]:
    """debootstrap's command line; with ``cache_dir`` it keeps the .debs it fetches
    there (outside the target) and takes those it finds there, checksums verified."""
    cmd = ["debootstrap", "--debian-installer"]
    if variant != "default":
        cmd.append(f"--variant={variant}")
    if cache_dir is not None:
        cmd.append(f"--cache-dir={cache_dir}")
    if includes:
        cmd.append("--include=" + ",".join(includes))
    return [*cmd, suite, str(target), mirror]


def _printf(fmt: str, args: list[str]) -> str:
    it = iter(args)
    return re.sub(r"%[sd]", lambda _m: next(it, ""), fmt).replace("%%", "%").strip()


class ProgressParser:
    """Turns debootstrap's fd-3 lines into overall progress and messages."""

    def __init__(self, report: ProgressFn) -> None:
        self.report = report
        self.phase = ""
        self.now = 0
        self.step = "starting debootstrap"
        self.error = ""
        self.warnings: list[str] = []
        # Packages fetched from the mirror and packages checked (from the cache or
        # after a download): a build with a warm cache fetches none.
        self.downloaded: set[str] = set()
        self.validated: set[str] = set()
        self._kind = ""
        self._name = ""
        self._args: list[str] = []

    def feed(self, line: str) -> None:
        tag, _, rest = line.rstrip("\n").partition(": ")
        if tag == "P":
            parts = rest.split()
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                if len(parts) > 2:
                    self.phase = parts[2]
                self._advance(int(parts[0]), int(parts[1]))
            self._kind, self._args = "P", []
        elif tag in ("I", "W", "E"):
            self._kind, self._name, self._args = tag, rest, []
        elif tag in ("PA", "IA", "WA", "EA"):
            self._args.append(rest)
        elif tag in ("PF", "IF", "WF", "EF"):
            text = _printf(rest, self._args)
            # "Retrieving NAME VERSION": a .deb (index files come without a version).
            if tag == "IF" and len(self._args) >= 2 and self._args[1]:
                if self._name == "RETRIEVING":
                    self.downloaded.add(self._args[0])
                elif self._name == "VALIDATING":
                    self.validated.add(self._args[0])
            if tag == "EF":
                self.error = text
            elif tag == "WF":
                self.warnings.append(text)
            elif text:
                self.step = text
                self.report(self.now, SCALE, text)

    def _advance(self, now: int, end: int) -> None:
        lo, hi = PHASES.get(self.phase, (self.now, self.now))
        value = lo + (hi - lo) * min(now, end) // end if end > 0 else lo
        if value > self.now:
            self.now = value
            self.report(self.now, SCALE, self.step)
