"""A content-addressed artifact store, and the only way models are saved and loaded.

Keys are sha256 hashes of the content, never user paths, and every read verifies the hash. The store
is a local folder by default and any fsspec URL (``s3://bucket/prefix``, ``gcs://...``) when configured.
Models are written with skops and loaded only if every type in them is on an explicit trusted list;
pickle and joblib blobs are refused before any of their bytes are interpreted.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec

from libs.errors import Outage
from libs.logging import get_logger

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1024 * 1024
T = TypeVar("T")
log = get_logger(__name__)

STORE_ATTEMPTS = 5
"""Tries of one read or write of the store, for the services that retry in place (training, validation)."""
STORE_RETRY_BACKOFF_S = 1.0
"""The wait before the second try; it doubles before each next (1 + 2 + 4 + 8 s: 15 s in all)."""

# Types a driftloop model may contain beyond what skops trusts by default: the estimators, transformers
# and numpy/scipy pieces that the training service's specs can build. Anything else is refused.
TRUSTED_TYPES: frozenset[str] = frozenset(
    {
        "builtins.slice",
        "collections.OrderedDict",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.float64",
        "numpy.int64",
        "numpy.random._mt19937.MT19937",
        "numpy.random.mtrand.RandomState",
        "scipy.sparse._csr.csr_matrix",
        "sklearn.compose._column_transformer.ColumnTransformer",
        "sklearn.compose._column_transformer._RemainderColsList",
        "sklearn.pipeline.Pipeline",
        "sklearn.preprocessing._encoders.OneHotEncoder",
        "sklearn.preprocessing._data.StandardScaler",
        "sklearn.impute._base.SimpleImputer",
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.linear_model._ridge.Ridge",
        "sklearn.linear_model._base.LinearRegression",
        "sklearn.ensemble._forest.RandomForestClassifier",
        "sklearn.ensemble._forest.RandomForestRegressor",
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingRegressor",
        "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn._loss.link.Interval",
        "sklearn._loss.link.IdentityLink",
        "sklearn._loss.link.LogitLink",
        "sklearn._loss.link.MultinomialLogit",
        "sklearn._loss.loss.HalfBinomialLoss",
        "sklearn._loss.loss.HalfMultinomialLoss",
        "sklearn._loss.loss.HalfSquaredError",
        "sklearn.tree._classes.DecisionTreeClassifier",
        "sklearn.tree._classes.DecisionTreeRegressor",
        "sklearn.tree._tree.Tree",
        "sklearn.dummy.DummyClassifier",
        "sklearn.dummy.DummyRegressor",
    }
)


class ArtifactError(Exception):
    """Base of artifact store errors."""


class ArtifactNotFound(ArtifactError):
    """No artifact has that key."""


class ArtifactCorrupted(ArtifactError):
    """The stored bytes no longer hash to their key: the artifact was modified or damaged."""


class UntrustedArtifact(ArtifactError):
    """The blob is not a skops file, or holds types outside the trusted list."""


class StoreUnavailable(Outage):
    """The store failed (unreachable, timing out, refusing: an OSError) on every one of a bounded number of
    tries of one read or write (one try, for a store made without ``attempts``). The artifact itself may be
    fine: the store names its files by their hash, never by anything an event or a request chose, so none of
    its OSErrors, a FileNotFoundError or a PermissionError included, is the caller's fault. An
    :class:`~libs.errors.Outage`, so a caller that does not answer it on its own leaves it to the bus, which
    retries the event without limit."""


class UnloadableArtifact(ArtifactError):
    """The blob passed the checks, but skops cannot build the model from it (damaged content, or written by
    an incompatible version)."""


def _unavailable(what: str, exc: OSError) -> StoreUnavailable:
    """One try of ``what`` failed with ``exc``."""
    return StoreUnavailable(
        f"the artifact store failed on {what} ({type(exc).__name__}: {exc}); the artifact itself may be "
        "fine: check that the store is reachable"
    )


@dataclass(frozen=True)
class StoredArtifact:
    """Where an artifact is: its key (sha256), its size and a URI for people."""

    sha256: str
    size: int
    uri: str


def check_key(key: str) -> str:
    """Keys are hashes; anything else (a path, ``..``) is refused before it reaches the file system."""
    if not _SHA256.fullmatch(key):
        raise ArtifactNotFound(f"{key!r} is not an artifact key (64 lower-case hex digits)")
    return key


class ArtifactStore:
    """Content-addressed blobs under ``<root>/sha256/<2 hex>/<64 hex>``.

    ``attempts``: how often one ``get`` (or ``get_parsed``'s read) or ``put`` is tried when the store fails
    with an OSError (unreachable, timing out), waiting ``backoff_s`` before the second try and twice as long
    before each next; the last failure is raised as :class:`StoreUnavailable`. An artifact that is missing,
    corrupted or untrusted (:class:`ArtifactError`) is its own fault and is not tried again. None (the
    default): one try, its OSError raised as :class:`StoreUnavailable` too (the caller retries, or the bus
    does)."""

    def __init__(
        self, url: str, *, attempts: int | None = None, backoff_s: float = STORE_RETRY_BACKOFF_S
    ) -> None:
        if attempts is not None and attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.attempts = attempts
        self.backoff_s = backoff_s

    def _tried(self, what: str, action: Callable[[], T]) -> T:
        """``action()`` (one read or write of the store), tried as ``attempts`` says."""
        attempt, delay = 1, self.backoff_s
        while True:
            try:
                return action()
            except OSError as exc:
                if self.attempts is None:
                    raise _unavailable(what, exc) from exc
                if attempt >= self.attempts:
                    raise StoreUnavailable(
                        f"the artifact store failed {attempt} times in a row on {what} "
                        f"({type(exc).__name__}: {exc}); the artifact itself may be fine: check that the "
                        "store is reachable"
                    ) from exc
                log.warning(
                    "artifact store failed, trying again",
                    what=what,
                    attempt=attempt,
                    error=repr(exc),
                    delay_s=delay,
                )
                time.sleep(delay)
                attempt, delay = attempt + 1, delay * 2

    def _path(self, key: str) -> str:
        check_key(key)
        return f"{self.root}/sha256/{key[:2]}/{key}"

    def uri(self, key: str) -> str:
        return f"{self.url}/sha256/{key[:2]}/{key}"

    def put(self, data: bytes) -> StoredArtifact:
        """Store bytes; storing the same content twice keeps one file (a damaged one is replaced)."""
        return self._tried("a write", lambda: self.put_chunks([data]))

    def put_chunks(self, chunks: Iterable[bytes]) -> StoredArtifact:
        """Store a stream of chunks without holding it in memory; returns its key once hashed."""
        digest = hashlib.sha256()
        size = 0
        tmp = f"{self.root}/tmp/{uuid.uuid4().hex}"
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            key = digest.hexdigest()
            final = self._path(key)
            if self.fs.exists(final) and self._holds(final, key, size):
                self.fs.rm(tmp)
            else:
                self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(tmp, final)
        except BaseException:
            # A write that fails partway (a full disk) must not keep its part: each retry would keep
            # another, taking whatever room is freed, and the store would never come back by itself.
            with suppress(OSError):
                self.fs.rm(tmp)
            raise
        return StoredArtifact(key, size, self.uri(key))

    def _holds(self, path: str, key: str, size: int) -> bool:
        """Whether the file stored at ``path`` is whole (``size`` bytes hashing to ``key``). A crash can
        leave one short (nothing is synced before the rename) and a disk can alter one; the same bytes
        stored again (a retrain writes the same key, as ArtifactCorrupted advises) must then replace it,
        not be taken for a copy already there."""
        if self.fs.size(path) == size:
            digest = hashlib.sha256()
            with self.fs.open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() == key:
                return True
        log.warning("stored artifact is damaged; replaced by the bytes stored again", key=key)
        return False

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def get(self, key: str) -> bytes:
        """The artifact's bytes, verified against its key."""
        data = self._read(key)
        self._check(key, hashlib.sha256(data).hexdigest())
        return data

    def get_parsed(self, key: str, parse: Callable[[bytes], T]) -> T:
        """``parse`` of the artifact's bytes, run while another thread verifies them against the key.

        The result is returned only once the hash matches; a corrupted artifact raises
        :class:`ArtifactCorrupted` whatever ``parse`` made of it (an error included). Reading a 12 MB
        Parquet file this way overlaps its 8 ms hash with the decoding instead of adding it.
        """
        data = self._read(key)
        digest: list[str] = []
        hasher = threading.Thread(target=lambda: digest.append(hashlib.sha256(data).hexdigest()))
        hasher.start()
        try:
            parsed = parse(data)
        except BaseException:
            hasher.join()
            self._check(key, digest[0] if digest else hashlib.sha256(data).hexdigest())
            raise
        hasher.join()
        self._check(key, digest[0] if digest else hashlib.sha256(data).hexdigest())
        return parsed

    def _read(self, key: str) -> bytes:
        return self._tried(f"reading {key}", lambda: self._read_once(key))

    def _read_once(self, key: str) -> bytes:
        # Opened without asking ``fs.exists`` first: fsspec's exists answers False for any error of the store
        # (a timeout, an I/O error), which made an outage read as a missing artifact, the artifact's fault.
        with self._opened(key) as f:
            # One read: the bytes end up in memory anyway, and joining chunks would copy them once more.
            return bytes(f.read())

    def _opened(self, key: str) -> Any:
        """The artifact's file, open for reading; :class:`ArtifactNotFound` when the store has no such file
        (only then: any other OSError is the store's, raised as it is for the caller to make it
        :class:`StoreUnavailable`)."""
        try:
            return self.fs.open(self._path(key), "rb")
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {key}") from None

    @staticmethod
    def _check(key: str, digest: str) -> None:
        if digest != key:
            raise ArtifactCorrupted(
                f"artifact {key} is corrupted: its content hashes to {digest}; "
                "restore it from a backup or retrain"
            )

    def size(self, key: str) -> int | None:
        """The stored file's size in bytes, from the store's metadata (a stat; nothing of the file is read);
        :class:`ArtifactNotFound` when the store has no such file. None when the store keeps no size for a
        file it has (fsspec's ``size`` is None: an HTTP server that sends no Content-Length): only reading
        the file tells its length then, and whether that is worth it is the caller's to decide (``int(None)``
        raised a TypeError, which a download answered 500 and the bus retried as a handler's bug). One try:
        an OSError of the store is raised as :class:`StoreUnavailable`, as by :meth:`stream`."""
        path = self._path(key)
        try:
            size = self.fs.size(path)
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {key}") from None
        except OSError as exc:
            raise _unavailable(f"the size of {key}", exc) from exc
        return None if size is None else int(size)

    def verify(self, key: str) -> int:
        """Hash the stored bytes; returns the size, or raises :class:`ArtifactCorrupted`."""
        return sum(len(c) for c in self.stream(key))

    def stream(self, key: str) -> Iterator[bytes]:
        """Chunks of the artifact; the last step verifies the hash, so a consumer never silently gets
        modified bytes (verify first with :meth:`verify` when nothing may be sent before the check). One
        try: an OSError of the store is raised as :class:`StoreUnavailable`, as without ``attempts``."""
        digest = hashlib.sha256()
        try:
            with self._opened(key) as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    yield chunk
        except OSError as exc:
            raise _unavailable(f"reading {key}", exc) from exc
        self._check(key, digest.hexdigest())


# --- tables ---------------------------------------------------------------------------------------


def frame_to_parquet(frame: Any) -> bytes:
    """Parquet bytes of a DataFrame (pyarrow, no index), dictionary-encoding only non-float columns.

    Measured on 10,000 x 30 training rows: trying a dictionary on continuous floats (pyarrow's default)
    is most of the write time and the fallback pages end up larger; categories, labels and ids still get
    one.
    """
    import pandas as pd

    dictionary = [str(c) for c in frame.columns if not pd.api.types.is_float_dtype(frame[c])]
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, engine="pyarrow", use_dictionary=dictionary)
    return buffer.getvalue()


