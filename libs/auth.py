"""Bearer tokens with roles. Tokens are stored only as sha256 hashes; one FastAPI dependency checks them.

Roles: ``viewer`` reads, ``operator`` also sends commands, ``auditor`` reads what a viewer reads and the
traffic data in the audit trail (the model's inputs, outputs and labels, often personal data), ``admin`` may
do everything but predict, and ``predict`` may only call prediction and feedback endpoints — so a leaked
client token cannot move a model, and an operator's token is never spread across client programs. A
``predict`` token may further be limited to named models (its ``models``), so that one client program's
token cannot score another's model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from contracts.common import NAME_MAX_CHARS, NAME_PATTERN, unstorable_text
from contracts.envelope import MAX_ATTRIBUTE_CHARS, attribute_text_problem
from libs.errors import Forbidden, Unauthorized, shown


class Role(StrEnum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"
    predict = "predict"
    auditor = "auditor"


# Which roles satisfy a required role.
GRANTS: dict[Role, frozenset[Role]] = {
    Role.viewer: frozenset({Role.viewer, Role.operator, Role.admin, Role.auditor}),
    Role.operator: frozenset({Role.operator, Role.admin}),
    Role.admin: frozenset({Role.admin}),
    Role.predict: frozenset({Role.predict}),
    # Reading traffic data is an auditor's job, not an operator's: running the platform does not need it.
    Role.auditor: frozenset({Role.auditor, Role.admin}),
}

# Known tokens in dev and test mode only, so the demo and the tests need no set-up; refused in prod.
DEV_TOKENS: dict[str, tuple[str, Role]] = {
    "dev-viewer": ("dev-viewer", Role.viewer),
    "dev-operator": ("dev-operator", Role.operator),
    "dev-admin": ("dev-admin", Role.admin),
    "dev-predict": ("dev-predict", Role.predict),
    "dev-auditor": ("dev-auditor", Role.auditor),
}

ACTOR_PREFIX = "user:"
"""A token holder's actor is this and the token's name."""
TOKEN_NAME_MAX_CHARS = MAX_ATTRIBUTE_CHARS - len(ACTOR_PREFIX)


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``models`` is the scope of a predict token limited to those models; None is every
    model (every other role's, and a predict token's without a scope)."""

    name: str
    role: Role
    models: frozenset[str] | None = None

    def grants(self, role: Role) -> bool:
        """Whether the caller's role may do what ``role`` may (:data:`GRANTS`)."""
        return self.role in GRANTS[role]

    @property
    def actor(self) -> str:
        """How the caller is named in the events the request causes."""
        return f"{ACTOR_PREFIX}{self.name}"

    def check_model(self, model: str, where: str = "", **extra: Any) -> None:
        """403 unless the token's scope holds ``model`` (any model when it has none); ``where`` starts the
        message (a feedback item's ``[i]: ``) and ``extra`` adds to the answer. Checked before whether the
        model exists, so a scoped client learns nothing of the models outside its scope."""
        if self.models is not None and model not in self.models:
            raise Forbidden(
                f"{where}model {shown(model, NAME_MAX_CHARS)} is outside the scope of the token "
                f"{self.name!r}, which may use only: {', '.join(sorted(self.models))}",
                **extra,
            )


def token_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a token's holder, or None. The name travels as the ``ce_actor`` attribute of
    every event its requests cause, so it must be text a consumer accepts there: not blank, no character a
    CloudEvents attribute may not hold (a control character such as NUL or a newline, a noncharacter, a lone
    surrogate), and short enough for the attribute's limit."""
    if not name.strip():
        return "is blank"
    if len(name) > TOKEN_NAME_MAX_CHARS:
        return (
            f"is {len(name)} characters; at most {TOKEN_NAME_MAX_CHARS} fit the events' actor attribute "
            f"({ACTOR_PREFIX!r} + name)"
        )
    return unstorable_text(name) or attribute_text_problem(name)


_MODEL_NAME = re.compile(NAME_PATTERN)


