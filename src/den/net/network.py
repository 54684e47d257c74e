"""The instance's network: bridge, firewall, ip_forward; per-workspace netns + veth.

Host changes are undone when the last workspace goes: the bridge and the
tables are removed and ip_forward gets back the value it had before den.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

from den.net import firewall, ipam, links, names

log = logging.getLogger(__name__)
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# Shared by every instance on the host: the value ip_forward had before any den
# turned it on, restored when the last den bridge goes. /run empties at boot,
# as ip_forward resets.
FORWARD_BEFORE = Path("/run/den/ip_forward.before")


class Network:
    def __init__(self, instance: int, subnet: str, egress: bool, ports: list[int]) -> None:
        self.instance = instance
        self.subnet = subnet
        self.egress = egress
        self.ports = ports
        self.bridge = names.bridge(instance)
        self.gateway = ipam.gateway(subnet)
        self.prefixlen = ipaddress.IPv4Network(subnet).prefixlen
        self._lock = asyncio.Lock()
        self._ensured = False

    # -- instance-wide ---------------------------------------------------------
    async def ensure(self, *, check: bool = False) -> None:
        """Bridge, firewall and forwarding in place (idempotent).

        Done once per process unless ``check`` (the reconciler re-applies it,
        in case someone flushed the ruleset).
        """
        if self._ensured and not check:
            return
        async with self._lock:
            await asyncio.to_thread(self._ensure)
            self._ensured = True

    def _ensure(self) -> None:
        links.ensure_bridge(self.bridge, str(self.gateway))
        firewall.apply(self.instance, self.bridge, self.subnet, self.ports, self.egress)
        if self.egress:
            self._set_forward()

    def _set_forward(self) -> None:
        current = IP_FORWARD.read_text().strip()
        if current == "1":
            return
        FORWARD_BEFORE.parent.mkdir(parents=True, exist_ok=True)
        if not FORWARD_BEFORE.exists():
            FORWARD_BEFORE.write_text(current)
        IP_FORWARD.write_text("1")
        log.info("enabled net.ipv4.ip_forward for workspace egress (was %s)", current)

    @staticmethod
    def forward_before() -> str | None:
        try:
            return FORWARD_BEFORE.read_text().strip() or None
        except OSError:
            return None

    async def teardown(self) -> None:
        """Undo every host change of this instance (when no workspace is left)."""
        async with self._lock:
            await asyncio.to_thread(self._teardown)

    def _teardown(self) -> None:
        self._ensured = False
        firewall.remove(self.instance)
        links.delete_link(self.bridge)
        others = [n for n in links.link_names("den") if n != self.bridge and n[3:].isdigit()]
        before = self.forward_before()
        if before is not None and not others:
            IP_FORWARD.write_text(before)
            FORWARD_BEFORE.unlink(missing_ok=True)
            log.info("restored net.ipv4.ip_forward to %s", before)

    def host_changes(self) -> dict[str, object]:
        """What this instance has changed on the host, for `den init --check`.

        Uses netlink: call it from a worker thread, never from the event loop.
        """
        return {
            "bridge": self.bridge if links.link_exists(self.bridge) else None,
            "nftables": firewall.tables(self.instance),
            "ip_forward_before": self.forward_before(),
        }

    async def set_ports(self, ports: list[int]) -> None:
        """The ports of den's listeners workspaces may reach; re-applied if in place."""
        if sorted(ports) == sorted(self.ports):
            return
        self.ports = ports
        if self._ensured:
            await self.ensure(check=True)

    # -- per workspace ---------------------------------------------------------
    async def attach(self, ws_id: str, address: str) -> None:
        ns = names.netns(self.instance, ws_id)
        veth = names.veth(self.instance, ws_id)

        def work() -> None:
            links.create_netns(ns)
            links.attach(ns, veth, self.bridge, address, self.prefixlen, str(self.gateway.ip))

        await asyncio.to_thread(work)

    async def detach(self, ws_id: str) -> None:
        def work() -> None:
            links.delete_link(names.veth(self.instance, ws_id))
            links.delete_netns(names.netns(self.instance, ws_id))

        await asyncio.to_thread(work)

    def netns_path(self, ws_id: str) -> Path:
        return links.NETNS_DIR / names.netns(self.instance, ws_id)

    def present(self, ws_id: str) -> bool:
        return links.netns_exists(names.netns(self.instance, ws_id)) and links.link_exists(
            names.veth(self.instance, ws_id)
        )

    def orphans(self, known: set[str]) -> list[str]:
        """Workspace ids with a netns or veth on the host but no record."""
        ids = set()
        ns_prefix = names.netns(self.instance, "")
        for n in links.netns_names(ns_prefix):
            ids.add(n[len(ns_prefix) :])
        vp = names.veth_prefix(self.instance)
        for n in links.link_names(vp):
            ids.add(n[len(vp) :])
        # veth names are truncated ids: match them by prefix
        return sorted(i for i in ids if not any(k.startswith(i) for k in known))

    def counters(self, ws_id: str) -> tuple[int, int]:
        return links.counters(names.veth(self.instance, ws_id))
