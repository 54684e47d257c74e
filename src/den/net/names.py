"""Host object names of one den instance; every name carries the instance."""

from __future__ import annotations


def prefix(instance: int) -> str:
    return f"den{instance}"


def bridge(instance: int) -> str:
    return f"den{instance}"


def netns(instance: int, ws_id: str) -> str:
    return f"den{instance}-{ws_id}"


def veth(instance: int, ws_id: str) -> str:
    # IFNAMSIZ: at most 15 characters.
    return f"d{instance}-{ws_id}"[:15]


def veth_prefix(instance: int) -> str:
    return f"d{instance}-"


def tap(instance: int, ws_id: str) -> str:
    # A microVM's TAP on the bridge; IFNAMSIZ as for veths ("" gives the prefix).
    return f"t{instance}-{ws_id}"[:15]
