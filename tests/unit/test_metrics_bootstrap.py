"""The paired bootstrap's memory is bounded by the holdout's size, not by holdout size x resamples."""

from __future__ import annotations

import tracemalloc

import numpy as np

from contracts.common import Task
from libs.metrics import (
    BOOTSTRAP_CHUNK_CELLS,
    Outputs,
    bootstrap_weights,
    paired_bootstrap_difference,
    resamples_per_chunk,
)


def test_bootstrap_chunks_stay_within_the_cell_budget_and_draw_every_resample() -> None:
    chunks = list(bootstrap_weights(5_000, 230, seed=4, max_cells=60_000))
    assert all(w.size <= 60_000 for w in chunks)
    assert sum(w.shape[0] for w in chunks) == 230
    assert all((w.sum(axis=1) == 5_000).all() for w in chunks)


def test_a_holdout_of_five_million_rows_draws_one_resample_at_a_time() -> None:
    # 100 resamples at once, as before, were 5e8 cells: 4 GB of draws, 4 GB of counts, 4 GB of weights.
    assert resamples_per_chunk(5_000_000) == 1
    assert resamples_per_chunk(10_000) == 100  # small holdouts draw as they always did: same reports
    assert resamples_per_chunk(2_000_000) * 2_000_000 <= BOOTSTRAP_CHUNK_CELLS


def test_the_bootstrap_of_a_large_holdout_holds_a_few_copies_of_the_holdout_not_one_per_resample() -> None:
    rows = 200_000
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, rows)
    score = np.clip(y * 0.3 + rng.random(rows) * 0.7, 0, 1)
    out = Outputs(
        Task.CLASSIFICATION, y, (score > 0.5).astype(int), np.column_stack([1 - score, score]), (0, 1)
    )
    tracemalloc.start()
    try:
        paired_bootstrap_difference(out, out, "accuracy", resamples=200, level=0.95, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A chunk is at most max(budget, rows) cells; the draws, the counts and the weights of one chunk (8
    # bytes a cell each) are alive at once. Before chunking by cells: 100 x 200,000 cells x 3 = 480 MB.
    assert peak <= 4 * 8 * max(BOOTSTRAP_CHUNK_CELLS, rows)


def test_chunking_changes_no_draw() -> None:
    # One random stream whatever the chunk size: a report's interval does not depend on the budget.
    whole = np.vstack(list(bootstrap_weights(501, 40, seed=8)))
    for max_cells in (501, 3 * 501, 7 * 501 + 3):
        assert np.array_equal(np.vstack(list(bootstrap_weights(501, 40, seed=8, max_cells=max_cells))), whole)
