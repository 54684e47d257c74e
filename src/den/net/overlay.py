"""The host's address on an overlay network (Mycelium: 400::/7), where den also
serves its HTTP listener (dashboard and API) when ``http_overlay`` says so.

Addresses are read from the kernel over netlink (pyroute2), never by parsing
``ip``'s output.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from pyroute2 import IPRoute

if TYPE_CHECKING:
    from den.app import App

MYCELIUM = ipaddress.IPv6Network("400::/7")
_SCOPE_GLOBAL = 0
# Not (yet, or any more) an address a listener can bind or peers reach.
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40
_UNUSABLE = _IFA_F_DADFAILED | _IFA_F_TENTATIVE

_serving: WeakKeyDictionary[App, tuple[str, int]] = WeakKeyDictionary()


def _host_addresses() -> list[tuple[ipaddress.IPv6Address, int, int]]:
    """Every IPv6 address on the host's interfaces: (address, scope, flags)."""
    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET6):
            text = msg.get_attr("IFA_ADDRESS")
            if not text:
                continue
            # IFA_FLAGS holds all 32 bits; the header's byte only the low ones.
            flags = msg.get_attr("IFA_FLAGS")
            flags = int(msg["flags"] if flags is None else flags)
            out.append((ipaddress.IPv6Address(text), int(msg["scope"]), flags))
    return out


def addresses(network: ipaddress.IPv6Network = MYCELIUM) -> list[str]:
    """The host's global, usable addresses in ``network``, in the kernel's order."""
    return [
        str(ip)
        for ip, scope, flags in _host_addresses()
        if ip in network and scope == _SCOPE_GLOBAL and not flags & _UNUSABLE
    ]


def choose(setting: str) -> str | None:
    """The address ``http_overlay`` asks for on this host, or None.

    ``off``: none; ``auto``: the first overlay address found, if any; an address:
    that one, which must be the host's (ValueError otherwise)."""
    if setting == "off":
        return None
    if setting == "auto":
        found = addresses()
        return found[0] if found else None
    wanted = ipaddress.IPv6Address(setting)
    if not any(ip == wanted for ip, _, _ in _host_addresses()):
        raise ValueError(
            f"http_overlay = {setting} is not an address of this host's interfaces "
            "(`ip -6 addr` lists them); set auto or off, or the right address"
        )
    return str(wanted)


def url(addr: str, port: int) -> str:
    return f"http://[{addr}]:{port}"


def record(app: App, address: str, port: int) -> None:
    """The daemon serves on ``address`` (for ``den info``)."""
    _serving[app] = (address, port)


def serving(app: App) -> tuple[str, str]:
    """The overlay address the daemon serves on and its URL ("", "": none)."""
    found = _serving.get(app)
    return (found[0], url(*found)) if found else ("", "")
