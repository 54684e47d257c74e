"""den's guest assets: the kernel from Debian's package, the initramfs den builds, its
/init on a real boot (QEMU microvm under TCG, the root a btrfs snapshot of an image
through virtiofs), and the KVM probe."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from den.backends.microvm import assets as mv
from tests.conftest import DEN
from tests.microvm.conftest import ASSET_CACHE, guest, seed_assets
from tests.workspaces.conftest import make_bb_rootfs

pytestmark = pytest.mark.slow

READY = "den-init: ready"
FAILED = "den-init: failed:"


def cpio_names(initrd: Path) -> set[str]:
    data = initrd.read_bytes()  # uncompressed: the guest does not inflate it
    out = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True)
    return set(out.stdout.decode().split())


def test_assets_from_the_debian_package(microvm_assets: mv.Assets) -> None:
    a = microvm_assets
    assert a.kernel_version.endswith("-cloud-amd64")
    # the bzImage's kernel decompressed: an ELF QEMU boots through its PVH entry
    assert mv._has_pvh_entry(a.kernel.read_bytes())
    assert a.initrd.read_bytes()[:6] == b"070701"  # a newc cpio, not compressed
    names = cpio_names(a.initrd)
    assert {"init", "den-agent", "bin/busybox", "bin/switch_root", "dev/console"} <= names
    mods = (ASSET_CACHE / "microvm").glob("*")
    assert {p.name for p in mods} >= {"vmlinuz", "initrd.img", "stamp.json", "cache"}
    for m in ("virtio_mmio", "virtio_net", "virtio_console", "fuse", "virtiofs", "virtio_ring"):
        assert f"lib/modules/{m}.ko" in names
    assert "lib/modules/virtio_blk.ko" not in names
    # Debian's package is cached, not installed on the host.
    debs = list((mv.asset_dir(ASSET_CACHE) / "cache").glob("linux-image-*.deb"))
    assert len(debs) == 1
    assert not Path("/lib/modules", a.kernel_version).exists()
    # Up to date: nothing is built again.
    before = a.initrd.stat().st_mtime_ns
    lines: list[str] = []
    again = asyncio.run(mv.ensure_assets(ASSET_CACHE, progress=lines.append, refresh=True))
    assert again == a and a.initrd.stat().st_mtime_ns == before
    assert any("up to date" in line for line in lines), lines


def test_changed_input_rebuilds(microvm_assets: mv.Assets, tmp_path: Path) -> None:
    """A stamp that does not match this den's init.sh builds the initramfs anew (the
    cached .deb reused)."""
    src = mv.asset_dir(ASSET_CACHE)
    dst = mv.asset_dir(tmp_path)
    (dst / "cache").mkdir(parents=True)
    for p in [src / "vmlinuz", src / "initrd.img", *(src / "cache").glob("*.deb")]:
        (dst / p.relative_to(src)).write_bytes(p.read_bytes())
    stamp = json.loads((src / "stamp.json").read_text())
    (dst / "stamp.json").write_text(json.dumps({**stamp, "init": "0" * 64}))
    assert mv.assets_ready(tmp_path) is None
    (dst / "build-killed" / "x").mkdir(parents=True)  # what a killed build leaves
    lines: list[str] = []
    built = asyncio.run(mv.ensure_assets(tmp_path, progress=lines.append))
    assert any("cached" in line for line in lines) and any("built" in line for line in lines)
    assert built.kernel_version == microvm_assets.kernel_version
    assert cpio_names(built.initrd) == cpio_names(microvm_assets.initrd)
    assert oct(dst.stat().st_mode & 0o777) == "0o700"
    assert not (dst / "build-killed").exists()


@pytest.fixture(scope="module")
def bb_subvolume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The busybox test image as a btrfs subvolume, on a small loopback btrfs of the
    module's own (the pool's images are made the same way; no daemon needed)."""
    base = tmp_path_factory.mktemp("mvpool")
    img, mnt = base / "pool.img", base / "pool"
    mnt.mkdir()
    with img.open("wb") as f:
        f.truncate(256 << 20)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["mkfs.btrfs", "-q", dev], check=True, capture_output=True)
        subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
        try:
            subprocess.run(["btrfs", "subvolume", "create", str(mnt / "bb")], check=True,
                           capture_output=True)  # fmt: skip
            make_bb_rootfs(mnt / "bb")
            yield mnt / "bb"
        finally:
            subprocess.run(["umount", "--lazy", str(mnt)], check=False, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


@pytest.fixture
def snapshot(bb_subvolume: Path) -> Iterator[Path]:
    """A writable btrfs snapshot of the busybox image, with the /etc files den binds over."""
    path = bb_subvolume.parent / f"ws-{secrets.token_hex(4)}"
    subprocess.run(
        ["btrfs", "subvolume", "snapshot", str(bb_subvolume), str(path)],
        check=True,
        capture_output=True,
    )
    try:
        (path / "etc/hostname").write_text("image\n")
        (path / "etc/resolv.conf").write_text("nameserver 192.0.2.1\n")
        (path / "etc/hosts").write_text("127.0.0.1 localhost\n")
        yield path
    finally:
        subprocess.run(["btrfs", "subvolume", "delete", str(path)], check=True, capture_output=True)


def test_boots_to_ready_on_a_snapshot(
    microvm_assets: mv.Assets, snapshot: Path, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    with guest(tmp_path, microvm_assets) as g:
        g.start(
            {"root": snapshot, "code": code},
            "den.ip=10.0.2.15/24 den.gw=10.0.2.2 den.dns=10.0.2.3,192.0.2.53 "
            "den.hostname=mvtest den.mac=02:de:00:00:00:01 den.code=1",
        )
        assert g.wait_line(READY, FAILED) == READY, g.text()
        took = time.monotonic() - g.started
        print(f"QEMU start -> {READY}: {took:.2f}s (TCG)")
        assert g.exited(0.5) is None, g.text()
        # switch_root handed PID 1 to den's agent: it answers on its port, in the
        # guest den's init set up.
        start = time.monotonic()
        seen = asyncio.run(inside(g.agent_sock))
        print(f"{READY} -> agent answers: {time.monotonic() - start:.2f}s")
        assert seen["hostname"] == "mvtest"
        assert seen["resolv"] == "nameserver 10.0.2.3\nnameserver 192.0.2.53\n"
        assert "127.0.1.1\tmvtest" in seen["hosts"]
        assert "inet 10.0.2.15/24" in seen["addr"]
        assert "default via 10.0.2.2" in seen["route"]
        assert " /code virtiofs " in seen["mounts"] and " / virtiofs " in seen["mounts"]
        assert "devpts /dev/pts devpts" in seen["mounts"]
        assert seen["pid1"] == "den-agent"
    # The image's files are bound over, never written: the snapshot keeps its own.
    assert (snapshot / "etc/hostname").read_text() == "image\n"
    assert (snapshot / "etc/resolv.conf").read_text() == "nameserver 192.0.2.1\n"
    assert not (snapshot / "run/den").exists()


async def inside(sock: Path) -> dict[str, str]:
    """What the guest shows of itself, through den's agent."""
    from den.backends.microvm.channel import AgentChannel

    ch = await AgentChannel.open(sock, timeout=60)
    try:
        out = {}
        for key, argv in {
            "hostname": ["hostname"],
            "resolv": ["cat", "/etc/resolv.conf"],
            "hosts": ["cat", "/etc/hosts"],
            "addr": ["ip", "-4", "addr"],
            "route": ["ip", "route"],
            "mounts": ["cat", "/proc/mounts"],
            "pid1": ["cat", "/proc/1/comm"],
        }.items():
            r = await ch.run(argv, {"PATH": "/bin:/sbin:/usr/bin"}, "/", 0, 0, [0], timeout=30)
            assert r.exit_code == 0, (argv, r)
            out[key] = r.stdout.decode()
        out["hostname"] = out["hostname"].strip()
        out["pid1"] = out["pid1"].strip()
        return out
    finally:
        await ch.close()


def test_no_root_fails_and_powers_off(microvm_assets: mv.Assets, tmp_path: Path) -> None:
    with guest(tmp_path, microvm_assets) as g:
        g.start({}, "den.hostname=broken")  # no virtiofs tag root
        assert g.wait_line(READY, FAILED) == FAILED, g.text()
        assert "den-init: failed: cannot mount the root filesystem" in g.text()
        assert g.exited(60) == 0, g.text()  # powered off: QEMU ends by itself
        assert READY not in g.text()


def test_probe_verdict_is_cached(microvm_assets: mv.Assets, tmp_path: Path) -> None:
    """/dev/kvm here is a nested PVM device: the probe VM does not boot under it, and
    the verdict says so; it is kept, and probed again on request."""
    seed_assets(tmp_path)
    start = time.monotonic()
    accel = asyncio.run(mv.probe_accel(tmp_path, timeout=20))
    print(f"probe: {accel} in {time.monotonic() - start:.1f}s")
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if not (" vmx" in cpuinfo or " svm" in cpuinfo):
        assert accel.name == "tcg"
        assert accel.note.endswith("microVMs are emulated (TCG) and slow"), accel.note
        if mv.KVM.exists():
            assert accel.note.startswith("KVM at /dev/kvm cannot run a stock guest kernel")
    cached = json.loads((mv.asset_dir(tmp_path) / "accel.json").read_text())
    assert cached["name"] == accel.name
    assert cached["kernel_version"] == microvm_assets.kernel_version
    assert mv.accel_cached(tmp_path) == accel
    # A stale verdict (another kernel) is not used: the probe runs again.
    (mv.asset_dir(tmp_path) / "accel.json").write_text(
        json.dumps({**cached, "kernel_version": "old", "name": "kvm", "note": ""})
    )
    assert asyncio.run(mv.probe_accel(tmp_path, timeout=20)) == accel


def test_den_init_check_shows_assets_and_accel(microvm_assets: mv.Assets, tmp_path: Path) -> None:
    """`den init --check` says whether the assets are built and probes KVM again."""
    env = {
        **os.environ,
        "DEN_CONFIG": str(tmp_path / "den.toml"),
        "DEN_DATA_DIR": str(tmp_path / "data"),
        "DEN_INSTANCE": "97",
    }

    def check() -> str:
        res = subprocess.run(
            [DEN, "init", "--check", "--no-image"], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        return res.stdout

    out = check()
    assert "MISSING microVM assets: not built: den init builds them" in out, out
    seed_assets(tmp_path / "data")
    (mv.asset_dir(tmp_path / "data") / "accel.json").write_text(
        json.dumps(
            {
                "kernel_version": microvm_assets.kernel_version,
                "kvm": mv.KVM.exists(),
                "name": "kvm",
                "note": "",
            }
        )
    )  # fmt: skip: a stale verdict: --check probes again
    out = check()
    assert f"ok   microVM assets: built (kernel {microvm_assets.kernel_version})" in out, out
    accel = mv.accel_cached(tmp_path / "data")
    assert accel is not None
    if accel.name == "tcg":
        assert f"note microVM acceleration: tcg: {accel.note}" in " ".join(out.split()), out
    else:
        assert "ok   microVM acceleration: kvm" in out, out
    env["DEN_MICROVM"] = "false"
    assert "microVM" not in check()
