"""The registry's downloads (a version's model and profile, a dataset's file) answer HEAD as their GET, status
and headers, from the record and a stat of the stored file: a HEAD never reads or hashes the file, which for
a model of hundreds of MB took seconds of disk and CPU to send headers. The GET still hashes it before its
first byte.

A real artifact store in a temporary folder holds the files; the read pool stands in for Postgres with the
one row each download reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from contracts.common import ArtifactFormat, ArtifactRef
from contracts.examples import EXAMPLES
from contracts.training import TrainingCompleted
from libs.artifacts import ArtifactStore
from libs.http import create_app
from libs.profiles import build_profile
from services.registry import api
from services.registry.adapters.artifacts import StoreArtifacts
from services.registry.schemas import DatasetPublic
from services.registry.settings import RegistrySettings
from tests.unit.test_openapi_errors import conforms

VIEWER = {"Authorization": "Bearer dev-viewer"}
MODEL_URL = "/v1/models/churn/versions/1/artifact"
PROFILE_URL = MODEL_URL + "?kind=profile"
DATASET_URL = "/v1/datasets/churn-base/versions/1/file"
# What a HEAD has to say as its GET does; the Date and such a server adds are not the app's.
SAME = ("content-type", "content-length", "content-disposition", "etag", "x-content-sha256")
PROFILE = build_profile(
    pd.DataFrame({"tenure": [1.0, 2.0, 3.0], "plan": ["basic", "plus", "basic"]}),
    [("tenure", "numeric"), ("plan", "categorical")],
    predictions=pd.Series([0.1, 0.7, 0.4]),
)


class CountedArtifacts(StoreArtifacts):
    """The registry's store adapter, counting the calls that read a file's content."""

    def __init__(self, store: ArtifactStore) -> None:
        super().__init__(store)
        self.reads: list[str] = []

    async def verify(self, key: str) -> int:
        self.reads.append(f"verify {key}")
        return await super().verify(key)

    def stream(self, key: str) -> Iterator[bytes]:
        self.reads.append(f"stream {key}")
        return super().stream(key)


class Records:
    """Stands in for the read pool: its connection answers the version and the dataset reads with one row
    each, as Postgres would give them."""

    def __init__(self, version: dict[str, Any], dataset: DatasetPublic) -> None:
        self.version = version
        self.dataset = dataset

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Records]:
        yield self

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        if "FROM model_versions" in sql:
            return self.version if args == ("churn", 1) else None
        assert "FROM datasets" in sql, sql
        return self.dataset.model_dump() if args == ("churn-base", 1) else None


def version_row(done: TrainingCompleted) -> dict[str, Any]:
    """The row PgQueries.version reads for version 1 of ``done``'s model."""
    now = datetime.now(UTC)
    return {
        "model": done.model,
        "version": 1,
        "stage": "candidate",
        "aliases": [],
        "tags": {},
        "run_id": done.run_id,
        "metrics": done.metrics,
        "created_at": now,
        "stage_changed_at": now,
        "job_id": done.job_id,
        "artifact": done.artifact,
        "profile": done.profile,
        "features": done.signature.features,
        "target": done.signature.target,
        "task": done.signature.task,
        "classes": done.signature.classes,
        "train_rows": done.train_rows,
        "holdout_rows": done.holdout_rows,
        "duration_seconds": done.duration_seconds,
        "correlation_id": "corr-1",
        "datasets": [],
        "lineage": done.lineage,
        "history": [],
        "reports": [],
    }


