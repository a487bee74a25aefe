"""Evidently's side of bench/drift, run inside its own virtualenv (evidently 0.7.23, pandas < 3).

Reads the bench's reference and current Parquet files, runs the DataDriftPreset, and prints one JSON line:
the wall time of Report.run and, per column, the method, its value and the threshold.
"""

from __future__ import annotations

import json
import sys
import time

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset


def main(reference_path: str, current_path: str, numeric: str, categorical: str) -> None:
    reference = pd.read_parquet(reference_path)
    current = pd.read_parquet(current_path)
    definition = DataDefinition(
        numerical_columns=numeric.split(","), categorical_columns=categorical.split(",")
    )
    ref_ds = Dataset.from_pandas(reference, data_definition=definition)
    cur_ds = Dataset.from_pandas(current, data_definition=definition)
    began = time.perf_counter()
    snapshot = Report([DataDriftPreset()]).run(cur_ds, ref_ds)
    seconds = time.perf_counter() - began
    columns = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith("ValueDrift"):
            columns[config["column"]] = {
                "method": config["method"],
                "value": metric["value"],
                "threshold": config["threshold"],
            }
    print(json.dumps({"seconds": seconds, "columns": columns}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
