"""The artifact store: content addressing, hash checks on every read, and skops-only model loading."""

from __future__ import annotations

import errno
import io
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from libs.artifacts import (
    TRUSTED_TYPES,
    ArtifactCorrupted,
    ArtifactNotFound,
    ArtifactStore,
    StoreUnavailable,
    UntrustedArtifact,
    check_model,
    check_model_bytes,
    dump_model,
    load_model,
    load_model_bytes,
    save_model,
)
from libs.bus.core import Transience, transience
from tests.unit.store_fakes import FlakyStore


def pickle_that_creates(marker: Path, *, protocol: int) -> bytes:
    """A pickle stream that, when unpickled, calls ``open(marker, "w")``: the file appearing means it ran.

    Written opcode by opcode so no test imports a pickler to make it."""
    body = b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."
    return (b"\x80\x02" + body) if protocol == 2 else body


class Sneaky:
    """A type no model needs: skops records it, and the loader must refuse it."""

    def __init__(self) -> None:
        self.payload = "x"


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))


def stored_path(store: ArtifactStore, key: str) -> Path:
    return Path(store.root) / "sha256" / key[:2] / key


def small_model() -> object:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression().fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])


def test_same_content_is_stored_once_under_its_sha256(store: ArtifactStore) -> None:
    first = store.put(b"hello")
    second = store.put_chunks([b"hel", b"lo"])
    assert first == second
    assert first.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert store.get(first.sha256) == b"hello"
    assert len(list((Path(store.root) / "sha256").rglob("*"))) == 2  # one folder, one file


def test_keys_that_are_not_hashes_never_reach_the_file_system(store: ArtifactStore) -> None:
    for key in ("../../etc/passwd", "ABC", "a" * 63, "/abs/path", "a" * 64 + "\n"):
        with pytest.raises(ArtifactNotFound, match="not an artifact key"):
            store.get(key)


def test_missing_artifact_is_not_found(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound, match="no artifact"):
        store.get("0" * 64)


