"""The instance's nftables tables: isolation, host protection and egress NAT.

Two tables per instance, replaced atomically as a whole:

* ``inet denN``: workspaces reach nothing on the host but den's own
  listeners; nothing from outside reaches into a workspace; only root (den
  itself) on the host may open connections to workspace addresses; egress
  is allowed or not.
* ``ip denN-nat``: masquerade of the subnet's traffic that leaves the host.
"""

from __future__ import annotations

import json
from typing import Any

from den.errors import BackendFailure

try:
    import nftables
except ImportError:  # pragma: no cover - reported by `den init --check`
    nftables = None


def _nft() -> Any:
    if nftables is None:
        raise BackendFailure("python3-nftables is not installed; run `den init`")
    nft = nftables.Nftables()
    nft.set_json_output(True)
    return nft


def _run(text: str) -> str:
    rc, out, err = _nft().cmd(text)
    if rc != 0:
        raise BackendFailure(f"nftables refused the ruleset: {err.strip()}")
    return str(out)


def ruleset(instance: int, bridge: str, subnet: str, ports: list[int], egress: bool) -> str:
    table, nat = f"den{instance}", f"den{instance}-nat"
    allowed = ", ".join(str(p) for p in sorted(set(ports)) if p) or "0"
    forward_out = "accept" if egress else "drop"
    return f"""
add table inet {table}
delete table inet {table}
table inet {table} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{bridge}" ct state established,related accept
        iifname "{bridge}" tcp dport {{ {allowed} }} accept
        iifname "{bridge}" counter drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{bridge}" oifname "{bridge}" counter drop
        oifname "{bridge}" ct state established,related accept
        oifname "{bridge}" counter drop
        iifname "{bridge}" counter {forward_out}
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        oifname "{bridge}" meta skuid != 0 counter reject
    }}
}}
add table ip {nat}
delete table ip {nat}
table ip {nat} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != "{bridge}" masquerade
    }}
}}
"""


def apply(instance: int, bridge: str, subnet: str, ports: list[int], egress: bool) -> None:
    _run(ruleset(instance, bridge, subnet, ports, egress))


def remove(instance: int) -> None:
    for family, name in (("inet", f"den{instance}"), ("ip", f"den{instance}-nat")):
        rc, _out, _err = _nft().cmd(f"delete table {family} {name}")
        del rc  # missing is fine


def tables(instance: int) -> list[str]:
    """Names of this instance's tables present in the kernel."""
    out = json.loads(_run("list tables") or "{}")
    names = []
    for item in out.get("nftables", []):
        t = item.get("table")
        if t and t["name"] in (f"den{instance}", f"den{instance}-nat"):
            names.append(f"{t['family']} {t['name']}")
    return sorted(names)


def show(instance: int) -> str:
    """The instance's ruleset as nft prints it."""
    nft = nftables.Nftables() if nftables else None
    if nft is None:
        return ""
    parts = []
    for family, name in (("inet", f"den{instance}"), ("ip", f"den{instance}-nat")):
        rc, out, _err = nft.cmd(f"list table {family} {name}")
        if rc == 0:
            parts.append(out)
    return "\n".join(parts)
