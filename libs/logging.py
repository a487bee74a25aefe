"""The one logger setup: structlog, JSON lines, with context (event id, correlation id) bound per event."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import structlog

_configured = False

# The event being handled, if any. One ContextVar set per event is all the consumer hot path pays; the
# processor below adds its ids to a log line only when a line is actually written.
_current_event: ContextVar[tuple[str, str, str] | None] = ContextVar("driftloop_event", default=None)


def _add_event(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    current = _current_event.get()
    if current is not None:
        event_dict.setdefault("event_id", current[0])
        event_dict.setdefault("correlation_id", current[1])
        event_dict.setdefault("event_type", current[2])
    return event_dict


def configure_logging(service: str, *, level: str = "INFO", json: bool = True) -> None:
    """Route stdlib and structlog output through one JSON (or console) renderer, tagged with the service."""
    global _configured
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_event,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every reconnect at WARNING/ERROR with tracebacks; keep them but not their INFO chatter.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; context bound with :func:`bound` is added to every line."""
    return structlog.get_logger(name)


@contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Bind values (event_id, correlation_id, ...) to every log line inside the block."""
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


@contextmanager
def handling(event_id: str, correlation_id: str, event_type: str) -> Iterator[None]:
    """Every log line inside the block names the event being handled and its cascade."""
    token = _current_event.set((event_id, correlation_id, event_type))
    try:
        yield
    finally:
        _current_event.reset(token)
