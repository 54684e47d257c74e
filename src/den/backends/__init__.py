"""Backends make workspaces real on a node: one driver per isolation technology."""
