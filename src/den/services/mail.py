"""Mail settings an admin makes at run time: the relay's credentials (den.mail)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from pydantic import BaseModel, Field

from den.mail.outbound import save_relay_login
from den.rpc.registry import Cli, CliOpt, Context, Params, Right, method
from den.services.common import Line


class RelayLogin(Params):
    username: Annotated[Line, CliOpt(flags=("--user",))] = Field(
        min_length=1, max_length=256, description="The relay's user name."
    )
    password: Annotated[str, CliOpt(flags=("--password-file",), read_file=True)] = Field(
        min_length=1,
        max_length=4096,
        description="The relay's password (the CLI reads it from a file; stored sealed).",
    )


class RelayLoginOut(BaseModel):
    username: str
    relay: str


@method("mail.relay_login", right=Right.admin, cli=Cli("mail relay-login"))
async def relay_login(ctx: Context, p: RelayLogin) -> RelayLoginOut:
    """Set the credentials den logs in to mail_relay with (the password sealed at rest)."""
    ctx.require_admin("set the mail relay's credentials")
    # A file's trailing newline is not part of a password.
    password = p.password.removesuffix("\n").removesuffix("\r")
    await asyncio.to_thread(save_relay_login, ctx.app.settings.data_dir, p.username, password)
    return RelayLoginOut(username=p.username, relay=ctx.app.settings.mail_relay)
