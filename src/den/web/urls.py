"""The HTTPS URLs of workspaces, as users see them."""

from __future__ import annotations

from den.config import Settings
from den.web.labels import label


def base(settings: Settings, host: str) -> str:
    """``https://HOST[:PORT]`` (no port when it is 443)."""
    port = settings.web_port
    return f"https://{host}" if port == 443 else f"https://{host}:{port}"


def workspace_url(settings: Settings, owner: str, name: str, port: int | None = None) -> str:
    """The URL of a workspace (``port`` None: its main one) or of one of its published ports."""
    return base(settings, f"{label(owner, name, port)}.{settings.domain}") + "/"


def home_url(settings: Settings) -> str:
    """den's own pages (sign-in, and the dashboard): the domain itself."""
    return base(settings, settings.domain) + "/"
