"""Host preparation: what `den init` checks and does."""
