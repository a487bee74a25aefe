"""Tests of the unit level for validation."""
