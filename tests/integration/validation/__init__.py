"""Tests of the integration level for validation."""
