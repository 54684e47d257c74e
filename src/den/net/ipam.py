"""Address allocation inside the instance's subnet (the database holds the truth)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from den.errors import QuotaExceeded


def gateway(subnet: str) -> ipaddress.IPv4Interface:
    net = ipaddress.IPv4Network(subnet)
    return ipaddress.IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}")


def allocate(subnet: str, taken: Iterable[str]) -> str:
    """The lowest free host address of ``subnet``, skipping the gateway."""
    net = ipaddress.IPv4Network(subnet)
    used = {ipaddress.IPv4Address(a) for a in taken}
    used.add(net.network_address + 1)
    for host in net.hosts():
        if host not in used:
            return str(host)
    raise QuotaExceeded(f"no free address left in {subnet}")
