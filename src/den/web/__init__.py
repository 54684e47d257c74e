"""The web front door: workspace URLs over HTTPS (Caddy in front, den decides)."""
