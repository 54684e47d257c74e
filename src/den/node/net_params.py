"""Parameters of the net.* methods: every name and address is checked before the kernel sees it.

A hostile value (a name with ``/`` or spaces, longer than IFNAMSIZ, a CIDR
out of range, an unknown family) fails validation: -32602 naming the field,
and nothing is touched.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from den.rpc.registry import CliArg, Params

# What the kernel accepts as an interface name (dev_valid_name), narrowed to
# characters that need no quoting anywhere: at most 15 (IFNAMSIZ - 1).
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

Family = Literal["ipv4", "ipv6"]
Proto = Literal["tcp", "udp"]


def _ifname(value: str) -> str:
    if not _IFNAME.fullmatch(value):
        raise ValueError(
            "an interface name is 1-15 characters of letters, digits, '_', '.' and '-' "
            "(no '/', spaces or ':'), starting with a letter or digit"
        )
    return value


def _cidr(value: str) -> str:
    """A network (host bits clear) of either family."""
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise ValueError(
            "not a CIDR with host bits clear (e.g. 10.1.0.0/24, 2001:db8::/64): "
            "prefix length within the family's range"
        ) from None
    return str(net)


def _addr(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("not an IPv4 or IPv6 address") from None


def _addr_or_cidr(value: str) -> str:
    """One address or a network, as a CIDR."""
    if "/" in value:
        return _cidr(value)
    return str(ipaddress.ip_network(_addr(value)))


def _mac(value: str) -> str:
    low = value.lower()
    if not _MAC.fullmatch(low) or int(low[:2], 16) & 1:
        raise ValueError("not a unicast MAC address (e.g. 02:00:00:00:00:01)")
    return low


IfName = Annotated[str, Field(min_length=1, max_length=15), AfterValidator(_ifname)]
Cidr = Annotated[str, Field(min_length=1, max_length=50), AfterValidator(_cidr)]
Addr = Annotated[str, Field(min_length=1, max_length=45), AfterValidator(_addr)]
Source = Annotated[str, Field(min_length=1, max_length=50), AfterValidator(_addr_or_cidr)]
Mac = Annotated[str, Field(min_length=17, max_length=17), AfterValidator(_mac)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _version(family: Family) -> int:
    return 4 if family == "ipv4" else 6


class InterfacesQuery(Params):
    name: IfName | None = Field(None, description="Only this interface.")


class RoutesQuery(Params):
    family: Family | None = Field(None, description="ipv4 or ipv6 (default both).")
    table: int = Field(254, ge=1, le=4294967295, description="Routing table (254: main).")


class FamilyQuery(Params):
    family: Family | None = Field(None, description="ipv4 or ipv6 (default both).")


class BridgeQuery(Params):
    name: IfName | None = Field(None, description="Only this bridge.")


class FirewallQuery(Params):
    family: Literal["ip", "ip6", "inet", "arp", "bridge", "netdev"] | None = Field(
        None, description="Only tables of this nftables family."
    )
    table: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Only this table."
    )


class ConntrackQuery(Params):
    zone: int | None = Field(None, ge=0, le=65535, description="Only entries of this zone.")
    limit: int = Field(1000, ge=1, le=100000, description="At most this many entries.")


class ConntrackFlush(Params):
    zone: int | None = Field(
        None, ge=0, le=65535, description="Only entries of this zone (default every entry)."
    )


class RouteSpec(Params):
    dst: Annotated[Cidr, CliArg()] = Field(description="Destination network (CIDR).")
    gateway: Addr | None = Field(None, description="Next hop.")
    dev: IfName | None = Field(None, description="Outgoing interface.")
    metric: int = Field(0, ge=0, le=4294967295, description="Route priority.")
    table: int = Field(254, ge=1, le=4294967295, description="Routing table (254: main).")

    @model_validator(mode="after")
    def _check(self) -> RouteSpec:
        if self.gateway is None and self.dev is None:
            raise ValueError("give a gateway, a dev or both")
        version = ipaddress.ip_network(self.dst).version
        if self.gateway is not None and ipaddress.ip_address(self.gateway).version != version:
            raise ValueError("gateway and dst are of different families")
        if self.table in (0, 253, 255):
            raise ValueError("tables 0, 253 (default) and 255 (local) are the kernel's")
        return self


class BridgeAdd(Params):
    name: Annotated[IfName, CliArg()] = Field(description="The bridge's name.")
    stp: bool = Field(False, description="Spanning tree on.")
    mtu: int | None = Field(None, ge=68, le=65535, description="MTU.")


class NameParam(Params):
    name: Annotated[IfName, CliArg()] = Field(description="The interface's name.")


class BridgePort(Params):
    bridge: Annotated[IfName, CliArg()] = Field(description="The bridge.")
    port: Annotated[IfName, CliArg()] = Field(description="The interface to add or remove.")


class BridgeConnect(Params):
    bridge: Annotated[IfName, CliArg()] = Field(description="One bridge.")
    peer: Annotated[IfName, CliArg()] = Field(description="The other bridge.")

    @model_validator(mode="after")
    def _check(self) -> BridgeConnect:
        if self.bridge == self.peer:
            raise ValueError("a bridge cannot be connected to itself")
        return self


class TapCreate(Params):
    name: Annotated[IfName, CliArg()] = Field(description="The tap's name.")
    bridge: IfName | None = Field(None, description="Attach to this bridge.")
    mtu: int | None = Field(None, ge=68, le=65535, description="MTU.")
    mac: Mac | None = Field(None, description="MAC address (default: the kernel's random one).")
    uid: int | None = Field(
        None, ge=0, le=4294967294, description="Owner: this uid may open the tap."
    )


class RuleAdd(Params):
    """An input allow rule in den's node table."""

    proto: Proto | Literal["icmp", "icmpv6", "any"] = Field(
        "tcp", description="tcp, udp, icmp, icmpv6 or any."
    )
    port: Port | None = Field(None, description="Destination port (tcp/udp).")
    port_end: Port | None = Field(None, description="Last port of a range from port.")
    source: Source | None = Field(None, description="Only from this address or network.")
    iface: IfName | None = Field(None, description="Only arriving on this interface.")
    family: Family | None = Field(None, description="ipv4 or ipv6 (default both).")
    comment: str = Field(
        "", max_length=100, pattern=r"^[A-Za-z0-9 _.,:/-]*$", description="Why (a note, kept)."
    )

    @model_validator(mode="after")
    def _check(self) -> RuleAdd:
        if self.port is not None and self.proto not in ("tcp", "udp"):
            raise ValueError("a port needs proto tcp or udp")
        if self.port_end is not None and (self.port is None or self.port_end < self.port):
            raise ValueError("port_end needs a port not above it")
        if (
            self.source is not None
            and self.family is not None
            and ipaddress.ip_network(self.source).version != _version(self.family)
        ):
            raise ValueError("source is not of the given family")
        if self.proto == "icmp" and self.family == "ipv6":
            raise ValueError("icmp is ipv4's: use icmpv6")
        if self.proto == "icmpv6" and self.family == "ipv4":
            raise ValueError("icmpv6 is ipv6's: use icmp")
        return self


