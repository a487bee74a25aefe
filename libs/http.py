"""The one HTTP app factory: every service's API has the same health, metrics, limits and error shape."""

from __future__ import annotations

import codecs
import email.message
import inspect
import ipaddress
import json
import re
import types
import typing
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import aclosing
from http import HTTPStatus
from importlib import metadata
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, quote, unquote_to_bytes

import asyncpg
from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import make_asgi_app
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from python_multipart.multipart import parse_options_header
from starlette.convertors import FloatConvertor, IntegerConvertor, UUIDConvertor
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route, Router, get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.commands import REASON_MAX_CHARS, says_something
from contracts.common import VERSION_TEXT, parse_version
from libs.auth import TokenStore, authorize, required_roles
from libs.bus.core import is_transient
from libs.errors import (
    Conflict,
    DomainError,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RepeatedKey,
    TooManyRequests,
    Unauthorized,
    json_text,
    keys_once,
    shown,
)
from libs.logging import get_logger
from libs.settings import ServiceSettings, allowed_network


def _package_version() -> str:
    try:
        return metadata.version("driftloop")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


PLATFORM_VERSION = _package_version()
"""driftloop's version (the installed package's), as every service's OpenAPI document and serving's Open
Inference Protocol server metadata give it."""

log = get_logger(__name__)

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]

Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
"""Free text in a request body. PostgreSQL's text and jsonb refuse the NUL character, so it is refused at
the door (422) rather than where a row is written."""

Reason = Annotated[
    Text, StringConstraints(min_length=1, max_length=REASON_MAX_CHARS), AfterValidator(says_something)
]
"""Why a command was given, for the audit trail: the commands' rule (contracts.commands.Reason), and no NUL
character; 422 naming the field."""


NUMBER_TEXT = (
    "write a whole number in decimal digits, with no sign, no leading zero, no space, no '_' and no fraction"
)
_NUMBER = re.compile(r"0|[1-9][0-9]*")


def _in_digits(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.fullmatch(value) is None:
        raise ValueError(NUMBER_TEXT)
    return value


InDigits = BeforeValidator(_in_digits)
"""Metadata for an ``int`` query or path parameter (``Annotated[int, InDigits, Query(...)]``): the number is
written one way only. Pydantic's int reads ``010``, ``+10``, `` 10``, ``10.0`` and ``1_0`` too, the last as
10, so ``/v1/events/1_0`` was the trail's row 10."""

Cursor = Annotated[str | None, Query(description="`next_cursor` of the previous page.")]
"""The ``cursor`` query parameter of a paged list (``libs.cursors``): absent for the first page."""


def json_body(kind: Any, description: str) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself: the body's schema, from a pydantic type,
    with its ``$defs`` written in place (a route's extra has no place in the document's components)."""
    schema = TypeAdapter(kind).json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            rest = {k: inline(v) for k, v in node.items() if k != "$ref"}
            return {**inline(defs[ref.removeprefix("#/$defs/")]), **rest} if isinstance(ref, str) else rest
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "description": description, "content": content}}


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body sent with ``content_type`` as JSON (it reads it as bytes otherwise)."""
    if not content_type:
        return False
    if content_type == "application/json":
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def not_json_message(sent: str | None) -> str:
    """What a JSON route answers to a body sent with the Content-Type ``sent`` (None: without one)."""
    return (
        "the request body was not read as JSON: send it with Content-Type: application/json (it came "
        f"{f'as {shown(sent)}' if sent is not None else 'without a Content-Type'})"
    )


def check_json_content_type(request: Request, **extra: Any) -> None:
    """422 for a body whose Content-Type is given and is not JSON (``text/plain``, a form's, an empty
    header), for a route that reads its JSON body itself; ``extra`` adds to the answer. A request without a
    Content-Type is read as JSON: Open Inference Protocol clients (tritonclient's) send none."""
    sent = request.headers.get("content-type")
    if sent is not None and not _is_json(sent):
        raise InvalidInput(not_json_message(sent), field="content-type", **extra)


async def json_keys_once(request: Request) -> None:
    """A router dependency: 422 for a JSON body in which an object names a key twice. FastAPI's reader keeps
    the last (``{"to_version": 3, "to_version": 5}`` was 5), where another reader on the way (a proxy, an
    audit log, the client's own check) may have read the first. Only a body FastAPI read as JSON is looked
    at (already read and cached: a form is never read here), so it costs a second parse of small bodies.

    A route that takes no body (a GET, a DELETE) has its body left unread: as a dependency of a whole router
    this runs before the route's token check, so reading it there let a client without a token have the
    registry parse 64 MiB of JSON (10 s of its event loop, 1.6 GB) for the 401."""
    if getattr(request.scope.get("route"), "body_field", None) is None:
        return
    if not _is_json(request.headers.get("content-type")):
        return
    body = await request.body()
    try:
        json.loads(body, object_pairs_hook=keys_once)
    except RepeatedKey as exc:
        raise InvalidInput(
            f"the JSON body names the key {shown(exc.key)} more than once in one object; give each key once"
        ) from exc
    except (ValueError, RecursionError):
        return  # not JSON: FastAPI's reader has said so already


class _StrictMultiPart(MultiPartParser):
    """Starlette's multipart reader, refusing text it cannot decode in the body's charset (UTF-8 unless the
    Content-Type names another): a text field, a part's name or a file name. Starlette decodes such bytes
    as Latin-1 instead, so a description sent in Windows-1252 was stored as other characters than the
    client's, and no one was told."""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._current_part.content_disposition)
        for option, what in ((b"name", "a part's name"), (b"filename", "a file name")):
            if option in options:
                _decoded(options[option], self._charset, what, "name" if option == b"name" else "filename")
        super().on_headers_finished()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > self.max_part_size:
            # Starlette's "Part exceeded maximum size of 1024KB." named neither the part nor a size in bytes.
            raise PayloadTooLarge(
                f"the form field {shown(part.field_name)} is larger than the {self.max_part_size:,} bytes a "
                "text field may have",
                field=part.field_name,
            )
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        if self._current_part.file is None:
            name = self._current_part.field_name
            _decoded(self._current_part.data, self._charset, f"the form field {shown(name)}", name)
        super().on_part_end()


