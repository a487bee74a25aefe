"""An artifact store that fails as one that cannot be reached does, for the tests of the rule that a store
failing for a moment is tried again in place while a corrupted artifact is not."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pytest

from libs.artifacts import ArtifactStore, StoredArtifact


class FlakyStore:
    """Every ArtifactStore (the fit's too) fails reads of the keys in ``failing_reads`` (that many times
    each) and the next ``failing_writes`` writes with an OSError; ``reads`` counts the tries per key."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing_reads: dict[str, int] = {}
        self.failing_writes = 0
        self.reads: Counter[str] = Counter()
        read, write = ArtifactStore._read_once, ArtifactStore.put_chunks

        def read_once(store: ArtifactStore, key: str) -> bytes:
            self.reads[key] += 1
            if self.failing_reads.get(key, 0) > 0:
                self.failing_reads[key] -= 1
                raise TimeoutError("read timed out")
            return read(store, key)

        def put_chunks(store: ArtifactStore, chunks: Iterable[bytes]) -> StoredArtifact:
            if self.failing_writes > 0:
                self.failing_writes -= 1
                raise ConnectionError("artifact store unreachable")
            return write(store, chunks)

        monkeypatch.setattr(ArtifactStore, "_read_once", read_once)
        monkeypatch.setattr(ArtifactStore, "put_chunks", put_chunks)
