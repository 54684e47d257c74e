"""Images: the read-only root filesystems workspaces are snapshotted from.

An image is made by a background job (``image.build`` with debootstrap,
``image.import`` from a rootfs tarball) while its row says ``building``; it
becomes ``ready`` when done. A failed or cancelled job leaves neither a row
nor a subvolume; a daemon killed mid-build is cleaned up at its next start
(:func:`den.storage.images.recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from den.app import App
from den.config import Settings
from den.db.models import Image, User, Workspace
from den.errors import Conflict, NotFound
from den.rpc.registry import Cli, CliArg, Context, NoParams, Params, Right, method
from den.services.common import Name
from den.services.jobs import JOBS, Job, JobOut
from den.storage import debootstrap
from den.storage import images as storage
from den.storage.debootstrap import ProgressFn

log = logging.getLogger(__name__)
Variant = Literal["minbase", "buildd", "default"]
PresetName = Literal["dev", "debian"]
assert set(get_args(PresetName)) == set(storage.PRESETS)
Producer = Callable[[ProgressFn], Awaitable[storage.Built]]


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class ImageOut(BaseModel):
    name: str
    source: str
    suite: str
    includes: list[str]
    state: str
    size_bytes: int
    size: str
    workspaces: int
    created_at: datetime

    @classmethod
    def of(cls, img: Image, workspaces: int) -> ImageOut:
        return cls(
            name=img.name,
            source=img.source,
            suite=img.suite,
            includes=list(img.includes or []),
            state=img.state,
            size_bytes=img.size_bytes,
            size=human_size(img.size_bytes),
            workspaces=workspaces,
            created_at=img.created_at,
        )


class ImageBuild(Params):
    name: Annotated[Name, CliArg()] = Field(description="Image name: [a-z][a-z0-9-]{0,30}.")
    suite: str = Field("bookworm", max_length=32, description="Debian release to bootstrap.")
    include: list[str] = Field(
        default_factory=list,
        max_length=200,
        description="Extra Debian packages, comma-separated or repeated (--include PKG,...).",
    )
    variant: Variant = Field(
        "minbase", description="debootstrap variant: minbase, buildd or default."
    )
    preset: PresetName | None = Field(
        None,
        description="Start from a named package set: dev (den init's default image: a "
        "toolchain, python3, sudo, editors, locales...) or debian (minbase with git); "
        "--include adds to it.",
    )

    @field_validator("include", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, list):
            return [
                p.strip()
                for item in v
                for p in (item.split(",") if isinstance(item, str) else [item])
                if not isinstance(p, str) or p.strip()
            ]
        return v

    @field_validator("include")
    @classmethod
    def _packages(cls, v: list[str]) -> list[str]:
        return [debootstrap.check_package(p) for p in v]


class ImageImport(Params):
    name: Annotated[Name, CliArg()] = Field(description="Image name: [a-z][a-z0-9-]{0,30}.")
    path: Annotated[str, CliArg(abs_path=True)] = Field(
        max_length=4096,
        description="Root filesystem tarball (.tar, .tar.gz|xz|zst|bz2) on the daemon's host.",
    )


class ImageRef(Params):
    name: Annotated[Name, CliArg()] = Field(description="Image name.")


class ImageDeleted(BaseModel):
    deleted: str


# -- making an image (shared by the jobs and `den init --image`) --------------
async def claim(
    app: App, name: str, source: str, suite: str = "", includes: list[str] | None = None
) -> None:
    """Record image ``name`` as building; Conflict if the name is taken."""
    async with app.sessions() as db:
        if (await db.execute(select(Image.id).where(Image.name == name))).first() is not None:
            raise Conflict(f"an image named {name!r} exists already; `den image rm {name}` first")
        db.add(
            Image(name=name, source=source, suite=suite, includes=includes or [], state="building")
        )
        try:
            await db.commit()
        except IntegrityError:
            raise Conflict(f"an image named {name!r} exists already") from None


async def make(app: App, name: str, produce: Producer, progress: ProgressFn) -> ImageOut:
    """Run ``produce`` for the claimed image ``name``; mark it ready, or undo everything."""
    built: storage.Built | None = None
    try:
        built = await produce(progress)
        async with app.sessions() as db:
            img = (await db.execute(select(Image).where(Image.name == name))).scalar_one()
            img.state, img.size_bytes = "ready", built.size_bytes
            await db.commit()
            return ImageOut.of(img, 0)
    except BaseException:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(_unclaim(app, name, built))
        raise


async def _unclaim(app: App, name: str, built: storage.Built | None) -> None:
    if built is not None:
        await asyncio.to_thread(app.pool.discard, built.path)
    async with app.sessions() as db:
        await db.execute(delete(Image).where(Image.name == name, Image.state == "building"))
        await db.commit()


def apt_cache_dir(settings: Settings) -> Path:
    """Where image builds keep the .debs they download (outside every image)."""
    # An empty DEN_APT_CACHE reads as Path("."): unset, not the daemon's cwd.
    if settings.apt_cache is not None and settings.apt_cache.is_absolute():
        return settings.apt_cache
    return settings.data_dir / "apt-cache"


def recipe(preset: str | None, include: list[str]) -> tuple[list[str], tuple[str, ...]]:
    """The packages and locales of a build: the preset's, then ``include``'s not yet named."""
    base = storage.PRESETS[preset] if preset else None
    packages = list(base.include) if base else []
    packages += [p for p in include if p not in packages]
    return packages, base.locales if base else ()


def builder(
    app: App,
    name: str,
    tag: str,
    suite: str,
    include: list[str],
    variant: str,
    locales: tuple[str, ...] = (),
) -> Producer:
    mirror = debootstrap.mirror(app.settings.debian_mirror)

    async def produce(progress: ProgressFn) -> storage.Built:
        return await storage.build(
            app.pool,
            name,
            tag,
            suite=suite,
            includes=include,
            variant=variant,
            mirror=mirror,
            progress=progress,
            locales=locales,
            cache_dir=apt_cache_dir(app.settings),
        )

    return produce


def _start(ctx: Context, kind: str, name: str, produce: Producer) -> JobOut:
    app = ctx.app

    async def work(job: Job) -> ImageOut:
        return await make(app, name, produce, job.progress)

    return JOBS.start(kind, f"image:{name}", ctx.caller.name, work).out()


# -- methods -------------------------------------------------------------------
@method("image.build", right=Right.admin, cli=Cli("image build", follow_job=True))
async def image_build(ctx: Context, p: ImageBuild) -> JobOut:
    """Build an image with debootstrap in the background; returns its job at once.

    `--preset dev` rebuilds den init's default image (under any name). The
    packages are downloaded once per host: builds keep them in the apt_cache
    directory, outside the image. The result is fixed up for many workspaces
    (no SSH host keys or machine-id, C.UTF-8 locale, a resolver placeholder,
    a user skeleton) and made read-only.
    """
    ctx.target = f"image:{p.name}"
    debootstrap.check_suite(p.suite)
    include, locales = recipe(p.preset, p.include)
    await claim(ctx.app, p.name, "debootstrap", p.suite, include)
    tag = secrets.token_hex(4)
    produce = builder(ctx.app, p.name, tag, p.suite, include, p.variant, locales)
    return _start(ctx, "image.build", p.name, produce)


@method("image.import", right=Right.admin, cli=Cli("image import", follow_job=True))
async def image_import(ctx: Context, p: ImageImport) -> JobOut:
    """Import a root filesystem tarball (e.g. from `podman export`) as an image, in the background.

    The daemon reads the file on its own host as root, so only admins may.
    gzip, xz, zstd and bzip2 are recognised; the same fix-ups as a build apply.
    """
    ctx.target = f"image:{p.name}"
    tarball = Path(p.path)
    await asyncio.to_thread(storage.check_tarball, tarball)
    await claim(ctx.app, p.name, "import")
    pool, name, tag = ctx.app.pool, p.name, secrets.token_hex(4)

    async def produce(progress: ProgressFn) -> storage.Built:
        return await storage.import_tarball(pool, name, tag, tarball, progress=progress)

    return _start(ctx, "image.import", p.name, produce)


@method(
    "image.list",
    right=Right.read,
    cli=Cli(
        "image ls", columns=("name", "source", "suite", "state", "size", "workspaces", "created_at")
    ),
)
async def image_list(ctx: Context, p: NoParams) -> list[ImageOut]:
    """List images with their source, state, size and how many workspaces use each."""
    sub = select(Workspace.image, func.count().label("n")).group_by(Workspace.image).subquery()
    q = (
        select(Image, func.coalesce(sub.c.n, 0))
        .outerjoin(sub, sub.c.image == Image.name)
        .order_by(Image.name)
    )
    return [ImageOut.of(img, int(k)) for img, k in (await ctx.db.execute(q)).all()]


async def _find(ctx: Context, name: str) -> Image:
    img = (await ctx.db.execute(select(Image).where(Image.name == name))).scalar_one_or_none()
    if img is None:
        raise NotFound(f"no image named {name!r}; `den image ls` lists images")
    return img


@method("image.get", right=Right.read, cli=Cli("image show"))
async def image_get(ctx: Context, p: ImageRef) -> ImageOut:
    """Show one image."""
    img = await _find(ctx, p.name)
    q = select(func.count()).select_from(Workspace).where(Workspace.image == p.name)
    return ImageOut.of(img, int((await ctx.db.execute(q)).scalar_one()))


@method("image.delete", right=Right.admin, cli=Cli("image rm", confirm="Delete image {name}?"))
async def image_delete(ctx: Context, p: ImageRef) -> ImageDeleted:
    """Delete an image; refused while a workspace uses it or while it is being built."""
    ctx.target = f"image:{p.name}"
    img = await _find(ctx, p.name)
    if img.state == "building":
        job = JOBS.running(
            f"image.{'build' if img.source == 'debootstrap' else 'import'}", f"image:{p.name}"
        )
        hint = f"; `den job cancel {job.id}` stops it" if job else ""
        raise Conflict(f"image {p.name!r} is being built{hint}")
    q = (
        select(User.name, Workspace.name)
        .join(User, Workspace.user_id == User.id)
        .where(Workspace.image == p.name)
        .order_by(User.name, Workspace.name)
    )
    users = [f"{u}/{w}" for u, w in (await ctx.db.execute(q)).all()]
    if users:
        shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
        raise Conflict(
            f"image {p.name!r} is used by {len(users)} workspace(s): {shown}; delete them first",
            data={"workspaces": users[:100]},
        )
    await asyncio.to_thread(ctx.app.pool.discard, ctx.app.pool.image_path(p.name))
    await ctx.db.delete(img)
    return ImageDeleted(deleted=p.name)
