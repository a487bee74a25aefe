"""Typed errors of the local infrastructure: each says what is wrong and what to do about it."""

from __future__ import annotations


class InfraError(Exception):
    """A problem the user can fix: ``str(err)`` says what is wrong, ``hint`` what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class JavaMissing(InfraError):
    """No usable Java runtime (absent, or older than Kafka needs)."""


class MavenMissing(InfraError):
    """Maven is needed to fetch the Kafka jars and is not installed."""


class JarsDownloadFailed(InfraError):
    """Maven could not fetch the Kafka jars from Maven Central."""


class PortTaken(InfraError):
    """A port the local infrastructure needs is held by a process that is not ours."""


class PermissionProblem(InfraError):
    """A file, folder or system step needs rights the current user does not have."""


class PostgresMissing(InfraError):
    """The PostgreSQL server binaries are not installed and could not be installed."""


class StateUnusable(InfraError):
    """The state folder (DRIFTLOOP_LOCAL_STATE_DIR, .driftloop/) cannot be made or written."""


class StartFailed(InfraError):
    """A component started but never became ready, or died on the way."""
