"""Validation runs on the same kind of isolated stage as training: a fresh topic, schemas and groups."""

from tests.integration.training.conftest import Stage, stage

__all__ = ["Stage", "stage"]
