"""The Artifacts port on libs.artifacts' content-addressed store (file I/O and parsing off the event loop)."""

from __future__ import annotations

import asyncio

from pydantic import ValidationError

from contracts.common import ArtifactFormat, ArtifactRef
from libs.artifacts import ArtifactError, ArtifactStore
from libs.profiles import ReferenceProfile
from services.monitoring.ports import ProfileUnavailable


class StoreArtifacts:
    """Reference profiles in, window data (Parquet) out."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    async def profile(self, ref: ArtifactRef) -> ReferenceProfile:
        try:
            # Read and parsed in a thread: an old id-like profile is megabytes of JSON (~0.1 s to parse).
            return await asyncio.to_thread(lambda: ReferenceProfile.from_bytes(self.store.get(ref.key)))
        except (ArtifactError, ValidationError, ValueError) as exc:
            raise ProfileUnavailable(f"reference profile {ref.key} cannot be loaded: {exc}") from exc

    async def put_parquet(self, data: bytes) -> ArtifactRef:
        stored = await asyncio.to_thread(self.store.put, data)
        return ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.PARQUET, size_bytes=stored.size
        )