def test_the_size_of_an_artifact_comes_from_a_stat_with_nothing_of_it_read(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry answers a HEAD on a download from it: a file of hundreds of MB is not read for headers.
    key = store.put(b"content").sha256

    def opened(path: str, *args: object, **kwargs: object) -> object:
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(store.fs, "open", opened)
    assert store.size(key) == len(b"content")
    with pytest.raises(ArtifactNotFound, match="no artifact"):
        store.size("0" * 64)


def test_the_size_of_an_artifact_the_store_keeps_no_size_for_is_none_with_nothing_of_it_read(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some fsspec stores give no size (an HTTP server without Content-Length): int(None) was a TypeError.
    key = store.put(b"content").sha256
    info = store.fs.info

    def sizeless(path: str, **kwargs: object) -> dict[str, object]:
        return {**info(path, **kwargs), "size": None}

    def opened(path: str, *args: object, **kwargs: object) -> object:
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(store.fs, "info", sizeless)
    monkeypatch.setattr(store.fs, "open", opened)
    assert store.size(key) is None
    with pytest.raises(ArtifactNotFound, match="no artifact"):
        store.size("0" * 64)


def test_artifact_modified_on_disk_is_refused_with_a_clear_error(store: ArtifactStore) -> None:
    stored = save_model(store, small_model())
    path = stored_path(store, stored.sha256)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    for read in (lambda: store.get(stored.sha256), lambda: store.verify(stored.sha256)):
        with pytest.raises(ArtifactCorrupted, match=f"artifact {stored.sha256} is corrupted"):
            read()
    with pytest.raises(ArtifactCorrupted, match="restore it from a backup or retrain"):
        load_model(store, stored.sha256)
    with pytest.raises(ArtifactCorrupted):
        check_model(store, stored.sha256)


def test_streaming_a_modified_artifact_fails_before_the_last_chunk_is_accepted(store: ArtifactStore) -> None:
    key = store.put(b"original bytes").sha256
    stored_path(store, key).write_bytes(b"tampered bytes")
    chunks = store.stream(key)
    assert next(chunks) == b"tampered bytes"
    with pytest.raises(ArtifactCorrupted):
        next(chunks)


def test_parsed_read_of_a_modified_artifact_is_refused_whatever_the_parser_made_of_it(
    store: ArtifactStore,
) -> None:
    key = store.put(b"original bytes").sha256
    assert store.get_parsed(key, bytes.upper) == b"ORIGINAL BYTES"
    stored_path(store, key).write_bytes(b"tampered bytes")
    with pytest.raises(ArtifactCorrupted, match=f"artifact {key} is corrupted"):
        store.get_parsed(key, bytes.upper)

    def refuse(data: bytes) -> bytes:
        raise ValueError("not a table")

    with pytest.raises(ArtifactCorrupted):
        store.get_parsed(key, refuse)
    good = store.put(b"intact").sha256
    with pytest.raises(ValueError, match="not a table"):
        store.get_parsed(good, refuse)
    with pytest.raises(ArtifactNotFound):
        store.get_parsed("0" * 64, bytes.upper)


def test_a_store_told_to_try_again_does_so_for_its_own_failures_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = ArtifactStore(str(tmp_path))
    key = plain.put(b"content").sha256
    flaky = FlakyStore(monkeypatch)
    # By default one try, its OSError raised as StoreUnavailable, an outage whatever the OSError was: the
    # caller's own retry applies (serving's, the bus's, which retries an outage without limit).
    flaky.failing_reads[key] = 1
    with pytest.raises(
        StoreUnavailable, match=r"failed on reading .* \(TimeoutError: read timed out\)"
    ) as once:
        plain.get(key)
    assert isinstance(once.value.__cause__, TimeoutError) and flaky.reads[key] == 1
    flaky.failing_reads[key], flaky.reads[key] = 2, 0
    assert ArtifactStore(str(tmp_path), attempts=3, backoff_s=0).get(key) == b"content"
    assert flaky.reads[key] == 3
    flaky.failing_reads[key], flaky.reads[key] = 2, 0
    with pytest.raises(StoreUnavailable, match="failed 2 times in a row on reading") as failed:
        ArtifactStore(str(tmp_path), attempts=2, backoff_s=0).get(key)
    assert isinstance(failed.value, OSError) and flaky.reads[key] == 2
    flaky.failing_writes = 1
    assert ArtifactStore(str(tmp_path), attempts=2, backoff_s=0).put(b"more").size == 4
    # A missing artifact is its own fault: not tried again.
    with pytest.raises(ArtifactNotFound):
        ArtifactStore(str(tmp_path), attempts=3, backoff_s=0).get("0" * 64)
    assert flaky.reads["0" * 64] == 1
    with pytest.raises(ValueError, match="at least 1"):
        ArtifactStore(str(tmp_path), attempts=0)


@pytest.mark.parametrize("read", ["get", "verify", "stream"])
def test_every_oserror_of_the_store_is_an_outage_even_one_about_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    # The store names its files by hash: a PermissionError opening one is the store's (its folder's mode, its
    # bucket's policy), never the event's that named the key. Raised as an OSError about a path, the bus would
    # dead-letter the event; as StoreUnavailable, it waits for the store.
    store = ArtifactStore(str(tmp_path))
    key = store.put(b"content").sha256

    def refused(path: str, mode: str = "rb", **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(store.fs, "open", refused)
    with pytest.raises(
        StoreUnavailable, match=r"\(PermissionError: \[Errno 13\] Permission denied"
    ) as failed:
        if read == "stream":
            list(store.stream(key))
        else:
            getattr(store, read)(key)
    assert isinstance(failed.value.__cause__, PermissionError)
    assert transience(failed.value) is Transience.OUTAGE


@pytest.mark.parametrize("read", ["get", "verify", "stream", "size"])
def test_a_store_that_cannot_be_reached_is_an_outage_not_a_missing_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    # fsspec's exists answers False for any error of the file system (a timeout, an I/O error on a mount):
    # asked first, it made an unreachable store read as a missing artifact, which serving takes as the
    # version's fault and rejects it for good.
    store = ArtifactStore(str(tmp_path))
    key = store.put(b"content").sha256

    def unreachable(path: str, *args: object, **kwargs: object) -> object:
        raise TimeoutError("the store timed out")

    monkeypatch.setattr(store.fs, "info", unreachable)
    monkeypatch.setattr(store.fs, "open", unreachable)
    with pytest.raises(StoreUnavailable, match=r"\(TimeoutError: the store timed out\)") as failed:
        if read == "stream":
            list(store.stream(key))
        else:
            getattr(store, read)(key)
    assert transience(failed.value) is Transience.OUTAGE
    monkeypatch.undo()
    with pytest.raises(ArtifactNotFound, match="no artifact"):  # a file the store does not have is missing
        list(store.stream("0" * 64)) if read == "stream" else getattr(store, read)("0" * 64)


def test_model_file_holds_what_skops_itself_writes() -> None:
    import json

    import numpy as np
    import pandas as pd
    import skops.io
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=300), "c": rng.choice(["a", "b"], 300)})
    model = Pipeline(
        [
            (
                "preprocess",
                ColumnTransformer(
                    [("numeric", SimpleImputer(), ["x"]), ("categorical", OneHotEncoder(), ["c"])]
                ),
            ),
            ("estimator", HistGradientBoostingClassifier(max_iter=5, random_state=0)),
        ]
    ).fit(frame, (frame["x"] > 0).astype(int))
    ours = zipfile.ZipFile(io.BytesIO(dump_model(model)))
    theirs = zipfile.ZipFile(io.BytesIO(skops.io.dumps(model)))
    # Array entries and memo ids come from object ids, which differ between two dumps: compare them by
    # order of appearance.
    assert len(ours.namelist()) == len(theirs.namelist())
    for mine, skops_name in zip(ours.namelist(), theirs.namelist(), strict=True):
        assert (mine == "schema.json") == (skops_name == "schema.json")
        if mine != "schema.json":
            assert ours.read(mine) == theirs.read(skops_name), mine

    def numbered(node: object, seen: dict[object, int]) -> object:
        if isinstance(node, dict):
            return {
                k: seen.setdefault(v, len(seen)) if k in ("__id__", "file") else numbered(v, seen)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [numbered(v, seen) for v in node]
        return node

    ours_schema, skops_schema = ours.read("schema.json"), theirs.read("schema.json")
    assert numbered(json.loads(ours_schema), {}) == numbered(json.loads(skops_schema), {})
    assert len(ours_schema) < len(skops_schema)  # compact, not indented
    loaded = load_model_bytes(dump_model(model))
    assert loaded.predict_proba(frame).tolist() == model.predict_proba(frame).tolist()


def test_the_same_model_fitted_twice_gives_the_same_file() -> None:
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    for make in (
        lambda: HistGradientBoostingClassifier(max_iter=10, random_state=0),
        lambda: RandomForestClassifier(n_estimators=5, random_state=0),
    ):
        first, second = dump_model(make().fit(x, y)), dump_model(make().fit(x, y))
        assert first == second  # object ids and zip times would differ from dump to dump
        assert load_model_bytes(first).predict_proba(x).tolist() == make().fit(x, y).predict_proba(x).tolist()


def test_skops_model_round_trips_through_the_store(store: ArtifactStore) -> None:
    stored = save_model(store, small_model())
    model = load_model(store, stored.sha256)
    assert list(model.predict([[0.0], [3.0]])) == [0, 1]
    assert check_model(store, stored.sha256) == stored.size


@pytest.mark.parametrize("protocol", [0, 2])
def test_pickle_payload_is_refused_and_never_executed(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle_that_creates(marker, protocol=protocol)
    store = ArtifactStore(str(tmp_path / "artifacts"))
    key = store.put(payload).sha256

    for attempt in (
        lambda: load_model_bytes(payload),
        lambda: check_model_bytes(payload),
        lambda: load_model(store, key),
        lambda: check_model(store, key),
    ):
        with pytest.raises(UntrustedArtifact, match=r"pickle|not a skops file"):
            attempt()
    assert not marker.exists()


def test_the_pickle_payload_of_these_tests_is_live(tmp_path: Path) -> None:
    """Control: unpickled by an ordinary loader (in a throw-away process) the payload does run, so the
    refusals above prove something."""
    marker = tmp_path / "control"
    loader = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    for protocol in (0, 2):
        marker.unlink(missing_ok=True)
        subprocess.run(
            [sys.executable, "-c", loader], input=pickle_that_creates(marker, protocol=protocol), check=True
        )
        assert marker.exists()


def test_skops_file_with_an_untrusted_type_is_refused_naming_the_type() -> None:
    import skops.io

    blob = bytes(skops.io.dumps(Sneaky()))
    with pytest.raises(UntrustedArtifact, match=r"not trusted: tests\.unit\.test_artifacts\.Sneaky"):
        load_model_bytes(blob)


def test_zip_that_is_not_a_skops_file_is_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.txt", "not a model")
    with pytest.raises(UntrustedArtifact, match="not a readable skops file"):
        load_model_bytes(buf.getvalue())


def test_checking_a_model_lists_only_trusted_types() -> None:
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit([[0.0], [1.0]], [0, 1])
    types = check_model_bytes(dump_model(forest))
    assert types and set(types) <= TRUSTED_TYPES


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_storing_the_bytes_of_a_damaged_artifact_again_repairs_it(store: ArtifactStore, damage: str) -> None:
    # A crash (no fsync before the rename) can leave a stored file short, and a disk can alter one; the
    # error tells people to retrain, and a retrain writes the same bytes under the same key.
    model = dump_model(small_model())
    key = store.put(model).sha256
    path = stored_path(store, key)
    if damage == "truncated":
        path.write_bytes(model[: len(model) // 2])
    else:
        altered = bytearray(model)
        altered[len(altered) // 2] ^= 0xFF
        path.write_bytes(bytes(altered))
    with pytest.raises(ArtifactCorrupted):
        store.get(key)

    assert store.put(model).sha256 == key

    assert store.get(key) == model
    assert check_model(store, key) == len(model)
    assert not list((Path(store.root) / "tmp").iterdir())


def test_a_write_the_store_fails_partway_leaves_no_partial_file_behind(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk full: each try left its partial file, so every retry (the runner's wait for the store goes on
    # without end) took whatever room an operator freed, and the store never came back by itself.
    opened = store.fs.open

    def open_on_a_full_disk(path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = opened(path, mode, **kwargs)
        if "w" in mode:
            write = f.write

            def write_half(data: bytes) -> int:
                write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = write_half
        return f

    monkeypatch.setattr(store.fs, "open", open_on_a_full_disk)
    with pytest.raises(StoreUnavailable, match="failed 3 times"):
        ArtifactStore(store.url, attempts=3, backoff_s=0).put(b"model bytes " * 1000)
    assert list((Path(store.root) / "tmp").iterdir()) == []
    assert not (Path(store.root) / "sha256").exists()