def _decoded(raw: bytes | bytearray, charset: str, what: str, field: str) -> None:
    try:
        raw.decode(charset)
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise InvalidInput(
            f"{what} is not {charset.upper()} text (byte 0x{byte:02x} at {exc.start} cannot be decoded): "
            "send the form's text as UTF-8, or name its charset in the Content-Type",
            field=field,
        ) from None


class _StrictBodyRequest(Request):
    """A request whose JSON body is UTF-8 without a byte order mark (:func:`libs.errors.json_text`), and
    whose multipart form is read by :class:`_StrictMultiPart`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(json_text(await self.body()))
        return self._json

    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        media, params = parse_options_header(self.headers.get("content-type"))
        if self._form is not None or media != b"multipart/form-data":
            return await super()._get_form(
                max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
            )
        charset = params.get(b"charset", b"utf-8")
        charset_name = charset.decode("latin-1") if isinstance(charset, bytes) else charset
        try:
            # A codec of bytes to bytes or of text to text (hex, base64, zlib, rot13) is found too, but
            # decodes no text: bytes.decode raises LookupError for it, which the form's reader did not
            # expect, and FastAPI answered 400 "There was an error parsing the body".
            known = codecs.lookup(charset_name)._is_text_encoding
        except LookupError:
            known = False
        if not known:
            # Starlette read the form as Latin-1 then.
            raise InvalidInput(
                f"the Content-Type names the charset {shown(charset_name)}, which this server does not know: "
                "send the form as UTF-8",
                field="content-type",
            )
        try:
            async with aclosing(self.stream()) as stream:
                parser = _StrictMultiPart(
                    self.headers,
                    stream,
                    max_files=max_files,
                    max_fields=max_fields,
                    max_part_size=max_part_size,
                )
                self._form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(status_code=400, detail=exc.message)  # noqa: B904 (the handler reads __context__)
        return self._form


class BodyRoute(APIRoute):
    """The route class of every router :func:`create_app` takes (it refuses a route of another class).

    A query parameter the route does not declare (its own, its dependencies' and theirs) is refused with 422
    naming it and the ones the route takes: FastAPI ignores it, so ``GET /v1/models?stag=production``, a
    typo of ``stage``, listed every model, answering another question than the one asked. A request without
    a query costs nothing more.

    For a route whose body FastAPI reads (a pydantic model, ``File``, ``Form``): a JSON body is UTF-8
    without a byte order mark, or 422 saying what it is instead; a form's text is UTF-8 or in the charset
    the Content-Type names, or 422 naming the field (:class:`_StrictBodyRequest`).

    The caller's token is checked (libs.auth, 401 or 403) before a byte of the body is read: FastAPI reads
    and parses the body before it solves the dependencies, so a request without a token had the service
    parse up to ``max_request_bytes`` of JSON on its event loop (or spool a form to disk), and was told
    what was wrong with the body rather than that it may not ask.

    A GET route answers HEAD too (RFC 9110, 9.1: a general-purpose server supports both; load balancers,
    uptime checkers and ``curl -I`` send it), where FastAPI's routes answered 405: the same checks (token,
    query, limits), status and headers as its GET, without the body. The server leaves the body out
    (uvicorn does, as RFC 9110, 9.3.2 says); a :class:`StreamingResponse`'s stream is never read
    (:func:`_head_answer`), so a HEAD costs what the endpoint does before it returns. An endpoint that takes
    a slot, a connection or a snapshot before it returns its stream answers HEAD from the request alone
    instead (it reads ``request.method``; audit's export and verify). The OpenAPI document lists GET only,
    as FastAPI's own."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.PARTIAL and scope["method"] == "HEAD" and "GET" in (self.methods or ()):
            return Match.FULL, child
        return match, child

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "HEAD" or "GET" not in (self.methods or ()):
            await super().handle(scope, receive, send)
            return
        # FastAPI checks the method against the route's own before it calls the handler: GET, as HEAD is not
        # among them (the OpenAPI document would list every operation twice). The handler puts HEAD back
        # first thing (get_route_handler), before the endpoint reads it or an answer is sent.
        scope["method"] = "GET"
        scope[_HEAD] = True
        try:
            await super().handle(scope, receive, send)
        finally:
            scope["method"] = "HEAD"
            scope.pop(_HEAD, None)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = self._checked_handler()
        if "GET" not in (self.methods or ()):
            return handler

        async def answered(request: Request) -> Response:
            if request.scope.pop(_HEAD, False):
                request.scope["method"] = "HEAD"
                return await _head_answer(await handler(request))
            return await handler(request)

        return answered

    def _checked_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        # The router's own dependencies are in the route's dependant; create_app includes routers without
        # adding any.
        takes = query_names(self.dependant)
        path = self.path
        if self.body_field is None:

            async def declared(request: Request) -> Response:
                query = request.scope["query_string"]
                if query and (refusal := undeclared_query(query, takes, path)) is not None:
                    raise refusal
                response = await handler(request)
                request.scope[_ANSWERED] = True
                return response

            return declared
        roles = required_roles(_calls(self.dependant))

        async def strict(request: Request) -> Response:
            query = request.scope["query_string"]
            if query and (refusal := undeclared_query(query, takes, path)) is not None:
                raise refusal
            checked = _StrictBodyRequest(request.scope, request.receive)
            for role in roles:
                await authorize(checked, role)
            response = await handler(checked)
            request.scope[_ANSWERED] = True
            return response

        return strict


_HEAD = "driftloop.head"
"""The scope's mark of a HEAD request that :meth:`BodyRoute.handle` passes to FastAPI as a GET."""

_ANSWERED = "driftloop.answered"
"""The scope's mark of a request whose route (or hot route) has returned its answer: it has read all of the
body it reads (no route here reads its body from the stream it answers with), and :class:`RequestLimits`
no longer counts what is read after it."""


async def _head_answer(response: Response) -> Response:
    """The answer to a HEAD request, from its GET route's ``response``: that one (the server leaves its body
    out), but a stream is closed unread and answered with its status and headers alone (a Content-Length
    only if the route set one, as for its GET)."""
    if not isinstance(response, StreamingResponse):
        return response
    close = getattr(response.body_iterator, "aclose", None)
    if close is not None:
        await close()
    answer = Response(status_code=response.status_code, background=response.background)
    answer.raw_headers = response.raw_headers
    return answer


def query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameters a route takes: its own and its dependencies', by the name a client sends (the
    alias); a pydantic model read from the query gives its fields'."""
    names = set()
    for param in dependant.query_params:
        model = param.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names |= {f.alias or name for name, f in model.model_fields.items()}
        else:
            names.add(param.alias)
    for sub in dependant.dependencies:
        names |= query_names(sub)
    return frozenset(names)