class Registry:
    """The registry's routes on a store in a folder: ``refs`` names each download's file by its URL."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = ArtifactStore(str(tmp_path / "artifacts"))
        self.artifacts = CountedArtifacts(self.store)

        def put(data: bytes, fmt: ArtifactFormat) -> ArtifactRef:
            stored = self.store.put(data)
            return ArtifactRef(key=stored.sha256, uri=stored.uri, format=fmt, size_bytes=stored.size)

        base = EXAMPLES[TrainingCompleted]
        assert isinstance(base, TrainingCompleted)
        done = base.model_copy(
            update={
                "model": "churn",
                "artifact": put(b"PK model bytes " * 1000, ArtifactFormat.SKOPS),
                "profile": put(PROFILE.to_bytes(), ArtifactFormat.JSON),
            }
        )
        file = put(b"tenure,churned\n1,0\n2,1\n", ArtifactFormat.CSV)
        dataset = DatasetPublic(
            name="churn-base",
            version=1,
            sha256=file.key,
            artifact=file,
            row_count=2,
            columns={"tenure": "int64", "churned": "int64"},
            source="upload",
            derived_from=[],
            models=["churn"],
            description=None,
            registered_by="dev-operator",
            event_id="e-1",
            created_at=datetime.now(UTC),
        )
        self.refs = {MODEL_URL: done.artifact, PROFILE_URL: done.profile, DATASET_URL: file}
        settings = RegistrySettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
        self.app = create_app(
            settings, title="registry", description="", routers=[api.router], hot=[api.hot_router]
        )
        self.app.state.reads = Records(version_row(done), dataset)
        self.app.state.artifacts = self.artifacts

    def path_of(self, url: str) -> Path:
        key = self.refs[url].key
        return Path(self.store.root) / "sha256" / key[:2] / key

    async def get_and_head(
        self, url: str, headers: dict[str, str] | None = None
    ) -> tuple[httpx.Response, httpx.Response]:
        """The HEAD first, so what it read is in ``artifacts.reads`` alone until the GET."""
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as c:
            head = await c.head(url, headers={**VIEWER, **(headers or {})})
            assert self.artifacts.reads == [], "the HEAD read the file"
            return await c.get(url, headers={**VIEWER, **(headers or {})}), head


def assert_answered_alike(got: httpx.Response, head: httpx.Response) -> None:
    assert head.status_code == got.status_code, (got.status_code, head.status_code, got.text)
    assert {h: head.headers.get(h) for h in SAME} == {h: got.headers.get(h) for h in SAME}
    assert head.content == b""


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path)


@pytest.mark.parametrize("url", [MODEL_URL, PROFILE_URL, DATASET_URL])
async def test_a_head_on_a_download_gives_the_gets_headers_without_reading_the_file(
    registry: Registry, url: str
) -> None:
    got, head = await registry.get_and_head(url)
    assert got.status_code == 200, got.text
    ref = registry.refs[url]
    assert got.content == registry.path_of(url).read_bytes()
    assert hashlib.sha256(got.content).hexdigest() == ref.key
    assert registry.artifacts.reads == [f"verify {ref.key}", f"stream {ref.key}"]  # the GET's, hashed first
    assert_answered_alike(got, head)
    assert head.headers["content-length"] == str(ref.size_bytes)
    assert head.headers["etag"] == f'"{ref.key}"'


@pytest.mark.parametrize(
    ("url", "path"),
    [
        (MODEL_URL, "/v1/models/{model}/versions/{version}/artifact"),
        (PROFILE_URL, "/v1/models/{model}/versions/{version}/artifact"),
        (DATASET_URL, "/v1/datasets/{name}/versions/{version}/file"),
    ],
)
async def test_a_download_is_sent_as_a_media_type_the_document_names(
    registry: Registry, url: str, path: str
) -> None:
    """A file is documented as one in each media type it may come in; the profile, JSON of a known
    structure, as that structure."""
    got, _ = await registry.get_and_head(url)
    assert got.status_code == 200, got.text
    content = registry.app.openapi()["paths"][path]["get"]["responses"]["200"]["content"]
    media_type = got.headers["content-type"].partition(";")[0]
    assert media_type in content
    if media_type == "application/json":
        assert conforms(registry.app.openapi(), path, "get", got) == []
    else:
        assert content[media_type]["schema"] == {"type": "string", "format": "binary"}


@pytest.mark.parametrize("url", [MODEL_URL, DATASET_URL])
async def test_a_file_altered_but_of_its_length_is_refused_by_the_get_and_not_looked_for_by_a_head(
    registry: Registry, url: str
) -> None:
    # A HEAD sends none of the file's bytes: only the GET, which does, hashes them (docs/registry.md).
    path = registry.path_of(url)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    got, head = await registry.get_and_head(url)
    assert got.status_code == 500 and got.json()["code"] == "artifact-corrupted", got.text
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(registry.refs[url].size_bytes)


@pytest.mark.parametrize("url", [MODEL_URL, DATASET_URL])
async def test_a_file_of_another_length_than_registered_is_refused_alike_by_head_and_get_from_a_stat(
    registry: Registry, url: str
) -> None:
    path = registry.path_of(url)
    path.write_bytes(path.read_bytes()[:-1])
    got, head = await registry.get_and_head(url)
    assert got.status_code == 500, got.text
    body = got.json()
    assert body["code"] == "artifact-corrupted"
    size = registry.refs[url].size_bytes
    assert f"the store holds {size - 1:,} bytes of it where {size:,} were registered" in body["detail"]
    assert "restore it from a backup or retrain" in body["detail"]
    assert registry.artifacts.reads == []  # nothing hashed: bytes of another length cannot be the file
    assert_answered_alike(got, head)


@pytest.mark.parametrize("url", [MODEL_URL, DATASET_URL])
async def test_a_file_missing_from_the_store_is_404_for_head_and_get(registry: Registry, url: str) -> None:
    registry.path_of(url).unlink()
    got, head = await registry.get_and_head(url)
    assert got.status_code == 404, got.text
    assert f"artifact {registry.refs[url].key} is not in the store" in got.json()["detail"]
    assert_answered_alike(got, head)


@pytest.mark.parametrize("url", [MODEL_URL, DATASET_URL])
async def test_a_head_naming_the_files_etag_is_the_gets_304(registry: Registry, url: str) -> None:
    etag = f'"{registry.refs[url].key}"'
    got, head = await registry.get_and_head(url, {"If-None-Match": f'"other", W/{etag}'})
    assert got.status_code == 304 and head.headers["etag"] == etag
    assert registry.artifacts.reads == []
    assert_answered_alike(got, head)
    got, head = await registry.get_and_head(url, {"If-None-Match": '"other"'})
    assert got.status_code == 200
    assert_answered_alike(got, head)


@pytest.mark.parametrize("url", [MODEL_URL, DATASET_URL])
async def test_in_a_store_that_keeps_no_sizes_a_head_answers_from_the_record_and_the_get_hashes(
    registry: Registry, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some fsspec stores give no size (an HTTP server without Content-Length): the stat cannot tell a file of
    # another length, so the HEAD answers from the record, reading nothing, and the GET finds it by the hash.
    info = registry.store.fs.info
    monkeypatch.setattr(registry.store.fs, "info", lambda path, **kw: {**info(path, **kw), "size": None})
    got, head = await registry.get_and_head(url)
    assert got.status_code == 200, got.text
    assert got.content == registry.path_of(url).read_bytes()
    assert_answered_alike(got, head)
    path = registry.path_of(url)
    path.write_bytes(path.read_bytes()[:-1])
    registry.artifacts.reads.clear()
    got, head = await registry.get_and_head(url)
    assert got.status_code == 500 and got.json()["code"] == "artifact-corrupted", got.text
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(registry.refs[url].size_bytes)


async def test_in_a_store_that_keeps_no_sizes_a_get_refuses_a_file_whose_record_misstates_its_length(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sound bytes, but a Content-Length from the record they would not fill: found once the GET read them.
    info = registry.store.fs.info
    monkeypatch.setattr(registry.store.fs, "info", lambda path, **kw: {**info(path, **kw), "size": None})
    records = registry.app.state.reads
    ref = registry.refs[DATASET_URL]
    misstated = ref.model_copy(update={"size_bytes": ref.size_bytes + 1})
    records.dataset = records.dataset.model_copy(update={"artifact": misstated})
    transport = httpx.ASGITransport(app=registry.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as c:
        got = await c.get(DATASET_URL, headers=VIEWER)
    assert got.status_code == 500 and got.json()["code"] == "artifact-corrupted", got.text
    expected = f"the store holds {ref.size_bytes:,} bytes of it where {ref.size_bytes + 1:,} were registered"
    assert expected in got.json()["detail"]
