"""Tests of the integration level for training."""
