"""The guest's boot assets: Debian's cloud kernel and the small initramfs den builds.

Under ``DATA_DIR/microvm/`` (root only):

- ``vmlinuz``: the kernel of Debian's ``linux-image-<abi>-cloud-amd64`` package,
  fetched with ``apt-get download`` into ``cache/`` and unpacked with ``dpkg-deb -x``
  into a temporary directory: the package is never installed on the host. Stored
  decompressed (the bzImage's payload: an ELF vmlinux) when the kernel has a PVH
  entry, which QEMU's microvm boots directly; else the bzImage as it is.
- ``initrd.img``: an uncompressed newc cpio with a static busybox, the kernel
  modules a microVM needs (virtio over MMIO, net, console, virtiofs; the cloud
  kernel has them as modules; their signatures cut off), ``/init`` (init.sh) and
  ``/den-agent`` (agent/den-agent.c, compiled here as a static binary).
- ``stamp.json``: what they were built from (the package and its version, the
  sha256 of init.sh and of the agent's source, :data:`RECIPE`); a change builds
  them again.

Under TCG every instruction the guest runs before den's agent answers is emulated:
the choices above each take work off the guest's boot (measured in the commit log).
- ``accel.json``: the verdict of the KVM probe (:func:`probe_accel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from den.errors import BackendFailure, DenError
from den.host.checks import Check

if TYPE_CHECKING:
    from den.config import Settings
from den.proc import CommandFailed, run

HERE = Path(__file__).resolve().parent
INIT_SH = HERE / "init.sh"
AGENT_SRC = HERE / "agent" / "den-agent.c"
METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
QEMU = "qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# What a microVM needs of the cloud kernel's modules; their dependencies come along.
# (No virtio_blk: the root filesystem and /code are virtiofs.)
MODULES = ("virtio_mmio", "virtio_net", "virtio_console", "fuse", "virtiofs")
# How the assets are made from their inputs: bumped when the build itself changes, so
# that assets built the old way are built again.
RECIPE = "2"
# The signature the kernel build appends to a module (scripts/sign-file).
MODULE_SIG_MAGIC = b"~Module signature appended~\n"
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU boots an ELF kernel through
# The busybox applets init.sh runs (it runs nothing else; den's agent does the rest).
APPLETS = ("sh", "mount", "umount", "mkdir", "sleep", "sync", "poweroff", "switch_root")
# Until the agent's source exists: a PID 1 that says what it is and reaps (and fails
# init.sh's `den-agent --setup`, which it cannot do).
PLACEHOLDER_AGENT = rb"""#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    if (getpid() != 1) {
        if (write(1, "den-init: failed: no den agent (placeholder)\n", 45) < 0) return 1;
        return 1;
    }
    if (write(1, "den-agent: placeholder\n", 23) < 0) return 1;
    for (;;) if (wait(0) < 0) pause();
}
"""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Assets:
    kernel: Path
    initrd: Path
    kernel_version: str  # the kernel's release, e.g. 6.1.0-57-cloud-amd64


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    note: str  # why, when it is tcg ("" for kvm)


def asset_dir(data_dir: Path) -> Path:
    return data_dir / "microvm"


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _inputs() -> dict[str, str | None]:
    """What the initramfs is made of on this side (the kernel package is added to it)."""
    return {"init": _sha256(INIT_SH), "agent": _sha256(AGENT_SRC), "recipe": RECIPE}


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def assets_ready(data_dir: Path) -> Assets | None:
    """The built assets if they are there and match this den's init.sh and agent."""
    d = asset_dir(data_dir)
    stamp = _read_json(d / "stamp.json")
    if stamp is None or any(stamp.get(k) != v for k, v in _inputs().items()):
        return None
    kernel, initrd = d / "vmlinuz", d / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return Assets(kernel, initrd, str(stamp.get("kernel_version", "")))


def _records(text: str) -> list[dict[str, str]]:
    """apt-cache show's records (fields of one line; continuation lines dropped)."""
    out = []
    for block in text.split("\n\n"):
        rec = dict(
            line.split(": ", 1)
            for line in block.splitlines()
            if ": " in line and not line.startswith(" ")
        )
        if rec:
            out.append(rec)
    return out


