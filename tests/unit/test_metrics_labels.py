"""Labels encoded as class indices: the vectorised path for numeric labels gives the per-row keys' answer."""

from typing import Any

import numpy as np
import pytest

from libs.metrics import _label_key, encode_labels


def per_row(values: Any, classes: tuple[Any, ...]) -> list[int]:
    index = {_label_key(c): i for i, c in enumerate(classes)}
    return [index.get(_label_key(v), -1) for v in values]


@pytest.mark.parametrize(
    ("values", "classes"),
    [
        (np.array([0, 1, 1, 2, -1]), (0, 1)),
        (np.array([0.0, 1.0, np.nan, -0.0, 1.5]), (0, 1)),
        (np.array([3, 1, 2], dtype=np.uint8), (3, 1, 2)),
        (np.array([1.0, 2.0], dtype=np.float32), (1.0, 2.0, 2.5)),
        (np.array([1, 2, 3]), ("1", "2", True, 3)),
        (np.array([1, 0, 1]), (True, False)),
        (np.array([2**53 + 1]), (2**53 + 1,)),
        (np.array([1, 0]), ()),
        (np.array([], dtype=np.int64), (0, 1)),
        (np.array([True, False]), (True, False)),
        (np.array(["a", "b", "c"], dtype=object), ("a", "b")),
        ([0, 1, "x"], (0, 1)),
    ],
)
def test_encoded_labels_match_the_per_row_keys(values: Any, classes: tuple[Any, ...]) -> None:
    encoded = encode_labels(values, classes)
    assert encoded.dtype == np.int64
    assert encoded.tolist() == per_row(values, classes)
