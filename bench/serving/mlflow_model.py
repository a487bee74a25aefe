"""Run inside MLflow's own virtualenv: save the benchmark model in MLflow's format.

<mlflow-venv>/bin/python bench/serving/mlflow_model.py <output dir> <light|churn>
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow.sklearn
import skops.io

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import build_model, records

if __name__ == "__main__":
    out, kind = Path(sys.argv[1]), sys.argv[2]
    model = build_model(kind)
    # MLflow 3 saves scikit-learn models with skops too, and asks which types to trust: the model's own.
    trusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    import pandas as pd

    example = pd.DataFrame(records(2, kind))
    mlflow.sklearn.save_model(model, str(out), input_example=example, skops_trusted_types=trusted)
    # The driver compares these with driftloop's copy of the model: the same model, trained twice.
    print(",".join(f"{p:.12f}" for p in model.predict_proba(pd.DataFrame(records(20, kind)))[:, 1]))
