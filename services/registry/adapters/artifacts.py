"""The :class:`services.registry.ports.Artifacts` port on libs.artifacts (the one artifact store).

fsspec is blocking, so every call that reads or writes a whole artifact runs in a worker thread and the
event loop keeps serving requests and polling Kafka meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from contracts.common import ArtifactFormat, ArtifactRef
from libs.artifacts import ArtifactStore, check_model


class StoreArtifacts:
    """Artifacts in a content-addressed :class:`ArtifactStore`."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    async def check_model(self, key: str) -> int:
        return await asyncio.to_thread(check_model, self.store, key)

    async def verify(self, key: str) -> int:
        return await asyncio.to_thread(self.store.verify, key)

    async def size(self, key: str) -> int | None:
        return await asyncio.to_thread(self.store.size, key)

    async def put(self, data: bytes) -> ArtifactRef:
        stored = await asyncio.to_thread(self.store.put, data)
        return ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.PARQUET, size_bytes=stored.size
        )

    def uri(self, key: str) -> str:
        return self.store.uri(key)

    def stream(self, key: str) -> Iterator[bytes]:
        return self.store.stream(key)
