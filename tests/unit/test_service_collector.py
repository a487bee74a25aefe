"""Service processes freeze what startup built and collect generation 0 less often (libs.service)."""

from __future__ import annotations

import gc

import pytest

from libs.service import GC_GEN0_THRESHOLD, tune_collector


@pytest.mark.usefixtures("restored_collector")
def test_startup_objects_are_frozen_and_generation_zero_collects_less_often() -> None:
    _, gen1, gen2 = gc.get_threshold()
    startup = [[i] for i in range(1000)]  # long-lived containers built at startup
    tune_collector()
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, gen1, gen2)
    assert gc.get_freeze_count() >= len(startup)
    assert gc.get_count()[0] < 100  # collected before freezing


@pytest.mark.usefixtures("restored_collector")
def test_cycles_made_after_startup_are_still_collected() -> None:
    tune_collector()

    class Node:
        other: object

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2
