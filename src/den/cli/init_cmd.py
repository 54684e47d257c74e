"""`den init`: check the host and prepare it (packages, cgroups, storage pool)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from den.cli import render
from den.errors import Conflict, DenError

if TYPE_CHECKING:  # the rest is imported when the command runs: `den --help` stays fast
    from den.config import Settings
    from den.host import checks as host_checks
    from den.host import prepare


def _print_checks(results: list[host_checks.Check]) -> None:
    for c in results:
        mark = "[green]ok[/green]  " if c.ok else "[red]MISSING[/red]"
        render.console.print(f"{mark} {c.name}: {c.detail}", highlight=False)


def init(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Act without asking.")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Only report; exit 1 if anything is missing.")
    ] = False,
    pool_size: Annotated[
        str | None, typer.Option(help="Size of a new loopback pool image, e.g. 50G.")
    ] = None,
    instance: Annotated[int | None, typer.Option(help="Instance number.", min=0, max=99)] = None,
    config: Annotated[Path | None, typer.Option(help="Config file.")] = None,
    image: Annotated[
        str | None,
        typer.Option(help="Build this image unless it exists [default: default_image, dev]."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Its package set: dev or debian (minbase with git) "
            "[default: the image's name if it is a preset, else dev]."
        ),
    ] = None,
    include: Annotated[
        str | None,
        typer.Option(
            "--include",
            metavar="PKG,...",
            help="Extra Debian packages for the image it builds, on top of the preset.",
        ),
    ] = None,
    no_image: Annotated[bool, typer.Option("--no-image", help="Build no image.")] = False,
) -> None:
    """Check this host and prepare it for den, and build the default image; safe to run again."""
    from den import config as den_config
    from den.host import checks as host_checks
    from den.host import prepare
    from den.services.common import NAME_RE
    from den.storage.debootstrap import check_package
    from den.storage.images import PRESETS

    extra = [p.strip() for p in (include or "").split(",") if p.strip()]
    try:
        extra = [check_package(p) for p in dict.fromkeys(extra)]
    except ValueError as exc:
        render.err_console.print(f"error: --include: {exc}")
        raise typer.Exit(2) from None
    if len(extra) > 200:  # image.build's limit
        render.err_console.print("error: --include: at most 200 packages")
        raise typer.Exit(2)
    if extra and no_image:
        render.err_console.print(
            "error: --include adds to the image den init builds: not with --no-image"
        )
        raise typer.Exit(2)
    if image is not None and not NAME_RE.fullmatch(image):
        render.err_console.print(f"error: {image!r} is not an image name ([a-z][a-z0-9-]{{0,30}})")
        raise typer.Exit(2)
    if preset is not None and preset not in PRESETS:
        render.err_console.print(f"error: no preset {preset!r}; presets: {', '.join(PRESETS)}")
        raise typer.Exit(2)
    try:
        settings, _ = den_config.load({"instance": instance, "pool_size": pool_size}, config)
    except ValueError as exc:
        render.err_console.print(f"error: bad configuration: {exc}")
        raise typer.Exit(2) from None
    image = None if no_image else image or settings.default_image
    preset = preset or (image if image in PRESETS else "dev")
    results = host_checks.run_checks(settings)
    _print_checks(results)
    missing = [c for c in results if not c.ok]
    if image is not None:
        built = (settings.pool_dir / "images" / image).is_dir()
        detail = "built" if built else f"not built yet: den init builds it (preset {preset})"
        img_check = host_checks.Check(
            f"image {image}", built, detail, fix=f"build image {image} (preset {preset})"
        )
        _print_checks([img_check])
        if not built:
            missing.append(img_check)
    missing += _backend_checks(settings, probe=check)
    if check:
        raise typer.Exit(1 if missing else 0)
    if os.geteuid() != 0:
        render.err_console.print("error: den init must run as root")
        raise typer.Exit(4)
    if missing and not yes:
        fixes = "\n".join(f"  - {c.fix}" for c in missing if c.fix)
        if not typer.confirm(f"den init will:\n{fixes}\nGo on?", default=True):
            raise typer.Exit(1)

    def say(msg: str) -> None:
        render.console.print(f"[cyan]->[/cyan] {msg}", highlight=False)

    try:
        asyncio.run(prepare.apply(settings, results, say))
    except DenError as exc:
        render.err_console.print(f"error: {exc.message}")
        raise typer.Exit(7) from None
    after = host_checks.run_checks(settings)
    still = [c for c in after if not c.ok]
    if still:
        _print_checks(still)
        render.err_console.print("error: some checks still fail (see above)")
        raise typer.Exit(1)
    render.console.print("[green]den init: this host is ready[/green]")
    if image is not None:
        try:
            asyncio.run(ensure_image(settings, image, preset, say, extra))
        except DenError as exc:
            render.err_console.print(f"error: image {image}: {exc.message}", highlight=False)
            raise typer.Exit(5 if isinstance(exc, Conflict) else 7) from None
        if image != settings.default_image:
            say(
                f"new workspaces use image {settings.default_image} (default_image); "
                f"`den new --image {image}` uses this one, or set "
                f'default_image = "{image}" in {den_config.config_file_path(config)}'
            )
    try:
        asyncio.run(prepare_backends(settings, say))
    except DenError as exc:
        if settings.default_backend != "sandbox":
            render.err_console.print(f"error: {exc.message}", highlight=False)
            raise typer.Exit(7) from None
        # An optional backend: den runs without it (a create on it says why);
        # the next den init tries again.
        render.err_console.print(
            f"warning: {exc.message}; workspaces run on the sandbox backend meanwhile "
            "(den init tries again)",
            highlight=False,
        )


def _print_notes(notes: list[str]) -> None:
    for n in notes:
        render.console.print(f"[yellow]note[/yellow] {n}", highlight=False)


def _backend_checks(settings: Settings, probe: bool) -> list[host_checks.Check]:
    """What each enabled backend needs on this host (the microvm backend's guest
    assets, and with ``probe`` -- `den init --check` as root -- KVM probed again)."""
    from den.backends import registry

    missing: list[host_checks.Check] = []
    for steps in registry.host_steps(settings):
        checks, notes = steps.init_check(settings, probe and os.geteuid() == 0)
        _print_checks(checks)
        _print_notes(notes)
        missing += [c for c in checks if not c.ok]
    return missing


async def prepare_backends(settings: Settings, say: prepare.Say) -> None:
    """Build (or refresh) what each enabled backend needs on this host."""
    from den.backends import registry

    for steps in registry.host_steps(settings):
        _print_notes(await steps.init_prepare(settings, say))


def _daemon_running(settings: Settings) -> bool:
    try:
        pid = int(json.loads(settings.state_file.read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


async def ensure_image(
    settings: Settings, name: str, preset: str, say: prepare.Say, extra: list[str] | None = None
) -> None:
    """Build image ``name`` from ``preset`` and the packages ``extra`` in this process (no
    daemon needed) unless it is ready already."""
    from sqlalchemy import delete, select

    from den.app import App
    from den.cli.jobs import Bar
    from den.db.engine import migrate
    from den.db.models import Image
    from den.services import images as svc
    from den.storage.images import recover

    app = App(settings)
    try:
        await migrate(settings.db_url)
        app.pool.prepare()
        if not _daemon_running(settings):
            await recover(app.pool, app.sessions)
        async with app.sessions() as db:
            img = (await db.execute(select(Image).where(Image.name == name))).scalar_one_or_none()
            if img is not None and img.state == "ready" and not app.pool.image_path(name).exists():
                say(f"image {name} is recorded but missing from the pool: building it again")
                await db.execute(delete(Image).where(Image.name == name))
                await db.commit()
                img = None
        if img is not None:
            if img.state != "ready":
                raise Conflict(f"it is {img.state} in the running daemon; see `den job ls`")
            say(f"image {name}: exists ({svc.human_size(img.size_bytes)}), reused")
            return
        include, locales = svc.recipe(preset, extra or [])
        cache = svc.apt_cache_dir(settings)
        plus = f" + {', '.join(extra)}" if extra else ""
        say(
            f"building image {name} (preset {preset}){plus}: debootstrap bookworm minbase with "
            f"{len(include)} packages; minutes the first time, packages kept in {cache}"
        )
        await svc.claim(app, name, "debootstrap", "bookworm", include)
        produce = svc.builder(
            app, name, secrets.token_hex(4), "bookworm", include, "minbase", locales
        )
        start = time.monotonic()
        with Bar(f"image {name}") as bar:
            out = await svc.make(app, name, produce, bar.update)
        say(f"image {name}: ready, {out.size} in {time.monotonic() - start:.0f}s")
    finally:
        await app.close()
