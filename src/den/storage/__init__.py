"""Storage: the btrfs pool (or its overlayfs fallback), images and snapshots."""