def token_models_problem(role: str, models: Any) -> str | None:
    """Why ``models`` cannot be the scope of a token of ``role``, or None: only a predict token has a scope,
    and it is a non-empty list of distinct model names (``contracts.common.NAME_PATTERN``). The message
    continues "the token's models ..." or "a token whose models ..."."""
    if role != Role.predict:
        return f"are given, but its role is {role}: only a predict token may be limited to models"
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        return "must be a non-empty list of model names"
    for model in models:
        if not _MODEL_NAME.fullmatch(model):
            return (
                f"name {shown(model, NAME_MAX_CHARS)}, which is no model name (1 to {NAME_MAX_CHARS} "
                "letters, digits, '.', '_' or '-', starting with a letter or digit)"
            )
    if len(set(models)) != len(models):
        twice = next(m for i, m in enumerate(models) if m in models[:i])
        return f"name {twice!r} twice"
    return None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Hashed tokens from a JSON file: ``{"tokens": [{"name", "role", "sha256", "models"?}]}``; a predict
    token's ``models`` limits it to those models, and is read once here, never per request."""

    def __init__(self, by_hash: dict[str, Principal]) -> None:
        self._by_hash = by_hash

    @classmethod
    def load(cls, path: Path, *, dev: bool) -> TokenStore:
        """The tokens of ``path`` (none when it does not exist), plus the dev tokens when ``dev``."""
        by_hash = {
            row["sha256"]: Principal(
                row["name"], Role(row["role"]), frozenset(row["models"]) if "models" in row else None
            )
            for row in read_token_file(path, named_by="DRIFTLOOP_AUTH_TOKENS_FILE")["tokens"]
        }
        if dev:
            for token, (name, role) in DEV_TOKENS.items():
                by_hash.setdefault(hash_token(token), Principal(name, role))
        return cls(by_hash)

    def authenticate(self, token: str) -> Principal | None:
        return self._by_hash.get(hash_token(token))


TOKEN_ROW_FORM = '{"name": ..., "role": ..., "sha256": ...}'
TOKEN_ROW_KEYS = frozenset({"name", "role", "sha256", "models"})
"""Every key a token file's row may have (``models`` only on a predict token's)."""
TOKEN_FILE_FORM = f'{{"tokens": [{TOKEN_ROW_FORM}]}}'


class TokenFileInvalid(ValueError):
    """The token file cannot be read or is not of TOKEN_FILE_FORM; the message names the file, the setting
    or option that named it, and what is wrong."""


class TokenFileNotSynced(Exception):
    """The token file was replaced, the new token in it, but its folder could not be synced: a crash may yet
    undo the rename. The message names the file, the setting or option that named it, and the error."""


def read_token_file(path: Path, *, named_by: str) -> dict[str, Any]:
    """The token file at ``path``, its rows checked (``{"tokens": []}`` when it does not exist);
    ``named_by`` is the setting or option the path came from, for the message of a TokenFileInvalid."""

    def invalid(why: str) -> TokenFileInvalid:
        return TokenFileInvalid(f"the token file {path} ({named_by}) {why}")

    try:
        text = path.read_text()
    except FileNotFoundError:
        return {"tokens": []}
    except OSError as exc:  # a directory, no permission
        raise invalid(f"cannot be read: {exc.strerror}") from exc
    try:
        content = json.loads(text)
    except ValueError as exc:
        raise invalid(f"is not JSON ({exc}); it must be {TOKEN_FILE_FORM}") from exc
    if not isinstance(content, dict) or not isinstance(content.get("tokens"), list):
        raise invalid(f'has no "tokens" list; it must be {TOKEN_FILE_FORM}')
    for i, row in enumerate(content["tokens"]):
        if not (
            isinstance(row, dict)
            and all(isinstance(row.get(key), str) for key in ("name", "role", "sha256"))
            and row["role"] in {r.value for r in Role}
        ):
            raise invalid(
                f"has a malformed token (number {i + 1}): each is {TOKEN_ROW_FORM}, the role one of "
                f"{', '.join(Role)}"
            )
        if unknown := sorted(set(row) - TOKEN_ROW_KEYS):
            # A key misspelt ("model" for "models") would be ignored, and the token it was meant to limit
            # would use every model.
            raise invalid(
                f"has a token (number {i + 1}) with {', '.join(map(repr, unknown))}, which a token does not "
                f"have: its keys are {', '.join(sorted(TOKEN_ROW_KEYS))}"
            )
        if why := token_name_problem(row["name"]):
            raise invalid(f"has a token (number {i + 1}) whose name {why}")
        if "models" in row and (why := token_models_problem(row["role"], row["models"])):
            raise invalid(f"has a token (number {i + 1}) whose models {why}")
    return content


def issue_token(
    path: Path,
    *,
    name: str,
    role: Role,
    models: list[str] | None = None,
    named_by: str = "DRIFTLOOP_AUTH_TOKENS_FILE",
    show: Callable[[str], None] | None = None,
    waiting: Callable[[str], None] | None = None,
) -> str:
    """Create a token, store its hash in ``path`` and return the token (shown once, never stored); a file
    that is not a token file is left as it was (TokenFileInvalid). ``models`` limits a predict token to
    those models (None: every model). A name that cannot name the holder (:func:`token_name_problem`) or
    models that cannot be its scope (:func:`token_models_problem`) are a ValueError, the file untouched.
    ``show`` gets the token once the file was read and before its hash is stored: whatever it raises (the
    token could not be shown) leaves the file as it was, so no token grants a role that nobody has. The
    file's lock (:func:`token_file_locked`) is held from the read to the rename, so issuers running at once
    each add their token to what the others stored; ``waiting`` gets one line saying so when another holds
    it."""
    if why := token_name_problem(name):
        raise ValueError(f"the token's name {why}")
    if models is not None and (why := token_models_problem(role, models)):
        raise ValueError(f"the token's models {why}")
    token = f"dl_{secrets.token_urlsafe(32)}"
    with token_file_locked(path, named_by=named_by, waiting=waiting):
        content = read_token_file(path, named_by=named_by)
        if show is not None:
            show(token)
        row: dict[str, Any] = {"name": name, "role": role.value, "sha256": hash_token(token)}
        if models is not None:
            row["models"] = list(models)
        content["tokens"].append(row)
        _replace_token_file(path, content, named_by=named_by)
    return token


