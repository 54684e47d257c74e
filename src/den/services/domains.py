"""Custom domains: a name of the owner's that serves one of their workspaces.

``domain.add`` records the claim with a random token and says which records
to create; ``domain.verify`` checks that whoever controls the name's DNS
published the token (a TXT record ``_den-challenge.NAME``). Only a verified
name is served (:func:`domain_target`).

There is no HTTP challenge on purpose: den would have to answer it itself, so
any name whose DNS leads here (a wildcard record, a record left dangling) would
"prove" itself for whichever member claimed it. A TXT record under the name
only its DNS's owner can write.

After a verified name's claim goes (``domain.remove``, or its workspace is
deleted) the name stays reserved for the same owner for :data:`RELEASE_HOLD`,
so a name still pointing here is not taken over by someone else meanwhile.

Names are resolved with ``settings.dns_servers`` when set (tests point it at a
server of their own), else with the system's resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import time
import weakref
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
from pydantic import BaseModel, Field
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from den.config import Settings
from den.db.models import CustomDomain, DomainHold, User, Workspace
from den.errors import BackendFailure, Conflict, InvalidParams, NotFound
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services.common import release_db
from den.services.workspaces import find_workspace
from den.web.labels import label
from den.web.urls import base

if TYPE_CHECKING:
    from den.app import App

CHALLENGE_LABEL = "_den-challenge"
DNS_SECONDS = 3.0
# An unverified claim keeps the name from other workspaces this long; after
# it anyone may claim the name again (so a claim nobody can verify does not
# squat it forever; an admin can remove one at any time).
PENDING_HOLD = timedelta(hours=24)
# A verified name whose claim went stays its owner's this long (admins may
# still give it to anyone): time to re-add it, or to repoint its DNS.
RELEASE_HOLD = timedelta(days=7)
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Names that never reach a public DNS zone: no certificate, no meaning elsewhere.
_SPECIAL = ("localhost", "local", "arpa", "invalid", "internal")


# -- names -------------------------------------------------------------------------


def normalise(text: str, settings: Settings) -> str:
    """The domain as den stores it (lowercase, no trailing dot), or a -32602 naming why not."""
    name = text.strip().lower().removesuffix(".")
    shown = text.strip()[:80]

    def bad(why: str) -> InvalidParams:
        return InvalidParams(f"{shown!r} {why}", field="domain")

    if not name:
        raise InvalidParams("give a domain name, e.g. app.example.com", field="domain")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise bad("is an IP address: a custom domain is a DNS name (e.g. app.example.com)")
    if not name.isascii():
        raise bad("is not ASCII: write an internationalised name in its xn-- form")
    if "*" in name:
        raise bad("is a wildcard: add each name on its own")
    if len(name) > 253:
        raise bad("is longer than 253 characters")
    labels = name.split(".")
    if len(labels) < 2:
        raise bad("is a single label: write the full name (e.g. app.example.com)")
    for part in labels:
        if not _LABEL.fullmatch(part):
            raise bad(
                f"has the label {part[:63]!r}: labels are 1 to 63 letters, digits or '-', "
                "neither starting nor ending with '-'"
            )
    if labels[-1].isdigit():
        raise bad("ends in a numeric label: no top-level domain is numeric")
    own = settings.domain
    if name == own or name.endswith("." + own):
        raise bad(f"is under den's own domain {own}: every workspace has a URL there already")
    if own.endswith("." + name):
        raise bad(
            f"contains den's own domain {own}: a workspace serving it could set cookies "
            "for every den URL"
        )
    if labels[-1] in _SPECIAL:
        raise bad(f"is under .{labels[-1]}, which public DNS does not serve")
    return name


# -- DNS ---------------------------------------------------------------------------


def _nameserver(entry: str) -> dns.nameserver.Do53Nameserver:
    """``ADDR``, ``ADDR:PORT`` or ``[V6ADDR]:PORT`` from settings.dns_servers."""
    text, port = entry.strip(), 53
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        text = addr
        if rest:
            port = int(rest.removeprefix(":")) if rest.startswith(":") else -1
    elif text.count(":") == 1:
        text, _, p = text.partition(":")
        port = int(p) if p.isdigit() else -1
    try:
        ipaddress.ip_address(text)
    except ValueError:
        port = -1
    if not 0 < port <= 65535:
        raise BackendFailure(
            f"dns_servers entry {entry[:60]!r} is not ADDR or ADDR:PORT; fix den's configuration"
        )
    return dns.nameserver.Do53Nameserver(text, port)


def resolver(settings: Settings) -> dns.asyncresolver.Resolver:
    """A resolver on settings.dns_servers (else the system's), with short timeouts."""
    if settings.dns_servers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [_nameserver(e) for e in settings.dns_servers]
    else:
        try:
            r = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise BackendFailure(
                "this host has no DNS resolver configured (/etc/resolv.conf); set dns_servers"
            ) from None
    r.timeout = r.lifetime = DNS_SECONDS
    return r


def _servers(r: dns.asyncresolver.Resolver) -> str:
    return ", ".join(str(ns) for ns in r.nameservers) or "none"


async def _lookup(r: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[str]:
    """The records of ``name`` (text), [] when there are none; a sentence when DNS fails."""
    try:
        answer = await r.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.resolver.LifetimeTimeout:
        raise _DnsError(
            f"DNS did not answer for {name} within {DNS_SECONDS:g} s (nameservers {_servers(r)})"
        ) from None
    except dns.resolver.NoNameservers:
        raise _DnsError(
            f"no nameserver could answer for {name} (nameservers {_servers(r)}; SERVFAIL "
            "or refused)"
        ) from None
    except dns.exception.DNSException as exc:
        raise _DnsError(f"DNS lookup of {name} failed: {exc}") from None
    if rdtype == "TXT":
        return [b"".join(rd.strings).decode("utf-8", "replace") for rd in answer]
    return [rd.to_text() for rd in answer]


class _DnsError(Exception):
    pass


async def _check_txt(settings: Settings, domain: str, token: str) -> str | None:
    """None when ``_den-challenge.DOMAIN`` holds the token, else why not."""
    name = f"{CHALLENGE_LABEL}.{domain}"
    try:
        values = await _lookup(resolver(settings), name, "TXT")
    except _DnsError as exc:
        return str(exc)
    if not values:
        return f"no TXT record {name} found; create it with the value {token}"
    if any(secrets.compare_digest(v.strip().encode(), token.encode()) for v in values):
        return None
    held = ", ".join(repr(v[:80]) for v in values[:5])
    return f"the TXT record {name} holds {held}, not this claim's token; set it to {token}"


# Where den's domain resolves, per domain: (when looked up, addresses).
_here: dict[str, tuple[float, list[str]]] = {}
HERE_SECONDS = 300.0


async def _addresses(settings: Settings) -> list[str]:
    """Where workspace URLs lead (for the A/AAAA records to suggest); [] when unknown.

    Looked up at most every few minutes: listing domains must not wait on DNS.
    """
    if settings.local_domain:
        return ["127.0.0.1"]
    if settings.web_host not in ("", "0.0.0.0", "::"):
        return [settings.web_host]
    now = time.monotonic()
    cached = _here.get(settings.domain)
    if cached is not None and now - cached[0] < HERE_SECONDS:
        return cached[1]
    try:
        r = resolver(settings)
        r.lifetime = 1.0
        found = await _lookup(r, settings.domain, "A") + await _lookup(r, settings.domain, "AAAA")
    except (_DnsError, BackendFailure):
        found = []
    _here[settings.domain] = (now, found)
    return found


# -- methods -----------------------------------------------------------------------


class DomainAdd(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    domain: Annotated[str, CliArg()] = Field(
        max_length=300, description="The name to serve the workspace on (e.g. app.example.com)."
    )
    port: int | None = Field(
        None, ge=1, le=65535, description="Port in the workspace (default: its URL's port)."
    )


class DomainRef(Params):
    domain: Annotated[str, CliArg()] = Field(max_length=300, description="The custom domain.")


class DomainList(Params):
    ref: str | None = Field(None, max_length=80, description="Only this workspace's domains.")
    all: bool = Field(False, description="Every workspace's domains (admins).")


class DnsRecord(BaseModel):
    type: str
    name: str
    value: str


class DomainOut(BaseModel):
    domain: str
    workspace: str  # OWNER/NAME
    port: int | None
    state: Literal["pending", "verified"]
    url: str
    token: str | None  # the public verification value, while pending
    created_at: datetime
    verified_at: datetime | None
    verified_by: str
    records: list[DnsRecord]
    instructions: str


async def _out(ctx: Context, d: CustomDomain, ws: Workspace, owner: User) -> DomainOut:
    s = ctx.app.settings
    target = f"{label(owner.name, ws.name)}.{s.domain}"
    verified = d.verified_at is not None
    records = [DnsRecord(type="CNAME", name=d.domain, value=target)]
    addrs = await _addresses(s)
    for a in addrs:
        records.append(
            DnsRecord(type="AAAA" if ":" in a else "A", name=d.domain, value=a),
        )
    if not verified:
        records.append(DnsRecord(type="TXT", name=f"{CHALLENGE_LABEL}.{d.domain}", value=d.token))
    url = base(s, d.domain) + "/"
    point = f"CNAME {d.domain} -> {target}"
    if addrs:
        point += f" (at a zone apex, where CNAME is not allowed: A/AAAA {d.domain} -> " + (
            ", ".join(addrs) + ")"
        )
    if verified:
        text = f"{url} serves {owner.name}/{ws.name} (verified by {d.verified_by}); DNS: {point}"
    else:
        text = (
            f"1. Point the name here: {point}.\n"
            f"2. Prove it is yours: TXT {CHALLENGE_LABEL}.{d.domain} = {d.token}\n"
            f"3. Run `den domain verify {d.domain}`. den serves {url} only after that."
        )
    return DomainOut(
        domain=d.domain,
        workspace=f"{owner.name}/{ws.name}",
        port=d.port,
        state="verified" if verified else "pending",
        url=url,
        token=None if verified else d.token,
        created_at=d.created_at,
        verified_at=d.verified_at,
        verified_by=d.verified_by,
        records=records,
        instructions=text,
    )


async def _find(ctx: Context, text: str) -> tuple[CustomDomain, Workspace, User]:
    """The claim on ``text``; another user's is "not found" for members."""
    name = text.strip().lower().removesuffix(".")
    row = (
        await ctx.db.execute(
            select(CustomDomain, Workspace, User)
            .join(Workspace, CustomDomain.workspace_id == Workspace.id)
            .join(User, Workspace.user_id == User.id)
            .where(CustomDomain.domain == name)
        )
    ).first()
    if row is None or (not ctx.caller.is_admin and row[2].id != ctx.caller.user_id):
        raise NotFound(f"no custom domain {text[:80]!r}; `den domain ls` lists yours")
    d, ws, owner = row
    ctx.target = f"domain:{d.domain}"
    return d, ws, owner


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


async def _hold(db: AsyncSession, domain: str, user_id: int) -> None:
    """Reserve ``domain`` for ``user_id`` for RELEASE_HOLD from now (the caller commits)."""
    now = datetime.now(UTC)
    # Lapsed holds are dropped here, the only place new ones are written.
    await db.execute(delete(DomainHold).where(DomainHold.until <= now))
    h = await db.get(DomainHold, domain)
    if h is None:
        db.add(DomainHold(domain=domain, user_id=user_id, until=now + RELEASE_HOLD))
    else:
        h.user_id, h.until = user_id, now + RELEASE_HOLD


async def hold_workspace_domains(db: AsyncSession, ws: Workspace) -> None:
    """Reserve a workspace's verified names for its owner: it is being deleted.

    Called by workspace deletion in the transaction that marks it ``deleting``
    (from then on its names are no longer served); the caller commits.
    """
    names = (
        await db.execute(
            select(CustomDomain.domain).where(
                CustomDomain.workspace_id == ws.id, CustomDomain.verified_at.is_not(None)
            )
        )
    ).scalars()
    for domain in list(names):
        await _hold(db, domain, ws.user_id)


@method("domain.add", right=Right.write, cli=Cli("domain add"))
async def domain_add(ctx: Context, p: DomainAdd) -> DomainOut:
    """Claim a domain for a workspace; the result says which DNS records to create.

    The name is served only after `den domain verify` finds the TXT record.
    Adding a pending claim again shows its instructions (and takes a new
    --port). A name removed from another owner's workspace in the last 7 days
    stays theirs (admins may still add it).
    """
    domain = normalise(p.domain, ctx.app.settings)
    ctx.target = f"domain:{domain}"
    try:
        ws, owner = await find_workspace(ctx, p.ref)
    except InvalidParams as exc:
        raise InvalidParams(exc.errors[0]["message"], field="ref") from None
    d = (
        await ctx.db.execute(select(CustomDomain).where(CustomDomain.domain == domain))
    ).scalar_one_or_none()
    if d is not None and d.workspace_id == ws.id:
        if d.verified_at is not None:
            raise Conflict(f"{domain} serves {owner.name}/{ws.name} already")
        d.port = p.port
    elif d is not None:
        lapse = _aware(d.created_at) + PENDING_HOLD
        if d.verified_at is not None or lapse > datetime.now(UTC):
            state = (
                "verified"
                if d.verified_at is not None
                else (f"not verified yet; the claim lapses at {lapse:%Y-%m-%d %H:%M} UTC")
            )
            raise Conflict(
                f"{domain} is claimed by another workspace ({state}); an admin can remove "
                "the claim (`den domain rm`)"
            )
        await ctx.db.delete(d)
        await ctx.db.flush()
        d = None
    if d is None:
        held = await ctx.db.get(DomainHold, domain)
        if held is not None and held.user_id != owner.id:
            until = _aware(held.until)
            if until > datetime.now(UTC) and not ctx.caller.is_admin:
                raise Conflict(
                    f"{domain} served another owner's workspace until recently and stays "
                    f"reserved for them until {until:%Y-%m-%d %H:%M} UTC; add it after that, "
                    "or ask an admin"
                )
            # Lapsed, or an admin gives the name to someone else: the hold is over.
            await ctx.db.delete(held)
        d = CustomDomain(
            workspace_id=ws.id, domain=domain, port=p.port, token=secrets.token_urlsafe(32)
        )
        ctx.db.add(d)
    await ctx.db.commit()
    ctx.app.web_changed()
    return await _out(ctx, d, ws, owner)


@method("domain.verify", right=Right.write, cli=Cli("domain verify"))
async def domain_verify(ctx: Context, p: DomainRef) -> DomainOut:
    """Check a pending domain's TXT record; serve the name once it holds the claim's token."""
    d, ws, owner = await _find(ctx, p.domain)
    if d.verified_at is not None:
        return await _out(ctx, d, ws, owner)
    claim_id, domain, token = d.id, d.domain, d.token
    s = ctx.app.settings
    # No database connection is held across the lookup (seconds at worst).
    await release_db(ctx)
    why = await _check_txt(s, domain, token)
    if why is not None:
        raise Conflict(f"{domain} is not verified: {why}")
    fresh = await ctx.db.get(CustomDomain, claim_id)
    if fresh is None or fresh.token != token:
        raise Conflict(f"the claim on {domain} was removed while it was being verified")
    if fresh.verified_at is None:
        fresh.verified_at = datetime.now(UTC)
        fresh.verified_by = "txt"
        await ctx.db.commit()
        ctx.app.web_changed()
    return await _out(ctx, fresh, ws, owner)


@method(
    "domain.list",
    right=Right.read,
    cli=Cli("domain ls", columns=("domain", "workspace", "port", "state", "verified_by", "url")),
)
async def domain_list(ctx: Context, p: DomainList) -> list[DomainOut]:
    """List custom domains: yours (or a workspace's), or (admins) everyone's with --all."""
    q = (
        select(CustomDomain, Workspace, User)
        .join(Workspace, CustomDomain.workspace_id == Workspace.id)
        .join(User, Workspace.user_id == User.id)
    )
    if p.ref is not None:
        try:
            ws, _ = await find_workspace(ctx, p.ref, deleting=True)
        except InvalidParams as exc:
            raise InvalidParams(exc.errors[0]["message"], field="ref") from None
        q = q.where(CustomDomain.workspace_id == ws.id)
    elif not (p.all and ctx.caller.is_admin):
        if ctx.caller.user_id is None:
            if not ctx.caller.is_admin:
                return []
        else:
            q = q.where(User.id == ctx.caller.user_id)
    rows = (await ctx.db.execute(q.order_by(CustomDomain.domain))).tuples().all()
    return [await _out(ctx, d, ws, owner) for d, ws, owner in rows]


@method("domain.remove", right=Right.write, cli=Cli("domain rm"))
async def domain_remove(ctx: Context, p: DomainRef) -> DomainOut:
    """Stop serving a custom domain and drop its claim.

    A verified name stays reserved for the workspace's owner for 7 days.
    """
    d, ws, owner = await _find(ctx, p.domain)
    out = await _out(ctx, d, ws, owner)
    if d.verified_at is not None:
        # Only a verified name is held: else add-then-remove would squat names.
        await _hold(ctx.db, d.domain, owner.id)
    await ctx.db.delete(d)
    await ctx.db.commit()
    ctx.app.web_changed()
    return out


# -- the gate's question -------------------------------------------------------------


# Every verified name -> (workspace id, port), read once per web generation
# (app.web_changed() after each change): the gate asks about every unknown
# host, which must not cost a query.
_Targets = dict[str, tuple[str, int | None]]
_tables: weakref.WeakKeyDictionary[App, tuple[int, _Targets]] = weakref.WeakKeyDictionary()
_loading: weakref.WeakKeyDictionary[App, asyncio.Lock] = weakref.WeakKeyDictionary()


async def _table(app: App) -> _Targets:
    generation = app.web_generation
    cached = _tables.get(app)
    if cached is not None and cached[0] == generation:
        return cached[1]
    lock = _loading.setdefault(app, asyncio.Lock())
    async with lock:
        cached = _tables.get(app)
        if cached is not None and cached[0] == generation:
            return cached[1]
        async with app.sessions() as db:
            rows = (
                await db.execute(
                    select(CustomDomain)
                    .join(Workspace, CustomDomain.workspace_id == Workspace.id)
                    .where(Workspace.state != "deleting", CustomDomain.verified_at.is_not(None))
                )
            ).scalars()
            table = {d.domain: (d.workspace_id, d.port) for d in rows}
        # Stored under the generation read before the query: a change during
        # it makes the next question read again.
        _tables[app] = (generation, table)
        return table


def _host(host: str) -> str:
    name = host.strip().lower()
    if not name.startswith("[") and name.count(":") == 1:
        name = name.partition(":")[0]
    return name.removesuffix(".")


async def domain_target(app: App, host: str) -> tuple[str, int | None] | None:
    """(workspace id, port or None for its URL's port) of a VERIFIED custom domain, else None."""
    return (await _table(app)).get(_host(host))