# --- models ---------------------------------------------------------------------------------------

_PICKLE_PROTOCOL = re.compile(rb"^\x80[\x02-\x05]")


class _HeldEntries:
    """Stands in for the zip file skops writes into (``writestr`` and ``namelist`` are all it uses), so the
    entries can be renamed before the real file is written."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def namelist(self) -> list[str]:
        return list(self.files)

    def writestr(self, name: str, data: Any) -> None:
        self.files[name] = bytes(data)


def _renumbered(node: Any, ids: dict[int, int], files: dict[str, str], held: dict[str, bytes]) -> Any:
    """The schema with skops' object ids (``__id__``) and array file names, which come from memory
    addresses, replaced by their order of first appearance."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "__id__" and type(value) is int:
                out[key] = ids.setdefault(value, len(ids))
            elif key == "file" and type(value) is str and value in held:
                out[key] = files.setdefault(value, f"{len(files)}.{value.rpartition('.')[2]}")
            else:
                out[key] = _renumbered(value, ids, files, held)
        return out
    if isinstance(node, list | tuple):  # skops keeps some contents as tuples; JSON writes them as lists
        return [_renumbered(value, ids, files, held) for value in node]
    return node


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # no clock in the file
    info.external_attr = 0o644 << 16
    return info


def dump_model(model: Any) -> bytes:
    """Serialise a fitted scikit-learn object with skops, byte for byte the same for the same model.

    The file holds what ``skops.io.dumps`` writes — the same entries and the same schema — with three
    differences: the schema JSON is compact (skops indents it, which sends it through Python's pure-Python
    JSON encoder: about half the time it takes to save a boosted model of 89 trees); object ids and array
    file names, which skops takes from memory addresses, are numbered by first appearance; and the zip
    entries carry a fixed time. So the same data and spec give the same artifact key, not only the same
    metrics. ``skops.io.load`` reads it as its own. tests/unit/test_artifacts.py checks it against skops'
    own writer on every run, so a skops upgrade that changes its writer shows up there.
    """
    import skops
    import skops.io

    try:
        from skops.io._utils import SaveContext, get_state
    except ImportError:  # a skops without these helpers: its own writer
        return bytes(skops.io.dumps(model))
    held = _HeldEntries()
    context = SaveContext(zip_file=held)
    state = get_state(model, context)
    context.clear_memo()
    state["protocol"] = context.protocol
    state["_skops_version"] = skops.__version__
    files: dict[str, str] = {}
    schema = json.dumps(_renumbered(state, {}, files, held.files))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zip_file:
        for old, new in files.items():
            zip_file.writestr(_entry(new), held.files[old])
        for name in sorted(held.files.keys() - files.keys()):  # not named by the schema (never seen)
            zip_file.writestr(_entry(name), held.files[name])
        zip_file.writestr(_entry("schema.json"), schema)
    return buffer.getvalue()


