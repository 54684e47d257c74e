"""Mail for workspaces: ``NAME.OWNER@mail_domain`` is workspace NAME of OWNER.

Inbound (:mod:`den.mail.inbound`): an SMTP server on the host delivers to
``~/Maildir`` inside the workspace, written there by a process of the
workspace's login user, never by den on the host. Outbound
(:mod:`den.mail.outbound`): an SMTP service at 169.254.169.254:25 inside every
workspace relays through the admin's relay with den's ``From``.
"""

from __future__ import annotations

import re

# den's names (den.services.common.NAME_RE) have no dot, so NAME.OWNER splits one way.
_LOCAL_RE = re.compile(r"([a-z][a-z0-9-]{0,30})\.([a-z][a-z0-9-]{0,30})")


def address(ws_name: str, owner: str, domain: str) -> str:
    """The mail address of ``owner``'s workspace ``ws_name``."""
    return f"{ws_name}.{owner}@{domain}"


def parse(addr: str, domain: str) -> tuple[str, str] | None:
    """(workspace name, owner) that ``addr`` names at ``domain``, or None.

    The domain is compared without case (RFC 5321 2.4); the local part is taken
    in lower case too, as den's names are.
    """
    local, at, dom = addr.rpartition("@")
    if not at or dom.lower().rstrip(".") != domain:
        return None
    m = _LOCAL_RE.fullmatch(local.lower())
    return (m.group(1), m.group(2)) if m else None
