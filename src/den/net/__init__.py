"""Workspace networking: a bridge, a veth and a netns per workspace, nftables."""
