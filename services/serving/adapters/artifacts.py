"""Models from the shared artifact store: skops with the trusted-type list, compiled (when a verified
compiled copy can be had), loaded and warmed off the event loop, cached by artifact key while the routing
table serves them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any

from prometheus_client import Counter

from contracts.common import ModelSignature
from libs.artifacts import ArtifactError, ArtifactStore, load_model
from libs.bus.core import is_transient
from libs.logging import get_logger
from services.serving.compiled import DEFAULT_TOLERANCE, CompiledModel, NotCompilable, compile_model
from services.serving.metrics import ENGINE
from services.serving.ports import ModelLoadError, VersionRecord
from services.serving.routing import ServedModel

log = get_logger(__name__)

NOT_COMPILED = Counter(
    "driftloop_serving_compile_fallbacks_total",
    "Loaded versions served by their pipeline because no verified compiled copy could be had "
    "(the reason is logged and shown in the model's metadata).",
)


def compile_or_explain(
    estimator: Any, signature: ModelSignature, *, enabled: bool, tolerance: float
) -> tuple[CompiledModel | None, str]:
    """A verified compiled copy, or None and why the pipeline serves (CPU-bound: run it off the loop).

    Compiling is an optimisation of a model that loaded and is then warmed on its pipeline: whatever it
    raises, the pipeline serves. Raised from here, an error of the compiler's own (a scaler fitted
    with_std=False made it raise TypeError) failed the load, and a version its pipeline serves well was
    never served: its rollout's event went to the dead-letter topic, retried as a handler failure."""
    if not enabled:
        return None, "compilation is off (DRIFTLOOP_SERVING_COMPILE_MODELS=false)"
    try:
        return compile_model(estimator, signature, tolerance=tolerance), ""
    except NotCompilable as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"compiling failed: {type(exc).__name__}: {exc}"


class ArtifactModelLoader:
    """:class:`services.serving.ports.ModelLoader` on :class:`libs.artifacts.ArtifactStore`."""

    def __init__(
        self,
        store: ArtifactStore,
        *,
        retry_failed_after_s: float = 30.0,
        compile_models: bool = True,
        compile_tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        self.store = store
        self.retry_failed_after_s = retry_failed_after_s
        self.compile_models = compile_models
        self.compile_tolerance = compile_tolerance
        self._estimators: dict[str, tuple[Any, CompiledModel | None, str]] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._lock = asyncio.Lock()

    async def load(self, record: VersionRecord) -> ServedModel:
        """The version, loaded, compiled when possible and warmed; :class:`ModelLoadError` when the version
        cannot serve (its artifact or its warm-up at fault); an infrastructure failure (``is_transient``: the
        store unreachable, timing out) is raised as it is, and remembered as nothing."""
        if record.artifact_key is None or record.signature is None:
            raise ModelLoadError(f"{record.model} v{record.version} is not registered yet")
        key = record.artifact_key
        async with self._lock:  # one load per artifact, even when several rebuilds ask at once
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() - failed[0] < self.retry_failed_after_s:
                raise ModelLoadError(failed[1])
            cached = self._estimators.get(key)
            # Compiled by this call, not taken from the cache: the replica that decides a rollout loads the
            # version in its handler and its routing sync asks again, which counted and logged one version
            # served by its pipeline twice (and again at each command naming it).
            compiled_here = cached is None
            if cached is None:
                try:
                    estimator = await asyncio.to_thread(load_model, self.store, key)
                except OSError:
                    # The store unreachable is the infrastructure's fault, not the version's: raised as it
                    # is (StoreUnavailable, an outage), so the event that asked is retried without limit, and
                    # nothing is remembered as failed.
                    raise
                # The artifact's own faults: missing, corrupted (its hash), untrusted types, not loadable.
                except (ArtifactError, ValueError) as exc:
                    message = f"{record.model} v{record.version}: artifact {key[:12]} cannot be loaded: {exc}"
                    self._remember_failure(key, message)
                    raise ModelLoadError(message) from exc
                compiled, note = await asyncio.to_thread(
                    compile_or_explain,
                    estimator,
                    record.signature,
                    enabled=self.compile_models,
                    tolerance=self.compile_tolerance,
                )
                cached = (estimator, compiled, note)
            estimator, compiled, note = cached
            served = ServedModel(
                record.model, record.version, key, record.signature, estimator, compiled, note
            )
            try:
                await asyncio.to_thread(served.warm)
            except Exception as exc:
                if is_transient(exc):
                    # Not the model's own code failing: raised as it is, for the caller to retry (the bus
                    # retries an outage without limit), and nothing is remembered as failed.
                    raise
                message = f"{record.model} v{record.version}: warm-up prediction failed: {exc!r}"
                self._remember_failure(key, message)
                raise ModelLoadError(message) from exc
            self._estimators[key] = cached
            self._failed.pop(key, None)
            ENGINE.labels(record.model, str(record.version), served.engine).set(1)
            if compiled is None and self.compile_models and compiled_here:
                NOT_COMPILED.inc()
                log.warning(
                    "model served by its pipeline, not compiled",
                    model=record.model,
                    version=record.version,
                    reason=note,
                )
            log.info(
                "model loaded and warmed",
                model=record.model,
                version=record.version,
                artifact=key[:12],
                engine=served.engine,
                max_abs_diff=compiled.max_abs_diff if compiled else None,
            )
            return served

    def keep_served(self, artifact_keys: Collection[str]) -> None:
        """Drop every cached model whose artifact is not in ``artifact_keys`` (the new routing table's), and
        every failure past its retry delay."""
        # Synchronous, on the event loop, so never in the middle of a load's own dictionary work. A load
        # awaiting its warm-up when this runs puts its model back when done; if that model does not serve,
        # the next swap drops it.
        for key in [k for k in self._estimators if k not in artifact_keys]:
            del self._estimators[key]
            log.info("model unloaded, no longer served", artifact=key[:12])
        self._forget_expired_failures(time.monotonic())

    def _remember_failure(self, key: str, message: str) -> None:
        now = time.monotonic()
        self._forget_expired_failures(now)
        self._failed[key] = (now, message)

    def _forget_expired_failures(self, now: float) -> None:
        # A failure only holds off retries for retry_failed_after_s; kept longer it would only grow this with
        # every version that never loads.
        for key in [k for k, (at, _) in self._failed.items() if now - at >= self.retry_failed_after_s]:
            del self._failed[key]
