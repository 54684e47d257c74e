"""The instance's network: bridge, firewall, ip_forward; per-workspace netns + veth.

Host changes are undone when the last workspace goes: the bridge and the
tables are removed and ip_forward gets back the value it had before den.

Forwarding: on this kernel (6.18) net.ipv4.conf.<if>.forwarding is checked on
the interface a packet arrives on. With it on for den's bridge only, a
workspace's packets leave, but the de-NATed replies arrive on the uplink and
are not forwarded (measured: the SYN goes out, the SYN-ACK counts as an
InAddrError). Per-interface forwarding would need the uplink(s) too, which
makes the host a router for everything arriving there, and the uplink can
change. So den sets the global flag, and when it was off before den, each
instance's table drops IPv4 forwarding that involves no den bridge
(firewall.Policy.guard_forward): the host forwards for den and nobody else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from den.errors import BackendFailure
from den.net import firewall, ipam, links, names
from den.net.firewall import Exception4

log = logging.getLogger(__name__)
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# Shared by every instance on the host: the value ip_forward had before any den
# turned it on, restored when the last den bridge goes. /run empties at boot,
# as ip_forward resets.
FORWARD_BEFORE = Path("/run/den/ip_forward.before")
RESOLV_CONF = Path("/etc/resolv.conf")
# Where the admin exceptions of every workspace come from (the database).
ExceptionSource = Callable[[], Awaitable[list[Exception4]]]


def host_nameservers() -> list[str]:
    """The host's nameservers, loopback ones left out (a workspace cannot reach them)."""
    found = []
    try:
        lines = RESOLV_CONF.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if not addr.is_loopback:
                found.append(str(addr))
    return found


def host_resolvers4() -> list[str]:
    """The host's IPv4 nameservers a workspace is given (not loopback ones)."""
    return [a for a in host_nameservers() if ":" not in a]


class Network:
    def __init__(self, instance: int, subnet: str, egress: bool, ports: list[int]) -> None:
        self.instance = instance
        self.subnet = subnet
        self.egress = egress
        self.ports = ports
        self.web_uid: int | None = None  # den.web's Caddy, once it runs
        self.bridge = names.bridge(instance)
        self.gateway = ipam.gateway(subnet)
        self.prefixlen = ipaddress.IPv4Network(subnet).prefixlen
        self._lock = asyncio.Lock()
        self._ensured = False
        self.exceptions: list[Exception4] = []
        # Set by the egress service; without it no exception is open.
        self.exception_source: ExceptionSource | None = None

    # -- instance-wide ---------------------------------------------------------
    async def ensure(self, *, check: bool = False) -> None:
        """Bridge, firewall and forwarding in place (idempotent).

        Done once per process unless ``check`` (the reconciler re-applies it,
        in case someone flushed the ruleset).
        """
        if self._ensured and not check:
            return
        async with self._lock:
            if self.exception_source is not None:
                self.exceptions = await self.exception_source()
            await asyncio.to_thread(self._ensure)
            self._ensured = True

    def policy(self, *, guard_forward: bool) -> firewall.Policy:
        return firewall.Policy(
            bridge=self.bridge,
            subnet=self.subnet,
            ports=self.ports,
            egress=self.egress,
            resolvers=host_resolvers4(),
            exceptions=self.exceptions,
            guard_forward=guard_forward,
            web_uid=self.web_uid,
        )

    def _ensure(self) -> None:
        links.ensure_bridge(self.bridge, str(self.gateway))
        # Decided before forwarding goes on, so that it never runs unguarded.
        off_before = IP_FORWARD.read_text().strip() == "0" or self.forward_before() == "0"
        firewall.apply(self.instance, self.policy(guard_forward=self.egress and off_before))
        if self.egress:
            self._set_forward()

    async def refresh_exceptions(self) -> None:
        """Bring the exception sets in step with the database (rules, workspaces)."""
        if self.exception_source is None:
            return
        async with self._lock:
            current = await self.exception_source()
            if current == self.exceptions:
                return  # most attaches and detaches: no rule names the workspace
            if self._ensured:
                await asyncio.to_thread(self._update_exceptions, current)
            self.exceptions = current

    def _update_exceptions(self, current: list[Exception4]) -> None:
        try:
            firewall.update_exceptions(self.instance, current)
        except BackendFailure:
            self.exceptions = current
            # The table went (someone flushed the ruleset): put all of it back.
            self._ensure()

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
        await self.refresh_exceptions()

    async def detach(self, ws_id: str) -> None:
        def work() -> None:
            links.detach(names.veth(self.instance, ws_id), self.bridge)
            links.delete_netns(names.netns(self.instance, ws_id))

        await asyncio.to_thread(work)
        # The address may go to another workspace next: its exceptions go now.
        await self.refresh_exceptions()

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
