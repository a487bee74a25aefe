"""The baseline: a bare FastAPI endpoint calling the model directly (no routing, no logging, no checks).

BENCH_ARTIFACTS=<store> BENCH_MODEL_KEY=<sha256> uvicorn bench.serving.bare_app:app --workers 1
"""

from __future__ import annotations

import os

import orjson
import pandas as pd
from fastapi import FastAPI, Request, Response

from libs.artifacts import ArtifactStore, load_model

app = FastAPI()
_model = load_model(ArtifactStore(os.environ["BENCH_ARTIFACTS"]), os.environ["BENCH_MODEL_KEY"])
_classes = [str(c) for c in _model.classes_.tolist()]


@app.post("/predict")
async def predict(request: Request) -> Response:
    records = orjson.loads(await request.body())["records"]
    proba = _model.predict_proba(pd.DataFrame(records))
    labels = _model.classes_[proba.argmax(axis=1)].tolist()
    out = [
        {"prediction": label, "probabilities": dict(zip(_classes, p, strict=True))}
        for label, p in zip(labels, proba.tolist(), strict=True)
    ]
    return Response(orjson.dumps({"predictions": out}), media_type="application/json")
