"""The node API (net.*, vol.*) against a hostile caller: holes a review found in its
protected objects, each kept as a ``test_closed_*`` guard now that it is closed. Network tests act
in the network namespace the daemon of tests/node/test_net.py's ``netd`` runs in;
storage tests on loop devices and below a directory of /mnt they make. Everything
made is removed after, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from den.net import links
from tests.conftest import Daemon
from tests.node import test_net, test_vol
from tests.node.test_net import LAN, UPLINK, _add_veth, inside, link, nft, node_rules
from tests.node.test_vol import audit, mount_points, run

# The fixtures of test_net (a daemon in a netns of its own) and test_vol (a daemon with a
# loopback pool, loop devices, a directory below /mnt), reused, not forked.
netd = test_net.netd
vd, loops, root = test_vol.vd, test_vol.loops, test_vol.root

FORBIDDEN = -32003
Net = tuple[Daemon, str]


def _in(ns: str, fn: Callable[[IPRoute], Any]) -> Any:
    def go() -> Any:
        with IPRoute() as ipr:
            return fn(ipr)

    return inside(ns, go)


def _idx(ipr: IPRoute, name: str) -> int:
    i = links.index(ipr, name)
    assert i is not None, name
    return i


# -- net: protected objects ---------------------------------------------------------------


def test_closed_altname_of_default_route_interface_not_protected(netd: Net) -> None:
    """The uplink reached by an alternative name (systemd gives NICs one: enp0s3) is
    still the interface carrying the default route."""
    d, ns = netd
    alt = f"alt{secrets.token_hex(2)}"
    _in(ns, lambda ipr: ipr.link("property_add", index=_idx(ipr, UPLINK), altname=alt))
    try:
        d.call("net.bridge.add", name="hbr0")
        err = None
        try:
            d.call("net.bridge.add_port", bridge="hbr0", port=alt)
        except Exception as exc:  # noqa: BLE001 - the refusal is what we want
            err = exc
        assert link(ns, UPLINK)["master"] is None, (  # type: ignore[index]
            f"the default-route interface {UPLINK} was enslaved to hbr0 through its altname {alt}"
        )
        assert getattr(err, "code", None) == FORBIDDEN
    finally:
        _in(ns, lambda ipr: ipr.link("set", index=_idx(ipr, UPLINK), master=0))
        with contextlib.suppress(Exception):
            d.call("net.bridge.delete", name="hbr0")
        _in(ns, lambda ipr: ipr.link("property_del", index=_idx(ipr, UPLINK), altname=alt))


@pytest.fixture
def uplink_bridge(netd: Net) -> Iterator[str]:
    """A second default route (metric 50) through a bridge whose lower port is a veth:
    the layout of a hypervisor node (eth0 enslaved to br0, the address on br0)."""
    d, ns = netd

    def setup(ipr: IPRoute) -> None:
        ipr.link("add", ifname="hbrup", kind="bridge")
        ipr.link("set", index=_idx(ipr, "hbrup"), state="up")
        ipr.link("set", index=_idx(ipr, "hupl"), master=_idx(ipr, "hbrup"))
        ipr.addr("add", index=_idx(ipr, "hbrup"), address="198.18.0.1", prefixlen=24)
        ipr.route("add", dst="0.0.0.0", dst_len=0, gateway="198.18.0.254", priority=50)

    inside(ns, lambda: _add_veth("hupl"))
    try:
        _in(ns, setup)
        assert "hbrup" in d.call("net.status")["default_route_devs"]
        yield "hupl"
    finally:
        for name in ("hbrup", "hupl", "hbr1"):
            inside(ns, lambda n=name: links.delete_link(n))  # type: ignore[misc]


def test_lower_port_of_default_route_bridge_detach_refused(netd: Net, uplink_bridge: str) -> None:
    """Detaching the physical port of the bridge the default route leaves through is
    refused (the bridge is checked): a guard for the hole below, which moves it."""
    d, ns = netd
    port = uplink_bridge
    err = None
    try:
        d.call("net.bridge.remove_port", bridge="hbrup", port=port)
    except Exception as exc:  # noqa: BLE001
        err = exc
    assert link(ns, port)["master"] == "hbrup", (  # type: ignore[index]
        f"{port}, the lower port of the default-route bridge hbrup, was detached"
    )
    assert getattr(err, "code", None) == FORBIDDEN


def test_closed_lower_port_of_default_route_bridge_can_be_moved(
    netd: Net, uplink_bridge: str
) -> None:
    """Moving the physical port of the default-route bridge to another bridge (add_port
    checks the new bridge and the port by name only) cuts the host off."""
    d, ns = netd
    port = uplink_bridge
    d.call("net.bridge.add", name="hbr1")
    try:
        err = None
        try:
            d.call("net.bridge.add_port", bridge="hbr1", port=port)
        except Exception as exc:  # noqa: BLE001
            err = exc
        assert link(ns, port)["master"] == "hbrup", (  # type: ignore[index]
            f"{port} was moved off the default-route bridge to hbr1"
        )
        assert getattr(err, "code", None) == FORBIDDEN
    finally:
        with contextlib.suppress(Exception):
            d.call("net.bridge.delete", name="hbr1")


def _subnet(d: Daemon) -> str:
    return str(d.call("net.nat.status")["workspace_masquerade"]["subnet"])


@pytest.mark.parametrize(
    "dst",
    ["{subnet}", "{half}", "169.254.169.254/32"],
    ids=["workspace-subnet", "part-of-workspace-subnet", "metadata-address"],
)
def test_closed_route_steals_workspace_subnet_or_metadata(netd: Net, dst: str) -> None:
    """A route for den's workspace subnet (or part of it, or the metadata address) through
    another interface sends the host's traffic to workspaces elsewhere; net.routes.add is a
    replace, so once den's bridge has its connected route (same dst, metric 0) it is
    overwritten outright."""
    d, _ns = netd
    subnet = _subnet(d)
    net = __import__("ipaddress").ip_network(subnet)
    half = str(next(net.subnets(prefixlen_diff=1)))
    target = dst.format(subnet=subnet, half=half)
    made = False
    try:
        try:
            d.call("net.routes.add", dst=target, dev=LAN)
            made = True
        except Exception as exc:  # noqa: BLE001
            assert getattr(exc, "code", None) == FORBIDDEN, exc
            return
        pytest.fail(f"net.routes.add {target} dev {LAN} accepted: den's {subnet} is hijackable")
    finally:
        if made:
            d.call("net.routes.delete", dst=target, dev=LAN)


def test_routes_never_replace_or_shadow(netd: Net) -> None:
    """A route the kernel has (lan0's connected route, same table, dst and metric) is not
    replaced: a Conflict, and it still goes through lan0; halves of the address space
    (which together outrank the default route) are refused."""
    d, _ns = netd
    err = d.error("net.routes.add", dst="10.77.0.0/24", gateway="10.77.0.254")
    assert err.code == -32002, err
    assert any(
        r["dst"] == "10.77.0.0/24" and r["dev"] == LAN and r["gateway"] is None
        for r in d.call("net.routes")
    )
    for half in ("0.0.0.0/1", "128.0.0.0/1"):
        assert d.error("net.routes.add", dst=half, dev=LAN).code == FORBIDDEN
    assert not any(r["dst"].endswith("/1") for r in d.call("net.routes"))


def test_nat_of_dens_ports_and_subnet_refused(netd: Net) -> None:
    """A DNAT of a port den listens on (its API here), to the workspace subnet, and a
    source NAT of the workspace subnet (den's masquerade decides it) are refused."""
    d, _ns = netd
    subnet = _subnet(d)
    inside_subnet = str(next(__import__("ipaddress").ip_network(subnet).hosts()))
    http_port = int(__import__("json").loads((d.data_dir / "serve.json").read_text())["http_port"])
    before = d.call("net.nat.status")
    for method, params in (
        ("net.nat.add_dnat", {"port": http_port, "to_addr": "10.1.0.5"}),
        ("net.nat.add_dnat", {"port": 8080, "to_addr": inside_subnet}),
        ("net.nat.add_snat", {"source": subnet}),
    ):
        assert d.error(method, **params).code == FORBIDDEN, (method, params)
    assert d.call("net.nat.status") == before


def test_closed_dnat_of_metadata_address(netd: Net) -> None:
    """A DNAT for 169.254.169.254:80 (den's metadata service inside every workspace)
    sends the workspaces' metadata requests, with their bearer tokens, to another host."""
    d, _ns = netd
    made = None
    try:
        try:
            made = d.call("net.nat.add_dnat", port=80, dst="169.254.169.254", to_addr="10.77.0.66")
        except Exception as exc:  # noqa: BLE001
            assert getattr(exc, "code", None) == FORBIDDEN, exc
            return
        pytest.fail("a DNAT of the metadata address 169.254.169.254:80 was accepted")
    finally:
        if made:
            d.call("net.nat.remove_dnat", id=made["id"])


def test_closed_dnat_without_iface_catches_forwarded_workspace_traffic(netd: Net) -> None:
    """net.nat.add_dnat is 'forward a port arriving here', but its rule sits in prerouting
    with no test that the packet is for this host: every forwarded packet to that port,
    each workspace's outgoing HTTPS to any server included, is rewritten to to_addr. The
    rule must match only local destinations (fib daddr type local) or exclude den's
    bridge."""
    d, ns = netd
    made = d.call("net.nat.add_dnat", port=443, to_addr="10.77.0.66")
    try:
        rule = node_rules(ns, d.instance)[f"den:{made['id']}"]
        text = __import__("json").dumps(rule["expr"])
        local_only = '"fib"' in text and '"local"' in text
        skips_den = f"den{d.instance}" in text and '"!="' in text
        assert local_only or skips_den, f"the DNAT rule hijacks forwarded traffic: {text}"
    finally:
        d.call("net.nat.remove_dnat", id=made["id"])


def test_closed_other_instance_tap_names_not_reserved(netd: Net) -> None:
    """den's bridges and veths are reserved for every instance (den<N>, d<N>-), its taps
    only for this one: t<N>- of another instance on the host is free to take or delete."""
    d, _ns = netd
    name = f"t{d.instance + 1}-hostile"
    made = False
    try:
        try:
            d.call("net.vm.create_tap", name=name)
            made = True
        except Exception as exc:  # noqa: BLE001
            assert getattr(exc, "code", None) == FORBIDDEN, exc
            return
        pytest.fail(f"{name}, in another den instance's tap namespace, was created")
    finally:
        if made:
            d.call("net.vm.delete_tap", name=name)


def test_closed_remove_rule_deletes_any_host_firewall_rule(netd: Net) -> None:
    """net.firewall.add_rule can only add an accept (it cannot undo another table's drop);
    net.firewall.remove_rule by handle deletes any rule of any table not named den*: the
    host firewall's drop of a port goes with a write grant on net.firewall.*."""
    d, ns = netd
    t = {"family": "inet", "table": "hostfw"}
    nft(
        ns,
        {"add": {"table": {"family": "inet", "name": "hostfw"}}},
        {
            "add": {
                "chain": {
                    **t,
                    "name": "input",
                    "type": "filter",
                    "hook": "input",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        },
        {
            "add": {
                "rule": {
                    **t,
                    "chain": "input",
                    "comment": "host-drop",
                    "expr": [
                        {
                            "match": {
                                "op": "==",
                                "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                "right": 6000,
                            }
                        },
                        {"drop": None},
                    ],
                }
            }
        },
    )
    try:
        listed = nft(ns, {"list": {"table": {"family": "inet", "name": "hostfw"}}})
        handle = next(i["rule"]["handle"] for i in listed["nftables"] if "rule" in i)
        try:
            d.call("net.firewall.remove_rule", family="inet", table="hostfw", chain="input",
                   handle=handle)  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            # Refused as protected, or (remove_rule takes a record id only) as a parameter
            # the method does not have.
            assert getattr(exc, "code", None) in (FORBIDDEN, -32602), exc
        after = nft(ns, {"list": {"table": {"family": "inet", "name": "hostfw"}}})
        assert any("rule" in i for i in after["nftables"]), "the host's drop rule was deleted"
    finally:
        nft(ns, {"delete": {"table": {"family": "inet", "name": "hostfw"}}})


def test_closed_restore_enslaves_what_is_now_the_default_route_interface(netd: Net) -> None:
    """A port recorded when its interface was an ordinary LAN port is put back at start
    even though the interface now carries the default route: restore never asks
    net_state.protected_reason. (Restart of the module's daemon.)"""
    d, ns = netd
    inside(ns, lambda: _add_veth("hlan9"))
    d.call("net.bridge.add", name="hbr9")
    try:
        d.call("net.bridge.add_port", bridge="hbr9", port="hlan9")
        d.stop()
        # The world changes while den is down: hlan9 leaves the bridge and becomes the
        # host's way out (a default route of its own).

        def change(ipr: IPRoute) -> None:
            ipr.link("set", index=_idx(ipr, "hlan9"), master=0)
            ipr.addr("add", index=_idx(ipr, "hlan9"), address="198.19.0.1", prefixlen=24)
            ipr.route("add", dst="0.0.0.0", dst_len=0, gateway="198.19.0.254", priority=70)

        _in(ns, change)
        d.start()
        assert "hlan9" in d.call("net.status")["default_route_devs"]
        assert link(ns, "hlan9")["master"] is None, (  # type: ignore[index]
            "den's restore enslaved hlan9, which now carries a default route, to hbr9"
        )
    finally:
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        inside(ns, lambda: links.delete_link("hlan9"))
        with contextlib.suppress(Exception):
            d.call("net.bridge.delete", name="hbr9")


# -- vol: protected objects ---------------------------------------------------------------


def _ext4(dev: str) -> None:
    assert run("mkfs.ext4", "-q", "-F", dev).returncode == 0


def test_closed_unmount_takes_a_host_mount_stacked_on_a_den_mount(
    vd: Daemon, loops: Callable[[int], str], root: Path
) -> None:
    """vol.unmount checks that den recorded a mount at the point, then runs `umount point`,
    which takes the topmost mount there: a host mount made over den's afterwards goes
    instead (a mount den did not make), and the record is forgotten though den's mount
    stays."""
    dev = loops(64)
    _ext4(dev)
    point = root / "m"
    vd.call("vol.mount", device=dev, mount_point=str(point))
    assert run("mount", "-t", "tmpfs", "hosttmp", str(point)).returncode == 0

    def top() -> str:
        with open("/proc/self/mountinfo") as f:
            found = [ln.split(" - ")[1].split()[1] for ln in f if ln.split()[4] == str(point)]
        return found[-1]

    assert top() == "hosttmp"
    try:
        with contextlib.suppress(Exception):
            vd.call("vol.unmount", mount_point=str(point))
        assert top() == "hosttmp", "vol.unmount took the host's tmpfs mounted over den's mount"
    finally:
        # The host's mount first, then den's (and its record) goes the API's way.
        if top() == "hosttmp":
            run("umount", str(point))
        with contextlib.suppress(Exception):
            vd.call("vol.unmount", mount_point=str(point))


def test_closed_mount_hides_a_host_mount_below_it(
    vd: Daemon, loops: Callable[[int], str], root: Path
) -> None:
    """vol.mount refuses a point where something is mounted, but not a parent of one: a
    mount at /srv/backup hides the host's /srv/backup/disk1 (a mount den did not make)."""
    dev = loops(64)
    _ext4(dev)
    host = root / "a" / "b"
    host.mkdir(parents=True)
    assert run("mount", "-t", "tmpfs", "hostb", str(host)).returncode == 0
    (host / "host-data").write_text("x")
    err = None
    try:
        try:
            vd.call("vol.mount", device=dev, mount_point=str(root / "a"))
        except Exception as exc:  # noqa: BLE001
            err = exc
        assert (host / "host-data").exists(), f"the host's mount {host} is hidden by den's mount"
        assert getattr(err, "code", None) == FORBIDDEN
    finally:
        # den's mount first: the host's tmpfs under it is out of reach until it goes
        # (the root fixture's deepest-first order would miss it).
        if err is None:
            with contextlib.suppress(Exception):
                vd.call("vol.unmount", mount_point=str(root / "a"))
        run("umount", "--lazy", str(host))


def test_closed_mount_option_errors_panic(
    vd: Daemon, loops: Callable[[int], str], root: Path
) -> None:
    """errors=panic is an allowed option: with a vol.mount grant, any I/O error on that
    volume (a pulled USB disk, a bad sector) panics the node's kernel."""
    dev = loops(64)
    _ext4(dev)
    point = root / "p"
    before = mount_points()
    try:
        vd.call("vol.mount", device=dev, mount_point=str(point), options=["errors=panic"])
    except Exception as exc:  # noqa: BLE001
        assert getattr(exc, "code", None) == -32602, exc
    assert str(point) not in mount_points() - before, "mounted with errors=panic"


@pytest.fixture
def pool_alias(vd: Daemon) -> Iterator[str]:
    """A second loop device on the pool's image, reached by a hard link (an admin's
    `losetup` of a backup path, a bind mount, a copy tool): the same blocks as the pool."""
    alias = vd.data_dir / f"alias-{secrets.token_hex(2)}.img"
    os.link(vd.data_dir / "pool.img", alias)
    dev = ""
    try:
        dev = subprocess.run(["losetup", "-f", "--show", str(alias)], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        yield dev
    finally:
        if dev:
            run("losetup", "-d", dev)
        alias.unlink()


def test_closed_pool_image_through_another_path_not_protected(vd: Daemon, pool_alias: str) -> None:
    """The pool's loop device is recognised by its backing file's *path*: a loop device on
    the same file by another name (hard link, bind mount) is not protected, and with
    force=true create_filesystem would format den's pool under it. (Called without force:
    nothing is written either way.)"""
    disks = {d["name"]: d for d in vd.call("vol.list_disks")}
    assert disks[os.path.basename(pool_alias)]["protected"], (
        f"{pool_alias} (the pool's image by another path) is not protected"
    )
    err = None
    try:
        vd.call("vol.create_filesystem", device=pool_alias, fstype="ext4")
    except Exception as exc:  # noqa: BLE001
        err = exc
    assert getattr(err, "code", None) == FORBIDDEN, err


@pytest.mark.parametrize("opt", ["nobarrier", "errors=panic", "dax", "remount", "uid=0"])
def test_mount_options_outside_the_allow_list_refused(
    vd: Daemon, loops: Callable[[int], str], root: Path, opt: str
) -> None:
    dev = loops(64)
    _ext4(dev)
    before = mount_points()
    err = vd.error("vol.mount", device=dev, mount_point=str(root / "o"), options=[opt])
    assert err.code == -32602 and "options" in str(err.data or err.message), err
    assert mount_points() == before


def test_mount_uses_the_kernel_node_not_the_callers_link(
    vd: Daemon, loops: Callable[[int], str], root: Path
) -> None:
    """A path under /dev that is a link (a udev by-label link a label steers) is resolved
    once: den mounts and records /dev/<kernel name>, and later link changes do not matter."""
    dev = loops(64)
    _ext4(dev)
    alias = Path(f"/dev/den-test-{secrets.token_hex(3)}")
    alias.symlink_to(dev)
    try:
        got = vd.call("vol.mount", device=str(alias), mount_point=str(root / "l"))
        assert got["device"] == dev
        entries = vd.call("vol.verify")["entries"]
        assert [m["device"] for m in entries if m["mount_point"] == str(root / "l")] == [dev]
        assert "noexec" in got["options"]  # nothing on the volume runs unless asked
        vd.call("vol.unmount", mount_point=str(root / "l"))
    finally:
        alias.unlink()


def test_restore_rechecks_mount_points(vd: Daemon, loops: Callable[[int], str], root: Path) -> None:
    """At start a recorded mount is mounted again only where vol.mount would mount it now:
    a point that became a symlink out of the roots, or has a host mount below it, is not
    mounted over; its record is pruned with an audit event. (Restart of the module's daemon.)"""
    d = vd
    devs = {"s": loops(64), "b": loops(64)}
    for dev in devs.values():
        _ext4(dev)
    for key, dev in devs.items():
        d.call("vol.mount", device=dev, mount_point=str(root / key))
    d.stop()
    outside = Path(tempfile.mkdtemp(prefix="den-vol-out-"))
    try:
        for key in devs:
            assert run("umount", str(root / key)).returncode == 0
        # The world changes while den is down.
        (root / "s").rmdir()
        (root / "s").symlink_to(outside)
        (root / "b" / "host").mkdir()
        assert run("mount", "-t", "tmpfs", "hostbelow", str(root / "b" / "host")).returncode == 0
        d.start()
        assert not any(m.startswith(str(outside)) for m in mount_points()), (
            "den mounted through a symlink leading out of vol_mount_roots"
        )
        assert str(root / "b") not in mount_points(), "den hid the host's mount below its point"
        assert d.call("vol.verify")["entries"] == []
        pruned = {e["target"]: e for e in audit(d, "vol.prune")}
        for key, dev in devs.items():
            assert f"mount:{dev} -> {root / key}" in pruned
    finally:
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        run("umount", "--lazy", str(root / "b" / "host"))
        with contextlib.suppress(OSError):
            (root / "s").unlink()
        for key in devs:
            with contextlib.suppress(Exception):
                d.call("vol.unmount", mount_point=str(root / key))
        shutil.rmtree(outside, ignore_errors=True)


def test_vol_mount_roots_overlapping_dens_data_refused() -> None:
    """vol_mount_roots that hold den's data_dir (its database, pool, workspaces' views) or
    lie inside it stop den at start with an error naming both."""
    from den.config import Settings

    for roots, data in (
        ([Path("/srv")], "/srv/den"),
        ([Path("/var/lib/den/pool")], "/var/lib/den"),
    ):
        with pytest.raises(ValueError, match=r"vol_mount_roots.*overlap"):
            Settings(data_dir=Path(data), vol_mount_roots=roots)
    assert Settings(data_dir=Path("/var/lib/den")).vol_mount_roots == [Path("/mnt"), Path("/srv")]
