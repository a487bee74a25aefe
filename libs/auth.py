"""Bearer tokens with roles. Tokens are stored only as sha256 hashes; one FastAPI dependency checks them.

Roles: ``viewer`` reads, ``operator`` also sends commands, ``admin`` may do everything but predict, and
``predict`` may only call prediction and feedback endpoints — so a leaked client token cannot move a
model, and an operator's token is never spread across client programs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from libs.errors import Forbidden, Unauthorized


class Role(StrEnum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"
    predict = "predict"


# Which roles satisfy a required role.
GRANTS: dict[Role, frozenset[Role]] = {
    Role.viewer: frozenset({Role.viewer, Role.operator, Role.admin}),
    Role.operator: frozenset({Role.operator, Role.admin}),
    Role.admin: frozenset({Role.admin}),
    Role.predict: frozenset({Role.predict}),
}

# Known tokens in dev and test mode only, so the demo and the tests need no set-up; refused in prod.
DEV_TOKENS: dict[str, tuple[str, Role]] = {
    "dev-viewer": ("dev-viewer", Role.viewer),
    "dev-operator": ("dev-operator", Role.operator),
    "dev-admin": ("dev-admin", Role.admin),
    "dev-predict": ("dev-predict", Role.predict),
}


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    name: str
    role: Role

    @property
    def actor(self) -> str:
        """How the caller is named in the events the request causes."""
        return f"user:{self.name}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Hashed tokens from a JSON file: ``{"tokens": [{"name", "role", "sha256"}]}``."""

    def __init__(self, by_hash: dict[str, Principal]) -> None:
        self._by_hash = by_hash

    @classmethod
    def load(cls, path: Path, *, dev: bool) -> TokenStore:
        by_hash: dict[str, Principal] = {}
        if path.exists():
            for row in json.loads(path.read_text()).get("tokens", []):
                by_hash[row["sha256"]] = Principal(row["name"], Role(row["role"]))
        if dev:
            for token, (name, role) in DEV_TOKENS.items():
                by_hash.setdefault(hash_token(token), Principal(name, role))
        return cls(by_hash)

    def authenticate(self, token: str) -> Principal | None:
        return self._by_hash.get(hash_token(token))


def issue_token(path: Path, *, name: str, role: Role) -> str:
    """Create a token, store its hash in ``path`` and return the token (shown once, never stored)."""
    token = f"dl_{secrets.token_urlsafe(32)}"
    data = json.loads(path.read_text()) if path.exists() else {"tokens": []}
    data["tokens"].append({"name": name, "role": role.value, "sha256": hash_token(token)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return token


_bearer = HTTPBearer(auto_error=False)


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that returns the caller if their token grants ``role``; 401 or 403 otherwise."""

    async def check(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Principal:
        if credentials is None:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        store: TokenStore = request.app.state.tokens
        principal = store.authenticate(credentials.credentials)
        if principal is None:
            raise Unauthorized("unknown or revoked token")
        if principal.role not in GRANTS[role]:
            raise Forbidden(f"role {principal.role.value!r} may not do this; it needs {role.value!r}")
        return principal

    return check


ViewerDep = Annotated[Principal, Depends(require(Role.viewer))]
OperatorDep = Annotated[Principal, Depends(require(Role.operator))]
AdminDep = Annotated[Principal, Depends(require(Role.admin))]
PredictDep = Annotated[Principal, Depends(require(Role.predict))]
