"""Error rates of the automatic decisions, before and now (bench/decisions/run.py)."""