async def kernel_package() -> tuple[str, str, str]:
    """The cloud kernel's versioned package (what the metapackage depends on), its
    version and the SHA256 Debian publishes for it. One apt-cache run (each reads every
    package list here: seconds)."""
    try:
        show = await run(
            ["apt-cache", "show", "--no-all-versions", METAPACKAGE, "linux-image-*-cloud-amd64"],
            timeout=120,
        )
    except CommandFailed as exc:
        raise BackendFailure(
            f"cannot find {METAPACKAGE} with apt-cache (apt-get update?): {exc.message}"
        ) from None
    recs = _records(show.stdout)
    meta = next((r for r in recs if r.get("Package") == METAPACKAGE), None)
    dep = (meta or {}).get("Depends", "").split(",")[0].split("|")[0].strip()
    pkg, _, ver = dep.partition(" (= ")
    if not pkg.startswith("linux-image-"):
        raise BackendFailure(f"{METAPACKAGE} depends on no linux-image package here")
    ver = ver.rstrip(")")
    for r in recs:
        if r.get("Package") == pkg and (not ver or r.get("Version") == ver) and "SHA256" in r:
            return pkg, r["Version"], r["SHA256"]
    raise BackendFailure(f"apt-cache knows no {pkg} {ver} with a SHA256")


async def fetch_deb(cache: Path, pkg: str, version: str, sha256: str, say: Progress) -> Path:
    """The package's .deb in ``cache``: the one there if its digest is Debian's, else
    downloaded (``apt-get download`` checks it too)."""
    cache.mkdir(parents=True, exist_ok=True)
    deb = cache / f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"
    if _sha256(deb) == sha256:
        say(f"kernel package {deb.name}: cached")
        return deb
    say(f"downloading {pkg} {version}")
    # env --chdir: apt-get download writes into its working directory.
    await run(
        ["env", f"--chdir={cache}", "apt-get", "download", "-q",
         "-o", "APT::Sandbox::User=root", f"{pkg}={version}"],
        timeout=900,
    )  # fmt: skip
    if _sha256(deb) != sha256:
        raise BackendFailure(f"{deb.name}: not downloaded, or not the package Debian lists")
    for old in cache.glob("linux-image-*.deb"):
        if old != deb:
            old.unlink(missing_ok=True)
    return deb


