"""What `driftloop infra status` reports about one component."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ComponentStatus:
    """One row of the status table: is it running, is it answering, where."""

    name: str
    state: str
    ready: bool
    address: str
    pid: int | None = None
    detail: str = ""