def undeclared_query(query_string: bytes, takes: frozenset[str], path: str) -> InvalidInput | None:
    """422 naming the first parameter of ``query_string`` that the route at ``path`` does not take (names
    read as Starlette reads them), listing those it takes; None when it takes them all."""
    for name, _ in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name not in takes:
            listed = f"it takes {', '.join(sorted(takes))}" if takes else "it takes none"
            return InvalidInput(
                f"{path} takes no query parameter {shown(name)}; {listed}",
                field=name,
                allowed=sorted(takes),
            )
    return None


def _calls(dependant: Dependant) -> list[Any]:
    """What a route's dependencies call, sub-dependencies included."""
    return [c for d in dependant.dependencies for c in (d.call, *_calls(d))]


class RequestLimits:
    """Refuses request bodies over ``max_bytes`` with 413, whether or not Content-Length is sent; a NUL
    character in the path or the query with 422 (no name, key or filter can hold one); a path or a query
    whose %-escapes are not UTF-8 with 422 (the server and Starlette decode them with replacement
    characters, so ``?model=%ff`` was a search for U+FFFD and a lone surrogate, ``%ED%A0%80``, another); and
    a query parameter given twice with 422: every parameter of these APIs takes one value, and answering
    with one of two filters (FastAPI takes the last) would answer another question than the one asked; and
    a body with a Content-Encoding other than identity with 415 (RFC 9110, 15.5.16): nothing here decodes
    one, so a gzip body was read as its compressed bytes ("not UTF-8 (byte 0x8b ...)", or taken as they were
    by a route reading bytes).

    A body is limited as its route reads it, which is before the route returns its answer: a route that
    reads none (a GET, audit's export) answers whole whatever body was sent, except one whose Content-Length
    says it is over the limit, a 413 before any route runs."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            await _refuse(send, 422, "invalid-input", "the path or the query holds a NUL character (%00)")
            return
        if (not_utf8 := _not_utf8(scope)) is not None:
            await _refuse(send, 422, "invalid-input", not_utf8)
            return
        if scope["query_string"] and (repeated := _repeated_parameter(scope["query_string"])) is not None:
            detail = f"the query gives {shown(repeated)} more than once; give each parameter once"
            await _refuse(send, 422, "invalid-input", detail)
            return
        headers = scope.get("headers") or []
        named = dict(headers)
        declared = named.get(b"content-length")
        # A header describing a body that is not there (a GET's) is let be.
        sends_body = declared not in (None, b"0") or b"transfer-encoding" in named
        if b"content-encoding" in named and sends_body and (coding := _content_coding(headers)) is not None:
            detail = (
                f"the request body came with Content-Encoding: {shown(coding)}, which this server does not "
                "decode: send it uncompressed, without a Content-Encoding (or with identity)"
            )
            await _refuse(send, 415, "unsupported-media-type", detail, {"Accept-Encoding": "identity"})
            return
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                # Once the route has its answer, only that answer reads on: Starlette's StreamingResponse, to
                # notice a client gone, dropping what it reads. A 413 raised there cut the stream short (or
                # raced its 200), and uvicorn logged an error for the answer sent after the first.
                if seen > self.max_bytes and _ANSWERED not in scope:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        detail = f"request body is larger than the limit of {self.max_bytes} bytes"
        await _refuse(send, 413, "payload-too-large", detail)


class TrustedHosts:
    """Answers only requests whose Host header names one of ``allowed`` (any port; ``*.example.com`` any name
    under example.com): another name gets 421 Misdirected Request (RFC 9110, 15.5.20: the request went to a
    server that does not answer for that name), a request with no Host or with two gets 400 (RFC 9112, 3.2).

    The dev-* tokens work outside prod, where the services listen on 127.0.0.1, and 127.0.0.1 is not only
    reached by the developer's own clients: a web page whose own name (evil.example) is made to resolve to
    127.0.0.1 once it is loaded (DNS rebinding) has the browser send it requests to evil.example:8101 as
    same-origin ones, no CORS preflight, ``Authorization: Bearer dev-admin`` included, and read the answers.
    The browser names evil.example in their Host header, so a service that answers only for its own names
    answers none of them. 421 rather than 400: the request is well formed, only not for this server.

    An entry may be an IP network (``10.0.0.0/8``, ``[fd00::/8]``): a platform's probes and scrapers call a
    pod by its address (a Kubernetes probe, Prometheus), which is not known in advance. It answers a Host
    that is an address of its own version inside it; ``[::ffff:10.1.2.3]`` is an IPv6 address, answered by
    an IPv6 network (``[::ffff:10.0.0.0/104]``) and not by ``10.0.0.0/8``, as the entry ``10.1.2.3`` does
    not answer it either. An address entry (``127.0.0.1``, ``[::1]``) is also the network of that one address,
    so a Host that writes it another way (``[0:0::1]``, ``[::0001]``) is answered too. The networks are parsed
    here, once, and looked at last: a name answered by a name costs a set lookup, and one that is no address
    literal never reaches them.

    Starlette's TrustedHostMiddleware does the same, but answers in plain text ("Invalid host header"), not
    in :func:`error_body`, and reads ``[::1]:8101`` as the host ``[``."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        networks = [network for host in allowed if (network := _network_of(host)) is not None]
        self.names = frozenset(host for host in allowed if not host.startswith("*.") and "/" not in host)
        self.suffixes = tuple(host[1:] for host in allowed if host.startswith("*."))
        self.v4_networks = tuple(n for n in networks if isinstance(n, ipaddress.IPv4Network))
        self.v6_networks = tuple(n for n in networks if isinstance(n, ipaddress.IPv6Network))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        hosts = [value for key, value in scope["headers"] if key == b"host"]
        if len(hosts) == 1:
            name = _host_name(hosts[0])
            if name in self.names or (
                name is not None and (name.endswith(self.suffixes) or self._in_networks(name))
            ):
                await self.app(scope, receive, send)
                return
        if scope["type"] == "websocket":  # refused before it is accepted: the server answers 403
            await send({"type": "websocket.close", "code": 1008})
            return
        if len(hosts) != 1:
            detail = (
                "the request has no Host header: name the service's host in one"
                if not hosts
                else "the request has more than one Host header: send one"
            )
            await _refuse(send, 400, "bad-request", detail)
            return
        detail = (
            f"this service does not answer for the host {shown(hosts[0].decode('latin-1'))} (the request's "
            "Host header): call it by a name it answers for (outside prod, unless set otherwise: localhost, "
            "127.0.0.1 or [::1]), or add this one to DRIFTLOOP_ALLOWED_HOSTS"
        )
        await _refuse(send, 421, "misdirected-request", detail)

    def _in_networks(self, name: str) -> bool:
        """Whether ``name`` (as :func:`_host_name` gives it, answered by no name) is an IP address inside one
        of the networks. Only a name in brackets or ending in a digit is parsed: a full domain name never ends
        in one (a top-level domain has a letter, RFC 3696, 2), and a short one that does (``db-0``) costs a
        failed parse on its way to a 421."""
        if name.startswith("["):
            if not self.v6_networks:
                return False
            try:
                v6 = ipaddress.IPv6Address(name[1:-1])
            except ValueError:
                return False
            return any(v6 in network for network in self.v6_networks)
        if not self.v4_networks or not name[-1:].isdigit():
            return False
        try:
            v4 = ipaddress.IPv4Address(name)
        except ValueError:
            return False
        return any(v4 in network for network in self.v4_networks)


_HOST = re.compile(rb"(\[[0-9a-fA-F:.]+\]|[^\[\]:]*)(?::[0-9]*)?")


def _network_of(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network an ``allowed_hosts`` entry answers by address: its own network, the one address of an
    address entry, or None for a name."""
    if (network := allowed_network(entry)) is not None:
        return network
    try:
        if entry.startswith("[") and entry.endswith("]"):
            return ipaddress.IPv6Network(entry[1:-1])
        return ipaddress.IPv4Network(entry) if entry[-1:].isdigit() else None
    except ValueError:  # a name such as db-0
        return None


def _host_name(header: bytes) -> str | None:
    """The host a Host header names, in lower case and without its port (``[::1]:8101`` is ``[::1]``), or
    None when it is not of the form host[:port]."""
    match = _HOST.fullmatch(header)
    return match.group(1).decode("latin-1").lower() if match else None


def _not_utf8(scope: Scope) -> str | None:
    """Why the request's path or query is not text, or None: its bytes, once their %-escapes are decoded,
    are not UTF-8 (a byte of Latin-1, an encoded lone surrogate). Without a %-escape or a byte above 127
    there is nothing to decode: the common request costs two scans."""
    for where, raw in (("path", scope.get("raw_path") or b""), ("query", scope["query_string"])):
        if b"%" not in raw and raw.isascii():
            continue
        try:
            unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError as exc:
            byte = exc.object[exc.start]
            return (
                f"the {where} is not UTF-8 once its %-escapes are decoded (byte 0x{byte:02x} is not valid "
                "UTF-8 there): write each character as the %-escapes of its UTF-8 bytes"
            )
    return None


def _repeated_parameter(query_string: bytes) -> str | None:
    """The first query parameter named twice, the names read as Starlette reads them, or None."""
    seen: set[str] = set()
    for name, _ in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            return name
        seen.add(name)
    return None


def _content_coding(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The Content-Encoding headers' value when one names a coding other than identity, else None; every such
    header is looked at, as a reader on the way may go by any of them."""
    for key, value in headers:
        if key == b"content-encoding":
            text = value.decode("latin-1")
            if any(c.strip().lower() not in ("", "identity") for c in text.split(",")):
                return text
    return None


async def _refuse(
    send: Send, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    response = JSONResponse(error_body(detail, code), status_code=status, headers=headers)
    await response({"type": "http"}, _empty_receive, send)


class ErrorBody(BaseModel):
    """The body of every error answer (:func:`error_body`), as the OpenAPI documents show it."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(
        description="What was wrong, and what to do (Open Inference Protocol clients read it)."
    )
    detail: str = Field(description="The same message (FastAPI clients read it).")
    code: str = Field(
        description="The kind: invalid-input, unauthorized, forbidden, not-found, conflict, "
        "payload-too-large, ..."
    )
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Invalid input: each problem found (at most 20), where and why."
    )


UNAVAILABLE_RETRY_AFTER_S = 5
"""The Retry-After of a 503 answered while Postgres or the artifact store is unavailable."""


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "The request is not valid; the message says what and where."},
    "4XX": {
        "model": ErrorBody,
        "description": "Refused: 401 without a valid token, 403 for a role that may not, 404 for what does "
        "not exist, 405 for another method, 409 for a conflict with the current state, 413 for a body over "
        "the limit, 415 for a compressed body (a Content-Encoding other than identity), 400 for a body the "
        "client stopped sending, 421 for a Host header naming a host the service does not answer for "
        "(`allowed_hosts`).",
    },
    503: {
        "model": ErrorBody,
        "description": "Postgres or the artifact store is unavailable for the moment (restarting, failing "
        "over): nothing was done, and the same request may be sent again (`code`: unavailable).",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before sending the request again.",
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    },
}
"""The error answers of every route, documented once for all (a route adds its own where it says more)."""

FILE_SCHEMA: dict[str, Any] = {"type": "string", "format": "binary"}
"""The OpenAPI schema of an answer that is a file (a download, the audit trail's export), in whatever media
type it is sent: bytes a generated client hands over as they come, where an empty schema left it ``Any``."""


class Liveness(BaseModel):
    """The answer of ``/health/live``."""

    status: Literal["live"]


class Readiness(BaseModel):
    """The answer of ``/health/ready``, 200 or 503."""

    status: Literal["ready", "not-ready"]
    checks: dict[str, bool] = Field(description="Each dependency checked, and whether it answered.")


def errors_in_json(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (an OpenAPI document, changed in place) with every 4xx and 503 answer documented as
    what it is: :class:`ErrorBody` in JSON. FastAPI documents a route's answers in the route's own media
    type, so the refusals of a route that answers Markdown or HTML were documented as ``text/plain`` or
    ``text/html``; and a status a route describes in words only (the registry's 404 of a command, an
    upload's 422) had no body, which clients read for that status in place of the ``4XX`` range. A route
    that documents a JSON body for one of them keeps it."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if status.startswith("4") or status == "503":
                    given = response.get("content", {}).get("application/json", {})
                    if "schema" not in given:
                        given = {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                    response["content"] = {"application/json": given}
    return document


class ServiceApp(FastAPI):
    """The app :func:`create_app` builds: FastAPI, with its OpenAPI document saying how errors are sent
    (:func:`errors_in_json`)."""

    def openapi(self) -> dict[str, Any]:
        return errors_in_json(super().openapi())


def path_version(text: str, owner: str) -> int:
    """The version a URL path segment names, or 404 naming ``owner`` ("model 'churn'") and saying how a
    version is written: a path that writes no version names nothing, as a version that does not exist."""
    version = parse_version(text)
    if version is None:
        raise NotFound(f"{owner} has no version {shown(text)}: {VERSION_TEXT}")
    return version


VersionPath = Annotated[str, Path(description=f"The version number ({VERSION_TEXT}).")]
"""A version path parameter, read by :func:`path_version` (FastAPI's int would take '01' or '1.0')."""


def error_body(message: str, code: str, **extra: Any) -> dict[str, Any]:
    """Every error answer's body: ``error`` (what Open Inference Protocol clients read) and ``detail`` (what
    FastAPI's clients read) both hold the message, ``code`` names the kind, ``extra`` adds details."""
    body = {"error": message, "detail": message, "code": code, **extra}
    return {k: _sendable(v) if isinstance(v, str) else v for k, v in body.items()}


def _allowed_methods(routes: Sequence[Any], scope: Scope) -> set[str]:
    """The methods of every route whose path matches, looking into included routers; HEAD wherever GET is
    (BodyRoute answers it)."""
    allowed: set[str] = set()
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        allowed |= set(getattr(route, "methods", None) or ())
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner:
            allowed |= _allowed_methods(inner, scope)
    if "GET" in allowed:
        allowed.add("HEAD")
    return allowed


class _PrometheusApp:
    """prometheus_client's exposition app (text or OpenMetrics as the scraper asks, gzip, ``name[]``
    filters) as the endpoint of a route of its own. Mounted, it answered every method, and ``/metrics``
    itself with a redirect to ``/metrics/`` that a client which does not follow redirects (httpx's default)
    read as an empty page. Starlette takes an endpoint that is not a function for an ASGI app, and the route
    answers GET and HEAD, every other method 405 with ``Allow``."""

    def __init__(self) -> None:
        self.app = make_asgi_app()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _sendable(text: str) -> str:
    """``text``, with any lone surrogate written out as its escape, six characters. Python's json reader lets
    one into a request (``"\\ud800"``), and so into a message naming what was wrong; UTF-8 has no form for it,
    and the answer could not be sent."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


_CODES = {
    e.status: e.code for e in (NotFound, Conflict, InvalidInput, PayloadTooLarge, Unauthorized, Forbidden)
}


def _http_code(status: int) -> str:
    """The ``code`` of an HTTP error that FastAPI or Starlette raise themselves (404 for an unknown path)."""
    try:
        return _CODES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "-")
    except ValueError:
        return "error"


class _TooLarge(BaseException):
    """Raised inside the app's receive; a BaseException so that no body parser turns it into a 400."""


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


class HotRoutes:
    """Serves a few routes straight from ASGI, ahead of FastAPI's router, for the requests that dominate a
    service's load (serving's predict and infer).

    Between uvicorn and an endpoint FastAPI and Starlette spent 120-160 µs of CPU per request on a 2-core
    test host (every route tried in turn, the request-response wrapper, the endpoint's parameters solved;
    docs/benchmarks.md, Serving): more than the predict route's own work for one row, and a quarter of the
    registry's CPU for one version page. A hot route's endpoint reads nothing but its path parameters, the
    ``Request`` (it reads its own body) and the callers that ``libs.auth.require`` checks (``ViewerDep``
    and its kind), and returns a ``Response``, so none of that is needed. This middleware matches the path,
    validates the path parameters against the endpoint's own annotations, checks the caller's token for
    each role the route requires (:func:`libs.auth.authorize`, the check ``require`` makes), calls the
    endpoint, and answers an exception with the app's handler for it (an exception without one goes on to
    Starlette's 500, as before).

    Whatever it does not match in full (another path or method, a path parameter that does not validate)
    goes on to FastAPI untouched, so every answer and error is the one FastAPI would give. The routes stay
    in FastAPI's router too, for the OpenAPI document.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[APIRoute]) -> None:
        self.app = app
        self.routes = [_HotRoute(route) for route in routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for hot in self.routes:
                match, child = hot.matches(scope)
                if match is Match.FULL and (params := hot.params(child["path_params"])) is not None:
                    scope.update(child)
                    await hot.serve(scope, receive, send, params)
                    return
        await self.app(scope, receive, send)


class _HotRoute:
    def __init__(self, route: APIRoute) -> None:
        d = route.dependant
        # The role checks, in FastAPI's order (the router's, then the endpoint's): (parameter name, role).
        self.checks = [(sub.name, role) for sub in d.dependencies for role in required_roles([sub.call])]
        if (
            d.query_params
            or d.header_params
            or d.cookie_params
            or d.body_params
            or len(self.checks) != len(d.dependencies)
            or d.request_param_name is None
            or not inspect.iscoroutinefunction(route.endpoint)
        ):
            raise ValueError(
                f"{route.path}: a hot route's endpoint is a coroutine that takes only path parameters, the "
                "Request and role checks (no query, header, cookie or body parameters, no other dependencies)"
            )
        hints = typing.get_type_hints(route.endpoint, include_extras=True)
        self.route = route
        # APIRoute's matching, without BodyRoute's HEAD check: the lane serves a route's own methods only (a
        # HEAD goes on to FastAPI), and pays nothing for it on every request.
        self.matches = types.MethodType(APIRoute.matches, route)
        self.request_name = d.request_param_name
        self.adapters = {p.name: TypeAdapter(hints.get(p.name, str)) for p in d.path_params}

    def params(self, raw: dict[str, str]) -> dict[str, Any] | None:
        """The path parameters as the endpoint's types, or None when one does not validate (FastAPI answers
        that request, with its 422)."""
        try:
            return {name: adapter.validate_python(raw[name]) for name, adapter in self.adapters.items()}
        except ValidationError:
            return None

    async def serve(self, scope: Scope, receive: Receive, send: Send, params: dict[str, Any]) -> None:
        request = Request(scope, receive)
        try:
            # A hot route takes no query parameter (checked above): any query is refused, as BodyRoute does.
            query = scope["query_string"]
            if query and (refusal := undeclared_query(query, frozenset(), self.route.path)) is not None:
                raise refusal
            for name, role in self.checks:
                caller = await authorize(request, role)
                if name is not None:
                    params[name] = caller
            response = await self.route.endpoint(**params, **{self.request_name: request})
            scope[_ANSWERED] = True
        except Exception as exc:
            handler = _exception_handler(request.app, exc)
            if handler is None:
                raise
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
        assert isinstance(response, Response), f"{self.route.path} returned {type(response).__name__}"
        await response(scope, receive, send)


_SAMPLE_PARAMETERS = {IntegerConvertor: "1", FloatConvertor: "1.5", UUIDConvertor: str(uuid.UUID(int=0))}


def _sample_path(route: Route) -> str:
    """A path that ``route`` matches: each path parameter a value its convertor takes."""
    convertors = route.param_convertors.items()
    return route.path_format.format_map(
        {name: _SAMPLE_PARAMETERS.get(type(c), "x") for name, c in convertors}
    )


def _check_not_shadowed(earlier: Sequence[BaseRoute], hot: Sequence[APIRoute]) -> None:
    """Refuses a hot route that one of the ``earlier`` routes (those FastAPI tries before it) may answer
    instead: the lane, ahead of FastAPI's router, would serve a request that FastAPI gives to that route. The
    check tries a path of each route on the other (``/health/{x}`` beside ``/health/live``), which catches a
    literal path and a parameter's value alike. Hot routes among themselves keep their order, and the routes
    of the other routers come after them."""
    for route in hot:
        for other in earlier:
            if not isinstance(other, Route):
                continue
            if (other.methods is None or route.methods is None or route.methods & other.methods) and (
                route.path_regex.match(_sample_path(other)) or other.path_regex.match(_sample_path(route))
            ):
                raise ValueError(
                    f"the hot route {route.path} may answer requests for {other.path}, registered before "
                    "it: FastAPI would route them to that one, the hot lane to this one (give the hot "
                    "route a path of its own)"
                )


def _exception_handler(app: FastAPI, exc: Exception) -> Callable[..., Any] | None:
    """The handler Starlette's ExceptionMiddleware would call for ``exc``: by status code for an
    HTTPException, else by the nearest class (500 and ``Exception`` belong to ServerErrorMiddleware)."""
    handlers = app.exception_handlers
    if isinstance(exc, HTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None


BODY_CUT_SHORT = (
    "the connection closed before the whole request body arrived (fewer bytes than its Content-Length, or a "
    "chunked body without its end): send the body in full"
)
"""The answer to a request whose client stopped sending its body: it may never be read, but the log and the
access log say what happened rather than a 500 with a traceback."""


def _cut_short() -> JSONResponse:
    return JSONResponse(error_body(BODY_CUT_SHORT, "bad-request"), status_code=400)


def _domain_answer(exc: DomainError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if isinstance(exc, TooManyRequests):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse(
        error_body(exc.message, exc.code, **exc.extra), status_code=exc.status, headers=headers
    )


def _slash_redirect(router: Router) -> ASGIApp:
    """What ``router`` does with a request no route matches: a 307 to the path with a slash less (or more)
    when a route matches that, as Starlette's ``redirect_slashes`` did, else its 404. The Location names the
    path and query alone, so the client stays on the host and scheme it used: Starlette built an absolute URL
    from the request's Host header (any host a client chose came back) and its scheme as the server saw it
    (``http`` behind a proxy ending TLS)."""

    async def redirect_or_not_found(scope: Scope, receive: Receive, send: Send) -> None:
        path = get_route_path(scope)
        if scope["type"] == "http" and path != "/":
            full = scope["path"]
            other = {**scope, "path": full.rstrip("/") if path.endswith("/") else full + "/"}
            if any(route.matches(other)[0] is not Match.NONE for route in router.routes):
                location = quote(other["path"])  # escaped again: "?", "#", CR, LF, what is not ASCII
                if scope["query_string"]:
                    location += "?" + scope["query_string"].decode("latin-1")
                await RedirectResponse(location, status_code=307)(scope, receive, send)
                return
        await router.not_found(scope, receive, send)

    return redirect_or_not_found


def create_app(
    settings: ServiceSettings,
    *,
    title: str,
    description: str,
    routers: Sequence[APIRouter] = (),
    hot: Sequence[APIRouter] = (),
    ready: ReadyCheck | None = None,
    lifespan: Any = None,
) -> FastAPI:
    """A FastAPI app with /health/live, /health/ready, /metrics, typed-error mapping, a body limit and the
    settings' Host check (:class:`TrustedHosts`). The routes of ``hot`` are served ahead of FastAPI's router
    (:class:`HotRoutes`) and documented like the rest."""
    app = ServiceApp(
        title=title,
        description=description,
        version=PLATFORM_VERSION,
        lifespan=lifespan,
        redirect_slashes=False,  # _slash_redirect does it, without a host
    )
    app.router.default = _slash_redirect(app.router)
    app.router.route_class = BodyRoute  # the health routes below
    app.state.settings = settings
    app.state.tokens = TokenStore.load(settings.auth_tokens_file, dev=settings.env != "prod")

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return _domain_answer(exc)

    async def _infrastructure_down(_: Request, exc: Exception) -> JSONResponse:
        # Postgres or the artifact store unreachable, restarting or failing over: the request was fine and
        # may be sent again, so a 503 with Retry-After says so. Any other such error is a fault (a 500).
        if not is_transient(exc):
            raise exc
        log.warning("request failed: infrastructure unavailable", error=repr(exc))
        return JSONResponse(
            error_body(
                f"a service this one depends on is unavailable ({type(exc).__name__}); try again shortly",
                "unavailable",
            ),
            status_code=503,
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )

    for transient in (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        app.add_exception_handler(transient, _infrastructure_down)

    @app.exception_handler(ClientDisconnect)
    async def _body_cut_short(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # Raised by Request.body() in a route that reads its own body (serving's predict, training's spec).
        return _cut_short()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        where = ".".join(str(p) for p in first["loc"])
        if first["loc"][:1] == ("body",) and isinstance(exc.body, bytes):
            # FastAPI reads a body as JSON only under a JSON Content-Type, and otherwise validates its bytes:
            # "body: Input should be a valid dictionary" said nothing of the header that was wrong.
            message = not_json_message(request.headers.get("content-type"))
        elif first["type"] == "json_invalid":
            # FastAPI's own message is "JSON decode error" at "body.<offset>"; say what the reader said.
            ctx = first.get("ctx")
            why = ctx.get("error", "") if isinstance(ctx, dict) else ""
            message = f"the request body is not JSON: {why} (at character {where.removeprefix('body.')})"
        else:
            message = f"{where}: {first['msg']}" if where else str(first["msg"])
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors[:20]]
        return JSONResponse(error_body(message, "invalid-input", errors=details), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        if exc.status_code == 405:
            # Starlette names the methods of the first route whose path matched; a resource served by
            # several routes (GET and PUT of one path) allows them all.
            allowed = sorted(_allowed_methods(request.app.router.routes, request.scope))
            if allowed:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, ClientDisconnect):
            # FastAPI's "There was an error parsing the body" for a body its reader never got in full.
            return _cut_short()
        if exc.status_code == 400 and isinstance(cause, RecursionError | ValueError):
            # FastAPI's "There was an error parsing the body" for what its JSON reader raised besides a
            # syntax error: say which.
            message = (
                "the JSON body is nested too deeply"
                if isinstance(cause, RecursionError)
                else f"the request body is not JSON: {cause}"
            )
            return JSONResponse(error_body(message, "invalid-input"), status_code=422)
        if exc.status_code == 400 and isinstance(cause, DomainError):
            # What the body's reader refused itself (a form's text that is not in its charset): FastAPI
            # answers whatever its reader raises with 400 "There was an error parsing the body".
            return _domain_answer(cause)
        context = exc.__context__
        if exc.status_code == 400 and isinstance(context, MultiPartException):
            # Starlette's "Invalid multipart data." for whatever the multipart reader refused (a part's
            # header longer than it reads, such as a file name of 5,000 characters; more than 8 headers in a
            # part; a body that is not multipart): say what it said. Its own refusals (no boundary, a part
            # without a name, more than 1,000 fields or files) were a 400 where every other unreadable body
            # is a 422.
            message = f"the multipart body cannot be read: {context.__cause__ or context.message}"
            return JSONResponse(error_body(message, "invalid-input"), status_code=422)
        return JSONResponse(
            error_body(str(exc.detail), _http_code(exc.status_code)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.get("/health/live", tags=["health"], summary="The process is up.")
    async def live() -> Liveness:
        return Liveness(status="live")

    @app.get(
        "/health/ready",
        tags=["health"],
        summary="The service can do its work.",
        responses={
            200: {"model": Readiness},
            503: {"model": Readiness, "description": "Not ready: a dependency did not answer (`checks`)."},
        },
    )
    async def ready_check() -> JSONResponse:
        checks = await ready() if ready is not None else {}
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not-ready", "checks": checks}, status_code=200 if ok else 503
        )

    hot_routes = [route for router in hot for route in router.routes if isinstance(route, APIRoute)]
    _check_not_shadowed(app.router.routes, hot_routes)  # the hot routers are included first, below
    for router in (*hot, *routers):
        for route in router.routes:
            if isinstance(route, APIRoute) and not isinstance(route, BodyRoute):
                raise ValueError(
                    f"{route.path}: its router needs route_class=BodyRoute (libs.http), or a query parameter "
                    "it does not take is ignored, a JSON body in UTF-16 is read as well as one in UTF-8, and "
                    "a form's text that is not UTF-8 as Latin-1"
                )
        app.include_router(router, responses=ERROR_RESPONSES)
    app.router.routes.append(
        Route("/metrics", endpoint=_PrometheusApp(), methods=["GET"], include_in_schema=False)
    )
    if hot_routes:
        app.add_middleware(HotRoutes, routes=hot_routes)
    app.add_middleware(RequestLimits, max_bytes=settings.max_request_bytes)
    trusted = settings.trusted_hosts()
    if trusted is not None:  # outermost: a request for another host is answered nothing else
        app.add_middleware(TrustedHosts, allowed=trusted)
    return app
