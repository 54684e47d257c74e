"""``den info`` and ``den ssh-config``: how to reach this den over ssh."""

from __future__ import annotations

import socket

from pydantic import BaseModel, Field
from sqlalchemy import select

from den import __version__
from den.db.models import User, Workspace
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
    )


class SshConfigParams(Params):
    host: str | None = Field(
        None,
        max_length=253,
        description="Host name or address clients use (default: this host's name).",
    )
    prefix: str = Field("den-", max_length=32, description="Prefix of each Host alias.")


@method("ssh.config", right=Right.read, cli=Cli("ssh-config"))
async def ssh_config(ctx: Context, p: SshConfigParams) -> str:
    """A ~/.ssh/config block with a Host per workspace of yours (OpenSSH, VS Code Remote-SSH)."""
    s = ctx.app.settings
    host = p.host or socket.getfqdn()
    port = ctx.app.ssh_port or s.ssh_port
    q = select(Workspace.name, User.name).join(User, Workspace.user_id == User.id)
    q = q.where(Workspace.state != "deleting", Workspace.user_id == (ctx.caller.user_id or -1))
    rows = (await ctx.db.execute(q.order_by(Workspace.name))).all()
    blocks = [f"# den {s.instance}: `ssh {p.prefix}NAME`, or pick it in VS Code's Remote-SSH list"]
    for ws_name, _owner in rows:
        blocks.append(
            f"Host {p.prefix}{ws_name}\n    HostName {host}\n    Port {port}\n    User {ws_name}\n"
        )
    blocks.append(f"Host {p.prefix.rstrip('-') or 'den'}\n    HostName {host}\n    Port {port}\n")
    return "\n".join(blocks)
