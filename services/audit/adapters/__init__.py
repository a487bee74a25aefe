"""The audit service's ports on real infrastructure: Postgres (the trail) and files (key, checkpoints)."""
