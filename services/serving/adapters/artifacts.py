"""Models from the shared artifact store: skops with the trusted-type list, loaded and warmed off the
event loop, cached by artifact key."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from libs.artifacts import ArtifactError, ArtifactStore, load_model
from libs.logging import get_logger
from services.serving.ports import ModelLoadError, VersionRecord
from services.serving.routing import ServedModel

log = get_logger(__name__)


class ArtifactModelLoader:
    """:class:`services.serving.ports.ModelLoader` on :class:`libs.artifacts.ArtifactStore`."""

    def __init__(self, store: ArtifactStore, *, retry_failed_after_s: float = 30.0) -> None:
        self.store = store
        self.retry_failed_after_s = retry_failed_after_s
        self._estimators: dict[str, Any] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._lock = asyncio.Lock()

    async def load(self, record: VersionRecord) -> ServedModel:
        """The version, loaded and warmed; :class:`ModelLoadError` when it cannot serve."""
        if record.artifact_key is None or record.signature is None:
            raise ModelLoadError(f"{record.model} v{record.version} is not registered yet")
        key = record.artifact_key
        async with self._lock:  # one load per artifact, even when several rebuilds ask at once
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() - failed[0] < self.retry_failed_after_s:
                raise ModelLoadError(failed[1])
            estimator = self._estimators.get(key)
            if estimator is None:
                try:
                    estimator = await asyncio.to_thread(load_model, self.store, key)
                except (ArtifactError, OSError, ValueError) as exc:
                    message = f"{record.model} v{record.version}: artifact {key[:12]} cannot be loaded: {exc}"
                    self._failed[key] = (time.monotonic(), message)
                    raise ModelLoadError(message) from exc
            served = ServedModel(record.model, record.version, key, record.signature, estimator)
            try:
                await asyncio.to_thread(served.warm)
            except Exception as exc:
                message = f"{record.model} v{record.version}: warm-up prediction failed: {exc!r}"
                self._failed[key] = (time.monotonic(), message)
                raise ModelLoadError(message) from exc
            self._estimators[key] = estimator
            self._failed.pop(key, None)
            log.info("model loaded and warmed", model=record.model, version=record.version, artifact=key[:12])
            return served
