"""den: isolated, ssh-reachable workspaces on a Linux server."""

__version__ = "0.1.0"
