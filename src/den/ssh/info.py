"""``den info`` and ``den ssh-config``: how to reach this den over ssh."""

from __future__ import annotations

import socket

from pydantic import BaseModel, Field
from sqlalchemy import select

from den import __version__
from den.db.models import SshKey, Workspace
from den.rpc.registry import Cli, Context, NoParams, Params, Right, method
from den.ssh import hostkeys


class HostKey(BaseModel):
    algorithm: str
    fingerprint: str
    public_key: str


class Info(BaseModel):
    version: str
    instance: int
    host: str
    ssh_port: int
    http_port: int
    socket: str
    ssh_host_keys: list[HostKey]
    workspace_login: str
    web: str = Field("", description="den's web address (empty: web front door off).")
    https_port: int | None = None
    tls: str = ""
    ca_root: str = Field(
        "", description="Caddy's internal root certificate (tls internal): `den ca` prints it."
    )
    overlay: str = Field(
        "", description="The overlay network address den also serves on (empty: none)."
    )
    overlay_http: str = Field("", description="The API and dashboard at that address.")


@method("system.info", right=Right.read, cli=Cli("info"))
async def system_info(ctx: Context, p: NoParams) -> Info:
    """Show how to reach den: SSH port and host key fingerprints, HTTP port, socket."""
    s = ctx.app.settings
    return Info(
        version=__version__,
        instance=s.instance,
        host=socket.gethostname(),
        ssh_port=ctx.app.ssh_port or s.ssh_port,
        http_port=s.http_port,
        socket=str(s.socket),
        ssh_host_keys=[HostKey(**k) for k in hostkeys.fingerprints(s.data_dir)],
        workspace_login="ssh -p PORT NAME@HOST (yours), OWNER.NAME@HOST (admins); "
        "any other login name: the den shell",
        **_web_info(ctx),
        **_overlay_info(ctx),
    )


def _overlay_info(ctx: Context) -> dict[str, object]:
    from den.net.overlay import serving

    addr, url = serving(ctx.app)
    return {"overlay": addr, "overlay_http": url}


def _web_info(ctx: Context) -> dict[str, object]:
    caddy = ctx.app.caddy
    if caddy is None:
        return {}
    from den.web.urls import home_url

    s = ctx.app.settings
    ca = str(caddy.paths.root_cert) if s.tls == "internal" else ""
    return {"web": home_url(s), "https_port": s.web_port, "tls": s.tls, "ca_root": ca}


class SshConfigParams(Params):
    host: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[A-Za-z0-9.:_-]+$",
        description="Host name or address clients use (default: this host's name).",
    )
    prefix: str = Field(
        "den-",
        max_length=32,
        pattern=r"^[A-Za-z0-9._-]*$",
        description="Prefix of each Host alias.",
    )
    identity_file: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^[^\s\x00-\x1f\x7f\"]+$",
        description="Private key file for every Host (IdentityFile; `--install` finds yours).",
    )


KEEPALIVE = 30  # seconds: ssh notices a dead link in 2 minutes; NAT entries stay alive


@method("ssh.config", right=Right.read, cli=Cli("ssh-config", install="~/.ssh/config"))
async def ssh_config(ctx: Context, p: SshConfigParams) -> str:
    """A ~/.ssh/config block with a Host per workspace of yours (OpenSSH, VS Code Remote-SSH).

    Each Host forwards your agent (git over ssh inside uses your keys) and
    keeps the link alive. `den ssh-config --install` writes it into your
    ~/.ssh/config as a marked block, replaced on the next install.
    """
    s = ctx.app.settings
    host = p.host or socket.getfqdn()
    port = ctx.app.ssh_port or s.ssh_port
    uid = ctx.caller.user_id or -1
    q = select(Workspace.name).where(Workspace.state != "deleting", Workspace.user_id == uid)
    names = (await ctx.db.execute(q.order_by(Workspace.name))).scalars().all()
    keys = (
        (await ctx.db.execute(select(SshKey).where(SshKey.user_id == uid).order_by(SshKey.id)))
        .scalars()
        .all()
    )
    head = [f"# den {s.instance}: `ssh {p.prefix}NAME`, or pick it in VS Code's Remote-SSH list"]
    if p.identity_file is None:
        head += [f"# den key: {k.fingerprint} ({k.algorithm})" for k in keys]
        if keys:
            head.append("#   (add `IdentityFile PATH` below when ssh does not offer it by itself)")
    ident = (
        f"    IdentityFile {p.identity_file}\n    IdentitiesOnly yes\n" if p.identity_file else ""
    )
    common = (
        f"    HostName {host}\n    Port {port}\n{ident}"
        f"    ServerAliveInterval {KEEPALIVE}\n    ServerAliveCountMax 4\n"
    )
    blocks = ["\n".join(head)]
    for name in names:
        blocks.append(f"Host {p.prefix}{name}\n    User {name}\n{common}    ForwardAgent yes\n")
    # The den shell: no agent is forwarded to it (it runs nothing of yours).
    blocks.append(f"Host {p.prefix.rstrip('-') or 'den'}\n{common}")
    return "\n".join(blocks)