def _modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` of a module (its ``.modinfo`` ELF section): the host may have
    no kmod, and the package ships no modules.dep (depmod makes it on install)."""
    if ko[:5] != b"\x7fELF\x02":
        raise BackendFailure("a kernel module is not a 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + i * shentsize
        )
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if ko[stroff + name : ko.index(b"\0", stroff + name)] == b".modinfo":
            for entry in ko[off : off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [m for m in entry[8:].decode().split(",") if m]
            return []
    return []


def _unsigned(ko: bytes) -> bytes:
    """The module without its appended signature. The cloud kernel does not enforce
    signatures, and checking each (RSA, SHA-256) is emulated work at every boot under
    TCG; what den loads comes from its own initramfs, built from Debian's verified
    package."""
    if not ko.endswith(MODULE_SIG_MAGIC):
        return ko
    # struct module_signature (12 bytes) before the magic; its last field: sig_len.
    (sig_len,) = struct.unpack_from(">I", ko, len(ko) - len(MODULE_SIG_MAGIC) - 4)
    end = len(ko) - len(MODULE_SIG_MAGIC) - 12 - sig_len
    if end <= 0:
        raise BackendFailure("a kernel module with a malformed signature")
    return ko[:end]


def _pick_modules(moddir: Path, out: Path) -> list[str]:
    """Copy MODULES and their dependencies from ``moddir`` (lib/modules/<release>) into
    ``out``, uncompressed (busybox's insmod hands the kernel the bytes as they are), and
    return their file names in load order."""
    files: dict[str, Path] = {}
    for f in moddir.rglob("*.ko*"):
        stem = f.name.split(".ko")[0]
        files[stem.replace("-", "_")] = f
    builtin = {
        Path(line).name.split(".ko")[0].replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().split()
    }
    order: list[str] = []
    seen: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise BackendFailure(f"kernel modules: a dependency loop at {name}")
        src = files.get(name)
        if src is None:
            raise BackendFailure(f"the kernel has no module {name} (needed by a microVM)")
        data = src.read_bytes()
        if src.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif not src.name.endswith(".ko"):
            raise BackendFailure(f"{src.name}: a compression den does not unpack")
        data = _unsigned(data)
        for dep in _modinfo_depends(data):
            add(dep, (*chain, name))
        seen.add(name)
        (out / f"{name}.ko").write_bytes(data)
        order.append(f"{name}.ko")

    for m in MODULES:
        add(m, ())
    return order


async def build_agent(src: Path, out: Path) -> None:
    """Compile den's guest agent as a static binary (it runs on any root filesystem)."""
    await run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(src)],
        timeout=300,
    )


async def _build_initrd(root: Path, moddir: Path, out: Path) -> None:
    """The newc cpio of ``root`` filled with busybox, modules, /init and /den-agent."""
    for d in ("bin", "dev", "proc", "sys", "run", "newroot", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    # The console the kernel opens for /init before anything is mounted.
    os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    order = _pick_modules(moddir, root / "lib/modules")
    (root / "lib/modules/load").write_text("".join(f"{m}\n" for m in order))
    shutil.copyfile(INIT_SH, root / "init")
    (root / "init").chmod(0o755)
    if AGENT_SRC.is_file():
        await build_agent(AGENT_SRC, root / "den-agent")
    else:
        placeholder = root.parent / "placeholder-agent.c"
        placeholder.write_bytes(PLACEHOLDER_AGENT)
        await build_agent(placeholder, root / "den-agent")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    # -R 0:0 and --reproducible: the archive says nothing of the build's files.
    # Not compressed: QEMU loads it into guest memory for nothing, while the guest
    # would inflate it with emulated instructions (4 MB instead of 1.6 MB).
    await run(
        ["env", f"--chdir={root}", "cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0",
         "--reproducible", "-O", str(out)],
        input="".join(f"{n}\n" for n in [".", *names]).encode(),
        timeout=120,
    )  # fmt: skip


def _has_pvh_entry(elf: bytes) -> bool:
    """A 64-bit x86 ELF kernel with a PVH entry note (what QEMU needs to boot it)."""
    if elf[:5] != b"\x7fELF\x02" or struct.unpack_from("<H", elf, 0x12)[0] != 0x3E:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, off, _va, _pa, size = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


async def _pvh_kernel(bzimage: Path, out: Path, tmp: Path) -> bool:
    """Write the bzImage's kernel, decompressed, to ``out`` if it is an ELF file with a
    PVH entry: QEMU's microvm boots it straight into 64-bit code, skipping the real-mode
    setup and the decompressor (LZ4 of 53 MB emulated, for Debian's cloud kernel).
    False (nothing written) when it cannot: another compression den cannot undo, no PVH."""
    bz = bzimage.read_bytes()
    if bz[0x202:0x206] != b"HdrS":
        return False
    setup_sects = bz[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bz, 0x248)  # payload_offset, payload_length
    start = (setup_sects + 1) * 512 + offset
    payload = bz[start : start + length]
    try:
        if payload[:2] == b"\x1f\x8b":
            elf = gzip.decompress(payload)
        elif payload[:6] == b"\xfd7zXZ\0":
            elf = lzma.LZMADecompressor().decompress(payload)  # stops before the size
        elif payload[:4] == b"\x02\x21\x4c\x18" and shutil.which("lz4"):
            # the kernel's legacy LZ4 stream, then the size the build appended
            src = tmp / "payload.lz4"
            src.write_bytes(payload[:-4])
            await run(["lz4", "-d", "-q", "-f", str(src), str(out)], timeout=120)
            src.unlink()
            elf = out.read_bytes()
        else:
            return False
    except (CommandFailed, OSError, EOFError, lzma.LZMAError, gzip.BadGzipFile, zlib.error):
        out.unlink(missing_ok=True)
        return False
    if not _has_pvh_entry(elf):
        out.unlink(missing_ok=True)
        return False
    out.write_bytes(elf)
    return True


@contextlib.asynccontextmanager
async def _locked(d: Path) -> AsyncIterator[None]:
    """One builder or prober at a time per data directory (the daemon, `den init`)."""
    fd = os.open(d / ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        # What a killed builder or prober left: nobody else uses it while we hold the lock.
        for left in [*d.glob("build-*"), *d.glob("probe-*")]:
            shutil.rmtree(left, ignore_errors=True)
        yield
    finally:
        os.close(fd)  # and the lock with it


def _prepare_dir(data_dir: Path) -> Path:
    d = asset_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    return d


async def ensure_assets(
    data_dir: Path, *, progress: Progress | None = None, refresh: bool = False
) -> Assets:
    """Build the kernel and initramfs under ``DATA_DIR/microvm`` unless they are built
    from the same inputs already; returns them.

    Without ``refresh`` assets built for this den's init.sh and agent are used as they
    are (apt-cache takes seconds here); ``refresh`` (`den init`) also asks apt for the
    cloud kernel's current package and builds again if it changed.
    """
    say = progress or (lambda _msg: None)
    ready = assets_ready(data_dir)
    if ready is not None and not refresh:
        return ready
    d = _prepare_dir(data_dir)
    pkg, version, sha = await kernel_package()
    inputs = {"package": pkg, "version": version, **_inputs()}
    async with _locked(d):
        return await _ensure(data_dir, d, inputs, (pkg, version, sha), say)


async def _ensure(
    data_dir: Path,
    d: Path,
    inputs: dict[str, str | None],
    package: tuple[str, str, str],
    say: Progress,
) -> Assets:
    pkg, version, sha = package
    ready = assets_ready(data_dir)
    stamp = _read_json(d / "stamp.json") or {}
    if ready is not None and all(stamp.get(k) == v for k, v in inputs.items()):
        say(f"microVM assets: up to date (kernel {ready.kernel_version})")
        return ready
    start = time.monotonic()
    deb = await fetch_deb(d / "cache", pkg, version, sha, say)
    with tempfile.TemporaryDirectory(prefix="build-", dir=d) as tmp:
        x = Path(tmp) / "x"
        say(f"unpacking {deb.name}")
        await run(["dpkg-deb", "-x", str(deb), str(x)], timeout=300)
        releases = [p.name for p in (x / "lib/modules").iterdir() if p.is_dir()]
        if len(releases) != 1:
            raise BackendFailure(f"{deb.name}: expected one kernel release, found {releases}")
        release = releases[0]
        say(f"building the initramfs (kernel {release})")
        initrd_tmp = Path(tmp) / "initrd.img"
        await _build_initrd(Path(tmp) / "root", x / "lib/modules" / release, initrd_tmp)
        kernel_tmp = Path(tmp) / "vmlinuz"
        bzimage = x / "boot" / f"vmlinuz-{release}"
        if not await _pvh_kernel(bzimage, kernel_tmp, Path(tmp)):
            say("the kernel has no PVH entry den can use: booting its bzImage")
            shutil.copyfile(bzimage, kernel_tmp)
        (d / "stamp.json").unlink(missing_ok=True)
        kernel_tmp.replace(d / "vmlinuz")
        initrd_tmp.replace(d / "initrd.img")
    _write_json(d / "stamp.json", {**inputs, "kernel_version": release})
    say(f"microVM assets: built in {time.monotonic() - start:.1f}s (kernel {release})")
    ready = assets_ready(data_dir)
    assert ready is not None
    return ready


# -- acceleration ------------------------------------------------------------------

KVM = Path("/dev/kvm")
# The CPU each accelerator gives the guest (B's argv uses the same).
CPU = {"kvm": "host", "tcg": "max"}


def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, for the guest's ``tsc_early_khz=``: without it the
    cloud kernel's TSC calibration sometimes hangs under TCG."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":", 1)[1]) * 1000)
    return None


def base_cmdline() -> str:
    """The kernel arguments every den guest gets (B adds den.ip=... and the rest)."""
    khz = host_tsc_khz()
    # tsc=reliable: on a loaded host the TSC watchdog (TCG) drops to the jiffies clock,
    # 4 ms steps for every clock the guest reads.
    # init_on_alloc=0: Debian turns on zeroing every page and slab object the kernel
    # hands out, emulated memsets under TCG (the largest single cost of the boot);
    # a hardening of the guest's kernel against itself, while what isolates a
    # workspace is the VM.
    # cryptomgr.notests: no self-tests of every crypto algorithm the kernel registers
    # (a late initcall of about a second under TCG).
    return "console=ttyS0 quiet panic=-1 tsc=reliable init_on_alloc=0 cryptomgr.notests" + (
        f" tsc_early_khz={khz}" if khz else ""
    )


def qemu_base_argv(assets: Assets, accel: str, memory_mb: int, console: Path) -> list[str]:
    """A QEMU microvm with den's kernel and initramfs, no devices yet, the console in
    ``console``, and no reboot: a guest that reboots or panics ends QEMU."""
    return [
        QEMU, "-M", "microvm", "-accel", accel, "-cpu", CPU[accel],
        "-m", str(memory_mb), "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-serial", f"file:{console}",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
    ]  # fmt: skip


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


async def _probe_kvm(assets: Assets, d: Path, timeout: float) -> str | None:
    """Boot the initramfs under KVM to its probe line; None if it got there in time,
    else why not."""
    with tempfile.TemporaryDirectory(prefix="probe-", dir=d) as tmp:
        console = Path(tmp) / "console.log"
        argv = qemu_base_argv(assets, "kvm", 256, console)
        argv += ["-append", f"{base_cmdline()} den.probe=1"]
        try:
            await run(argv, timeout=timeout)
        except CommandFailed as exc:
            if exc.result.returncode == -9:
                return f"probe timed out after {timeout:.0f}s"
            err = exc.result.stderr.strip().splitlines()
            return f"failed: {(err[-1] if err else _tail(console))[:200]}"
        if "den-init: probe ok" in console.read_text(errors="replace"):
            return None
        return f"failed: no probe line ({_tail(console)[:200] or 'no console output'})"


async def probe_accel(data_dir: Path, timeout: float = 20.0, *, force: bool = False) -> Accel:
    """KVM if a probe VM boots under it within ``timeout``, else TCG with a note.

    ``/dev/kvm`` existing is not enough (a nested PVM device runs no stock kernel).
    The verdict is kept in ``accel.json`` for the kernel and /dev/kvm's presence;
    ``force`` probes again.
    """
    assets = assets_ready(data_dir)
    if assets is None:
        raise BackendFailure("the microVM assets are not built: run `den init`")
    d = asset_dir(data_dir)
    key: dict[str, object] = {"kernel_version": assets.kernel_version, "kvm": KVM.exists()}
    async with _locked(d):
        cached = _read_json(d / "accel.json")
        if not force and cached and all(cached.get(k) == v for k, v in key.items()):
            return Accel(str(cached.get("name")), str(cached.get("note", "")))
        if not KVM.exists():
            why: str | None = "there is no /dev/kvm"
            note = f"{why}: microVMs are emulated (TCG) and slow"
        else:
            why = await _probe_kvm(assets, d, timeout)
            note = (
                f"KVM at /dev/kvm cannot run a stock guest kernel here ({why}); "
                "microVMs are emulated (TCG) and slow"
            )
        accel = Accel("kvm", "") if why is None else Accel("tcg", note)
        _write_json(d / "accel.json", {**key, "name": accel.name, "note": accel.note})
        return accel


def accel_cached(data_dir: Path) -> Accel | None:
    """The last probe's verdict, if any (no probe)."""
    data = _read_json(asset_dir(data_dir) / "accel.json")
    if data is None or data.get("name") not in CPU:
        return None
    return Accel(str(data["name"]), str(data.get("note", "")))


def unavailable(settings: Settings) -> str | None:
    """None when microVMs can start on this node, else why not and what to do (cheap:
    no subprocess; asked on every workspace.create)."""
    if not settings.microvm:
        return "the microvm backend is off on this node (microvm = false)"
    if shutil.which(QEMU) is None or not Path(VIRTIOFSD).exists():
        return "QEMU is not installed on this node (qemu-system-x86): run `den init`"
    if assets_ready(settings.data_dir) is None:
        return "its guest kernel and initramfs are not built: run `den init`"
    return None


# -- den init's steps for this backend (den.backends.registry.HOST_STEPS) -------------


def enabled(settings: Settings) -> bool:
    return settings.microvm


def _accel_note(accel: Accel | None) -> str:
    if accel is None:
        return "microVM acceleration: not probed yet (den init probes it)"
    if accel.name == "kvm":
        return "microVM acceleration: kvm"
    return f"microVM acceleration: tcg: {accel.note}"


def init_check(settings: Settings, probe: bool) -> tuple[list[Check], list[str]]:
    """The guest assets as a host check, and the acceleration verdict (probed
    again when ``probe``) as a note."""
    ready = assets_ready(settings.data_dir)
    detail = (
        f"built (kernel {ready.kernel_version})" if ready else "not built: den init builds them"
    )
    check = Check(
        "microVM assets", ready is not None, detail, fix="build the microVM kernel and initramfs"
    )
    if ready is None:
        return [check], []
    accel = accel_cached(settings.data_dir)
    if probe:
        accel = asyncio.run(probe_accel(settings.data_dir, force=True))
    return [check], [_accel_note(accel)]


async def init_prepare(settings: Settings, say: Progress) -> list[str]:
    """Build (or refresh) the guest assets and probe KVM; the verdict as a note."""
    try:
        await ensure_assets(settings.data_dir, progress=say, refresh=True)
    except (DenError, OSError) as exc:
        # A failed download or unpack (CommandFailed), a full disk: said in one line.
        why = exc.message if isinstance(exc, DenError) else str(exc)
        raise BackendFailure(
            f"microVM assets: {why} (microvm = false turns the backend off)"
        ) from None
    return [_accel_note(await probe_accel(settings.data_dir))]
