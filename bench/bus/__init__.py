"""The bus's benchmarks; what their side-by-side reports share."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence


def print_per_event(
    title: str, seconds: Mapping[str, Sequence[float]], events: int, *, warm_up: int, width: int = 12
) -> None:
    """Each side's µs per event (median, p10–p90 of its transactions after ``warm_up``) and its ratio to the
    first side, the baseline."""
    per_event = {name: sorted(s / events * 1e6 for s in times[warm_up:]) for name, times in seconds.items()}
    baseline = next(iter(per_event))
    base, kept = statistics.median(per_event[baseline]), len(per_event[baseline])
    print(f"{title}, {events:,} events per transaction, {kept} rounds each (µs per event)")
    for name, us in per_event.items():
        p10, p90 = us[len(us) // 10], us[len(us) * 9 // 10]
        median = statistics.median(us)
        print(f"  {name:<{width}} {median:8.2f}  ({p10:.2f}–{p90:.2f})   {median / base:5.2f}× {baseline}")
