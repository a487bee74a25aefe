"""Specs in the content-addressed artifact store, where validation reads them by key."""

from __future__ import annotations

import asyncio

from contracts.common import ArtifactFormat, ArtifactRef
from libs.artifacts import ArtifactStore
from libs.modelspec import ModelSpec


class StoreSpecs:
    """The SpecStore port on the artifact store: canonical JSON, keyed by its sha256 (the spec hash)."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    async def put_spec(self, spec: ModelSpec) -> ArtifactRef:
        stored = await asyncio.to_thread(self.store.put, spec.canonical_json())
        return ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.JSON, size_bytes=stored.size
        )
