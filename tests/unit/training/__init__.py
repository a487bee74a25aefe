"""Tests of the unit level for training."""