def check_model_bytes(data: bytes, *, trusted: frozenset[str] = TRUSTED_TYPES) -> list[str]:
    """Refuse pickles, non-skops blobs and untrusted types without constructing anything; returns the
    types outside skops' own defaults that the blob holds (all of them in ``trusted``)."""
    import skops.io

    if _PICKLE_PROTOCOL.match(data) or data[:1] in (b"(", b"]", b"}"):
        raise UntrustedArtifact("the artifact is a pickle (or joblib) stream; only skops files are loaded")
    if not data.startswith(b"PK"):
        raise UntrustedArtifact("the artifact is not a skops file (no zip header)")
    try:
        untrusted = skops.io.get_untrusted_types(data=data)
    except Exception as exc:
        raise UntrustedArtifact(f"the artifact is not a readable skops file: {exc}") from exc
    refused = sorted(set(untrusted) - trusted)
    if refused:
        raise UntrustedArtifact(f"the model holds types that are not trusted: {', '.join(refused)}")
    return list(untrusted)


def load_model_bytes(data: bytes, *, trusted: frozenset[str] = TRUSTED_TYPES) -> Any:
    """Load a skops blob, refusing pickles and any type not in ``trusted`` — before running any of it."""
    import skops.io

    trusted_types = check_model_bytes(data, trusted=trusted)
    try:
        return skops.io.load(io.BytesIO(data), trusted=trusted_types)
    except Exception as exc:
        # Whatever a damaged file makes skops raise (a JSON, key or type error deep in its loaders), it is
        # the artifact's fault: one error its callers already answer.
        raise UnloadableArtifact(f"the skops file cannot be loaded: {type(exc).__name__}: {exc}") from exc


def save_model(store: ArtifactStore, model: Any) -> StoredArtifact:
    """Store a model as a skops artifact."""
    return store.put(dump_model(model))


def load_model(store: ArtifactStore, key: str, *, trusted: frozenset[str] = TRUSTED_TYPES) -> Any:
    """Load a model by key: hash verified, skops only, trusted types only."""
    return load_model_bytes(store.get(key), trusted=trusted)


def check_model(store: ArtifactStore, key: str, *, trusted: frozenset[str] = TRUSTED_TYPES) -> int:
    """Check a stored model without loading it (hash, skops, trusted types); returns its size."""
    data = store.get(key)
    check_model_bytes(data, trusted=trusted)
    return len(data)
