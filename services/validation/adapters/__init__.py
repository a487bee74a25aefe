"""Validation's adapters: Postgres repositories and the artifact-store evaluator."""