@contextlib.contextmanager
def token_file_locked(
    path: Path, *, named_by: str, waiting: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the exclusive lock of the token file ``path`` (an flock on ``<path>.lock`` beside it, made 0600)
    for the block, waiting for another holder. Every read-modify-write of the file holds it: two that ran
    at once each read the same file and the second rename dropped the first's token, already shown to its
    operator. Readers need not take it, as the file is only ever replaced whole. A lock file that cannot be
    made or opened (its folder cannot be made, no permission) is a TokenFileInvalid naming it.

    When another holds the lock, ``waiting`` gets one line naming the lock file and why before the wait:
    the holder may be stuck printing its token to a pipe nobody reads, and a command blocked on it without
    a word looked hung."""
    lock = path.with_name(f"{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise TokenFileInvalid(
            f"the token file {path} ({named_by}) cannot be locked: {lock}: {exc.strerror}"
        ) from exc
    try:
        # Closing the descriptor releases the lock, and the kernel does so for a writer that dies holding it.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting(f"waiting for {lock}: another `token issue` is writing {path} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace_token_file(path: Path, content: dict[str, Any], *, named_by: str) -> None:
    """Write ``content`` to a temporary file of its own beside ``path`` (0600, as mkstemp makes it), synced,
    and rename it over ``path``, then sync the folder: a reader sees the old file or the new one, never a
    part, and a crash leaves no file shorter than what was written, nor undoes the rename (the new name is
    in the folder, which is synced apart from the file). The name is unique, so a temporary file that a
    killed writer left behind stops no later one; one that fails here is removed."""
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise TokenFileInvalid(f"the token file {path} ({named_by}) cannot be written: {exc}") from exc
    try:
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(content, indent=2))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise TokenFileInvalid(f"the token file {path} ({named_by}) cannot be written: {exc}") from exc
    try:
        _sync_folder(path.parent)
    except OSError as exc:
        raise TokenFileNotSynced(
            f"the token file {path} ({named_by}) holds the new token, but its folder could not be synced "
            f"({exc.strerror}), so a crash may yet take the token out of it"
        ) from exc


def _sync_folder(folder: Path) -> None:
    """fsync ``folder``, making the renames in it durable. As PostgreSQL's fsync_fname, a folder this user
    may write but not read (EACCES) and a file system that cannot sync a folder (EINVAL, EBADF: some FUSE
    and network ones) are passed over: there is nothing more to do."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


_bearer = HTTPBearer(auto_error=False)

_REQUIRED: dict[Callable[..., Awaitable[Principal]], Role] = {}
"""The role each dependency made by :func:`require` asks for, for :func:`required_roles`."""


def _authorized(request: Request, credentials: HTTPAuthorizationCredentials | None, role: Role) -> Principal:
    if credentials is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    if (sent := len(request.headers.getlist("authorization"))) > 1:
        # The first was read and the others ignored: the caller (or a proxy that added one) would be
        # answered as whoever the first names, which need not be who they meant.
        raise Unauthorized(f"the request has {sent} Authorization headers: send one")
    store: TokenStore = request.app.state.tokens
    principal = store.authenticate(credentials.credentials)
    if principal is None:
        raise Unauthorized("unknown or revoked token")
    if not principal.grants(role):
        raise Forbidden(f"role {principal.role.value!r} may not do this; it needs {role.value!r}")
    return principal


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that returns the caller if their token grants ``role``; 401 or 403 otherwise."""

    async def check(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Principal:
        return _authorized(request, credentials, role)

    _REQUIRED[check] = role
    return check


def required_roles(calls: Iterable[Any]) -> list[Role]:
    """The roles that the dependencies among ``calls`` (a route's, as FastAPI calls them) made by
    :func:`require` ask for."""
    return [_REQUIRED[call] for call in calls if call in _REQUIRED]


async def authorize(request: Request, role: Role) -> Principal:
    """What the dependency ``require(role)`` does, called before FastAPI solves a route's dependencies."""
    return _authorized(request, await _bearer(request), role)


ViewerDep = Annotated[Principal, Depends(require(Role.viewer))]
OperatorDep = Annotated[Principal, Depends(require(Role.operator))]
AdminDep = Annotated[Principal, Depends(require(Role.admin))]
AuditorDep = Annotated[Principal, Depends(require(Role.auditor))]
PredictDep = Annotated[Principal, Depends(require(Role.predict))]