class IdParam(Params):
    id: Annotated[int, CliArg()] = Field(ge=1, description="The record's id (from the add).")


class DnatAdd(Params):
    proto: Proto = Field("tcp", description="tcp or udp.")
    port: Port = Field(description="The port connections arrive on.")
    to_addr: Addr = Field(description="Where they go.")
    to_port: Port | None = Field(None, description="The port they go to (default the same).")
    iface: IfName | None = Field(None, description="Only arriving on this interface.")
    dst: Addr | None = Field(None, description="Only to this local address.")

    @model_validator(mode="after")
    def _check(self) -> DnatAdd:
        if (
            self.dst is not None
            and ipaddress.ip_address(self.dst).version != ipaddress.ip_address(self.to_addr).version
        ):
            raise ValueError("dst and to_addr are of different families")
        return self


class SnatAdd(Params):
    source: Source = Field(description="Traffic from this address or network.")
    oif: IfName | None = Field(None, description="Only leaving on this interface.")
    to_addr: Addr | None = Field(None, description="Rewrite to this address (default masquerade).")

    @model_validator(mode="after")
    def _check(self) -> SnatAdd:
        version = ipaddress.ip_network(self.source).version
        if self.to_addr is not None and ipaddress.ip_address(self.to_addr).version != version:
            raise ValueError("source and to_addr are of different families")
        return self
