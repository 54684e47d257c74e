"""``den ca``: the root certificate browsers and curl must trust for workspace URLs."""

from __future__ import annotations

import asyncio

from den.errors import Conflict
from den.rpc.registry import Cli, Context, NoParams, Right, method


@method("web.ca", right=Right.read, cli=Cli("ca"))
async def web_ca(ctx: Context, p: NoParams) -> str:
    """Print the root certificate of den's internal CA (PEM): trust it to open workspace
    URLs without warnings, e.g. `den ca > den-root.crt; curl --cacert den-root.crt URL`."""
    caddy = ctx.app.caddy
    if caddy is None:
        raise Conflict("den's web front door is off (web = false); there is no CA")
    if ctx.app.settings.tls != "internal":
        raise Conflict("tls = acme: certificates come from a public CA that browsers already trust")
    path = caddy.paths.root_cert
    try:
        # Written by Caddy (its own account), never by a workspace.
        return await asyncio.to_thread(path.read_text)
    except FileNotFoundError:
        raise Conflict(f"Caddy has not made its root certificate yet ({path})") from None
