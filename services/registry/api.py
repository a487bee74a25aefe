"""The registry's HTTP API: models, versions, lineage, artifacts, datasets, manual commands, model cards.

Reads go straight to the read models (one query each); writes and commands run the same core functions
as the event handlers, in one transaction with the events they publish.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, cast

import asyncpg
from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from contracts.common import (
    VERSION_TEXT,
    ArtifactFormat,
    ArtifactRef,
    DatasetName,
    ModelName,
    Stage,
    parse_version,
)
from contracts.models import TagKey
from libs.artifacts import ArtifactCorrupted, ArtifactNotFound
from libs.auth import OperatorDep, ViewerDep
from libs.errors import Conflict, DomainError, InvalidInput, NotFound, PayloadTooLarge, shown
from libs.http import (
    FILE_SCHEMA,
    BodyRoute,
    Cursor,
    InDigits,
    Text,
    VersionPath,
    json_keys_once,
    path_version,
)
from libs.profiles import ReferenceProfile
from libs.service import Runtime
from services.registry import core
from services.registry.adapters.artifacts import StoreArtifacts
from services.registry.adapters.postgres import PgDatasets, PgQueries, PgVersions
from services.registry.dataset_files import TableLimits, canonicalise
from services.registry.domain import (
    ALIASES,
    Command,
    check_cursor_in_list,
    check_dataset_models,
    check_upload_name,
    decode_name_cursor,
    decode_version_cursor,
    encode_cursor,
    parse_tag_filter,
    render_html,
    render_markdown,
)
from services.registry.ports import Queries
from services.registry.schemas import (
    CommandAccepted,
    CommandCreate,
    DatasetPage,
    DatasetPublic,
    DatasetUploaded,
    ModelPage,
    ModelPublic,
    RetrainCreate,
    RollbackCreate,
    TagCreate,
    TagPublic,
    VersionPage,
    VersionPublic,
)
from services.registry.settings import RegistrySettings

PAGE_SIZE_MAX = 100

# Every JSON body of the registry is a command or a tag, each key of which says what to do.
router = APIRouter(prefix="/v1", dependencies=[Depends(json_keys_once)], route_class=BodyRoute)
hot_router = APIRouter(prefix="/v1", route_class=BodyRoute)
"""The hot route: one version's page, what deployment tools and the other services' people read most,
served ahead of FastAPI's router (``libs.http.HotRoutes``): a quarter of its CPU was FastAPI's routing and
dependency solving. It takes no body, so it needs no ``json_keys_once``."""


class ArtifactIntegrityError(DomainError):
    """A stored artifact no longer matches its hash: nothing is sent."""

    status = 500
    code = "artifact-corrupted"


# --- dependencies ---------------------------------------------------------------------------------------


def _runtime(request: Request) -> Runtime:
    return cast(Runtime, request.app.state.runtime)


NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: If-None-Match names the file's ETag (its SHA-256); no body."}
}

FILE_MEDIA_TYPES = {
    ArtifactFormat.SKOPS: "application/octet-stream",
    ArtifactFormat.PARQUET: "application/vnd.apache.parquet",
    ArtifactFormat.CSV: "text/csv",
    ArtifactFormat.JSON: "application/json",
}
"""The Content-Type a stored file is downloaded with, by its format."""


def _sent_as(
    *media_types: str, description: str, json: type[BaseModel] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a download: its 200 in each media type it may be sent in, as a file (a streamed
    answer's route has none of its own, and FastAPI documented its 200 with no body), and its 304. A JSON
    file whose structure is known (a reference profile) is documented as that model, so clients read it; one
    that is not (a dataset registered in JSON elsewhere) is a file like the others."""
    content = {t: {"schema": FILE_SCHEMA} for t in media_types if json is None or t != "application/json"}
    model = {} if json is None else {"model": json}
    return {200: {"description": description, "content": content, **model}, **NOT_MODIFIED}


class MarkdownResponse(PlainTextResponse):
    """A model card in Markdown (``text/markdown; charset=utf-8``)."""

    media_type = "text/markdown"


def _artifacts(request: Request) -> StoreArtifacts:
    return cast(StoreArtifacts, request.app.state.artifacts)


def _settings(request: Request) -> RegistrySettings:
    return cast(RegistrySettings, request.app.state.settings)


def _reads(request: Request) -> asyncpg.Pool:
    return cast(asyncpg.Pool, request.app.state.reads)


@asynccontextmanager
async def _queries(request: Request) -> AsyncIterator[PgQueries]:
    async with _reads(request).acquire() as conn:
        yield PgQueries(conn)


Limit = Annotated[
    int, InDigits, Query(ge=1, le=PAGE_SIZE_MAX, description=f"Page size, at most {PAGE_SIZE_MAX}.")
]
Prefix = Annotated[str | None, Query(description="Only names starting with this.")]
StageFilter = Annotated[Stage | None, Query(description="Only versions in this stage.")]
# The pattern documents what parse_tag_filter accepts (a key, not empty); its message stays the one refusing.
_TAG_FILTER_SCHEMA = {"pattern": "^[^=]"}
TagFilter = Annotated[
    str | None,
    Query(
        description="Only versions with this tag: `key` or `key=value`.", json_schema_extra=_TAG_FILTER_SCHEMA
    ),
]


def _version_ref(model: str, ref: str) -> int | str:
    """What a version path segment names, read before any look-up: a number written as
    :data:`VERSION_TEXT` says, or an alias (`champion`, `challenger`); anything else names no version (404).
    """
    if ref in ALIASES:
        return ref
    version = parse_version(ref)
    if version is None:
        raise NotFound(
            f"model {model!r} has no version {shown(ref)}: {VERSION_TEXT}, or an alias ({', '.join(ALIASES)})"
        )
    return version


async def _version(q: Queries, model: str, ref: int | str) -> VersionPublic:
    if isinstance(ref, int):
        number = ref
    else:
        alias = await q.version_by_alias(model, ref)
        if alias is None:
            if await q.model(model) is None:
                raise NotFound(f"model {model!r} is not registered")
            raise NotFound(f"model {model!r} has no {ref} now")
        number = alias
    found = await q.version(model, number)
    if found is None:
        if await q.model(model) is None:
            raise NotFound(f"model {model!r} is not registered")
        raise NotFound(f"model {model!r} has no version {number}")
    return found


# --- models and versions --------------------------------------------------------------------------------


@router.get("/models", tags=["models"], summary="List and search registered models.")
async def list_models(
    request: Request,
    _: ViewerDep,
    prefix: Prefix = None,
    stage: Annotated[Stage | None, Query(description="Only models with a version in this stage.")] = None,
    tag: Annotated[
        str | None,
        Query(
            description="Only models with a version tagged `key` or `key=value`.",
            json_schema_extra=_TAG_FILTER_SCHEMA,
        ),
    ] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> ModelPage:
    after = decode_name_cursor(cursor) if cursor is not None else None
    if after is not None:
        check_cursor_in_list(after, prefix=prefix)
    async with _queries(request) as q:
        items = await q.models(
            prefix=prefix, stage=stage, tag=parse_tag_filter(tag), after=after, limit=limit
        )
    next_cursor = encode_cursor("models", [items[-1].name]) if len(items) == limit else None
    return ModelPage(items=items, next_cursor=next_cursor)


@router.get("/models/{model}", tags=["models"], summary="One registered model.")
async def get_model(request: Request, _: ViewerDep, model: ModelName) -> ModelPublic:
    async with _queries(request) as q:
        found = await q.model(model)
    if found is None:
        raise NotFound(f"model {model!r} is not registered")
    return found


async def _version_page(
    request: Request,
    *,
    model: str | None,
    prefix: str | None,
    stage: Stage | None,
    tag: str | None,
    limit: int,
    cursor: str | None,
) -> VersionPage:
    after = decode_version_cursor(cursor, "versions") if cursor is not None else None
    if after is not None:
        check_cursor_in_list(after[0], model=model, prefix=prefix)
    async with _queries(request) as q:
        if model is not None and await q.model(model) is None:
            raise NotFound(f"model {model!r} is not registered")
        items = await q.versions(
            model=model, prefix=prefix, stage=stage, tag=parse_tag_filter(tag), after=after, limit=limit
        )
    next_cursor = (
        encode_cursor("versions", [items[-1].model, items[-1].version]) if len(items) == limit else None
    )
    return VersionPage(items=items, next_cursor=next_cursor)


@router.get("/models/{model}/versions", tags=["versions"], summary="A model's versions, newest first.")
async def list_model_versions(
    request: Request,
    _: ViewerDep,
    model: ModelName,
    stage: StageFilter = None,
    tag: TagFilter = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> VersionPage:
    return await _version_page(
        request, model=model, prefix=None, stage=stage, tag=tag, limit=limit, cursor=cursor
    )


@router.get("/versions", tags=["versions"], summary="Search versions of every model.")
async def search_versions(
    request: Request,
    _: ViewerDep,
    prefix: Annotated[str | None, Query(description="Only models whose name starts with this.")] = None,
    stage: StageFilter = None,
    tag: TagFilter = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> VersionPage:
    return await _version_page(
        request, model=None, prefix=prefix, stage=stage, tag=tag, limit=limit, cursor=cursor
    )


@hot_router.get(
    "/models/{model}/versions/{version}",
    tags=["versions"],
    summary="One version with lineage, stage history and validation reports.",
    description="`version` is a number or an alias (`champion`, `challenger`).",
    response_model=VersionPublic,
)
async def get_version(request: Request, _: ViewerDep, model: ModelName, version: str) -> Response:
    ref = _version_ref(model, version)
    async with _queries(request) as q:
        found = await _version(q, model, ref)
    # Built and validated from the database row already: serialise once, not validate again on the way out.
    return Response(found.model_dump_json(), media_type="application/json")


@router.get(
    "/models/{model}/versions/{version}/artifact",
    tags=["versions"],
    summary="Download the model (skops) or its reference profile (JSON), verified before the first byte.",
    response_class=StreamingResponse,
    responses=_sent_as(
        FILE_MEDIA_TYPES[ArtifactFormat.SKOPS],
        FILE_MEDIA_TYPES[ArtifactFormat.JSON],
        description="The file: the model as skops (application/octet-stream), the profile as JSON.",
        json=ReferenceProfile,
    ),
)
async def download_artifact(
    request: Request,
    _: ViewerDep,
    model: ModelName,
    version: str,
    kind: Annotated[Literal["model", "profile"], Query(description="Which artifact.")] = "model",
) -> Response:
    named = _version_ref(model, version)
    async with _queries(request) as q:
        v = await _version(q, model, named)
    ref = v.artifact if kind == "model" else v.profile
    suffix = ArtifactFormat.SKOPS if kind == "model" else ArtifactFormat.JSON
    return await _stream(
        request, ref, FILE_MEDIA_TYPES[suffix], f"{v.model}-v{v.version}-{kind}.{suffix.value}"
    )


async def _stream(request: Request, ref: ArtifactRef, media_type: str, filename: str) -> Response:
    """The stored file ``ref`` names, streamed once verified; for a HEAD, the same status and headers from
    the record and a stat of the file, its content neither read nor hashed."""
    key = ref.key
    etag = f'"{key}"'
    if _none_match(request.headers.get("if-none-match"), etag):
        # The file is named by its hash, so a client holding the tag holds these very bytes: 304, and nothing
        # read or hashed (RFC 9110, 13.1.2). A client that keeps what it downloaded asks again for nothing.
        return Response(status_code=304, headers={"ETag": etag})
    artifacts = _artifacts(request)
    try:
        stored = await artifacts.size(key)
        if stored is not None and stored != ref.size_bytes:
            # Bytes of another length cannot hash to the key: refused from a stat, before anything is read,
            # and a HEAD gives this answer as its GET does.
            raise _other_length(key, stored, ref.size_bytes)
        if request.method == "HEAD":
            # A HEAD sends no byte, so it has none to protect: hashing the whole file (seconds of disk and CPU
            # for hundreds of MB) would buy headers the record and the stat give. A file altered but of the
            # same length is found by the GET, which hashes it (docs/registry.md, Artifacts), and so is one of
            # another length in a store that keeps no sizes (stored None): the HEAD answers from the record.
            return StreamingResponse(iter(()), media_type=media_type, headers=_file_headers(ref, filename))
        # The whole file is hashed before the response starts, so a client never receives bytes that were
        # modified in the store; the stream checks the hash again at its end.
        verified = await artifacts.verify(key)
        if verified != ref.size_bytes:
            # Only where the store keeps no sizes: its Content-Length, the record's, would be false.
            raise _other_length(key, verified, ref.size_bytes)
    except ArtifactNotFound as exc:
        raise NotFound(f"artifact {key} is not in the store: {exc}") from exc
    except ArtifactCorrupted as exc:
        raise ArtifactIntegrityError(str(exc), key=key) from exc
    return StreamingResponse(
        artifacts.stream(key), media_type=media_type, headers=_file_headers(ref, filename)
    )


def _other_length(key: str, stored: int, registered: int) -> ArtifactIntegrityError:
    """The stored file is not the length its record says: no download of it can be right."""
    return ArtifactIntegrityError(
        f"artifact {key} is corrupted: the store holds {stored:,} bytes of it where "
        f"{registered:,} were registered; restore it from a backup or retrain",
        key=key,
    )


def _file_headers(ref: ArtifactRef, filename: str) -> dict[str, str]:
    """A download's headers, the same for its GET and its HEAD: its size as registered (the stored file's,
    checked), its name, and its key as ETag."""
    return {
        "Content-Length": str(ref.size_bytes),
        "Content-Disposition": f'attachment; filename="{filename}"',
        "ETag": f'"{ref.key}"',
        "X-Content-SHA256": ref.key,
    }


def _none_match(header: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (or is ``*``), compared weakly as RFC 9110 has it."""
    if header is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag in tags


@router.get(
    "/models/{model}/versions/{version}/card",
    tags=["versions"],
    summary="The model card, from lineage, validation reports and stage history.",
    response_class=MarkdownResponse,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}},
)
async def model_card(
    request: Request,
    _: ViewerDep,
    model: ModelName,
    version: str,
    format: Annotated[Literal["markdown", "html"], Query(description="Markdown or HTML.")] = "markdown",
) -> Response:
    ref = _version_ref(model, version)
    async with _queries(request) as q:
        v = await _version(q, model, ref)
    if format == "html":
        return HTMLResponse(render_html(v))
    return MarkdownResponse(render_markdown(v))


@router.put("/models/{model}/versions/{version}/tags/{key}", tags=["versions"], summary="Set a tag.")
async def set_tag(
    request: Request, who: OperatorDep, model: ModelName, version: VersionPath, key: TagKey, body: TagCreate
) -> TagPublic:
    number = path_version(version, f"model {model!r}")
    rt = _runtime(request)
    async with rt.begin() as tx:
        await core.tag(
            model,
            number,
            key,
            body.value,
            actor=who.actor,
            versions=PgVersions(tx.conn),
            publish=tx.publish,
            source=rt.source(),
        )
    return TagPublic(key=key, value=body.value)


@router.delete(
    "/models/{model}/versions/{version}/tags/{key}",
    tags=["versions"],
    summary="Remove a tag.",
    status_code=204,
)
async def delete_tag(
    request: Request, who: OperatorDep, model: ModelName, version: VersionPath, key: TagKey
) -> Response:
    number = path_version(version, f"model {model!r}")
    rt = _runtime(request)
    async with rt.begin() as tx:
        removed = await core.tag(
            model,
            number,
            key,
            None,
            actor=who.actor,
            versions=PgVersions(tx.conn),
            publish=tx.publish,
            source=rt.source(),
        )
    if not removed:
        raise NotFound(f"{model} version {number} has no tag {key!r}")
    return Response(status_code=204)


# --- manual commands ------------------------------------------------------------------------------------


async def _command(
    request: Request,
    command: Command,
    model: str,
    version: int,
    actor: str,
    reason: str,
    to_version: int | None = None,
) -> CommandAccepted:
    rt = _runtime(request)
    async with rt.begin() as tx:
        event = await core.request_command(
            command,
            model,
            version,
            reason=reason,
            actor=actor,
            to_version=to_version,
            versions=PgVersions(tx.conn),
            publish=tx.publish,
            source=rt.source(),
        )
    return CommandAccepted(event_id=event.id, event_type=event.type, topic=event.topic, actor=actor)


_COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown model or version."},
    409: {"description": "The version's stage does not allow it; the body lists the allowed moves."},
    403: {"description": "The token's role is not operator or admin."},
}


@router.post(
    "/models/{model}/versions/{version}/promote",
    tags=["commands"],
    status_code=202,
    responses=_COMMAND_RESPONSES,
    summary="Ask serving to put the version on all traffic now (PromoteRequested).",
)
async def promote(
    request: Request, who: OperatorDep, model: ModelName, version: VersionPath, body: CommandCreate
) -> CommandAccepted:
    number = path_version(version, f"model {model!r}")
    return await _command(request, Command.PROMOTE, model, number, who.actor, body.reason)


@router.post(
    "/models/{model}/versions/{version}/rollback",
    tags=["commands"],
    status_code=202,
    responses=_COMMAND_RESPONSES,
    summary="Ask serving to take the version off traffic at once (RollbackRequested).",
)
async def rollback(
    request: Request, who: OperatorDep, model: ModelName, version: VersionPath, body: RollbackCreate
) -> CommandAccepted:
    number = path_version(version, f"model {model!r}")
    return await _command(request, Command.ROLLBACK, model, number, who.actor, body.reason, body.to_version)


@router.post(
    "/models/{model}/versions/{version}/archive",
    tags=["commands"],
    status_code=202,
    responses=_COMMAND_RESPONSES,
    summary="Archive a version that does not serve (ArchiveRequested; the registry carries it out).",
)
async def archive(
    request: Request, who: OperatorDep, model: ModelName, version: VersionPath, body: CommandCreate
) -> CommandAccepted:
    number = path_version(version, f"model {model!r}")
    return await _command(request, Command.ARCHIVE, model, number, who.actor, body.reason)


@router.post(
    "/models/{model}/retrain",
    tags=["commands"],
    status_code=202,
    responses=_COMMAND_RESPONSES,
    summary="Ask training for a new run of the model (RetrainRequested; its retrain policy decides).",
)
async def retrain(
    request: Request, who: OperatorDep, model: ModelName, body: RetrainCreate
) -> CommandAccepted:
    rt = _runtime(request)
    async with rt.begin() as tx:
        event = await core.request_retrain(
            model,
            reason=body.reason,
            ignore_cooldown=body.ignore_cooldown,
            actor=who.actor,
            versions=PgVersions(tx.conn),
            datasets=PgDatasets(tx.conn),
            publish=tx.publish,
            source=rt.source(),
        )
    return CommandAccepted(event_id=event.id, event_type=event.type, topic=event.topic, actor=who.actor)


# --- datasets -------------------------------------------------------------------------------------------


def _split_models(values: list[str]) -> list[str]:
    """The models named (repeated, or comma-separated), each once in order of first mention; 422 for one that
    is no name, or for more than a dataset is meant for."""
    # A dict keeps the order and finds a repeat at once: a list was searched for each name.
    named = dict.fromkeys(m for value in values for m in (n.strip() for n in value.split(",")) if m)
    return check_dataset_models(list(named))


@router.post(
    "/datasets",
    tags=["datasets"],
    status_code=201,
    summary="Upload a dataset (CSV or Parquet) as the name's next version.",
    description="Stored as canonical Parquet under its sha256 and announced with DatasetRegistered. The same "
    "content as an existing version of the name answers 200 with that version.",
    responses={
        200: {"model": DatasetUploaded, "description": "The same content is already a version of this name."},
        409: {
            "description": "Another writer registered a version of this name while it was stored; upload "
            "again."
        },
        413: {
            "description": "The file is larger than the upload limit, or its table has more rows, values "
            "or text than the dataset limits."
        },
        422: {
            "description": "The multipart body or the file cannot be read, or the name, models or "
            "description are not valid, or "
            "the form gives the file, the name or the description more than once; the body names the column "
            "or the encoding problem. Also when the DatasetRegistered announcing it "
            "would be larger than consumers accept (max_event_bytes): it lists every column's name and type."
        },
    },
)
async def upload_dataset(
    request: Request,
    response: Response,
    who: OperatorDep,
    file: Annotated[UploadFile, File(description="CSV (UTF-8, header row) or Parquet.")],
    name: Annotated[str, Form(description="Dataset name.")],
    models: Annotated[
        list[str], Form(description="Models it is meant for (repeat, or comma-separate).")
    ] = [],  # noqa: B006
    description: Annotated[Text | None, Form(description="Free text.")] = None,
) -> DatasetUploaded:
    settings = _settings(request)
    # The form parser keeps the last of two parts of one name: of two files, one would be stored and the
    # other dropped without a word. (The parsed form is cached on the request: nothing is read again.)
    form = await request.form()
    for single in ("file", "name", "description"):
        if (given := len(form.getlist(single))) > 1:
            raise InvalidInput(
                f"the form gives {single!r} {given} times; an upload takes one (only models repeats): "
                "upload each file on its own",
                field=single,
            )
    check_upload_name(name)
    wanted = _split_models(models)
    limit = settings.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise PayloadTooLarge(f"{file.filename} is {file.size} bytes; the upload limit is {limit} bytes")
    # As much as the part holds (starlette counts it as it spools), not the limit: a part over 1 MiB is
    # spooled to disk, and a read of a file asks for all the memory it names at once, so a limit larger than
    # the machine's memory failed every such upload with MemoryError. One byte more shows a file over it.
    data = await file.read((limit if file.size is None else min(limit, file.size)) + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{file.filename} is larger than the upload limit of {limit} bytes")
    limits = TableLimits(
        columns=settings.max_dataset_columns,
        rows=settings.max_dataset_rows,
        cells=settings.max_dataset_cells,
        text_bytes=settings.max_dataset_text_bytes,
    )
    dataset = await asyncio.to_thread(canonicalise, data, filename=file.filename, limits=limits)
    rt = _runtime(request)
    try:
        async with rt.begin() as tx:
            stored, created = await core.upload_dataset(
                name,
                dataset,
                models=wanted,
                description=description,
                actor=who.actor,
                versions=PgVersions(tx.conn),
                datasets=PgDatasets(tx.conn),
                artifacts=_artifacts(request),
                publish=tx.publish,
                source=rt.source(),
                max_event_bytes=settings.kafka.max_event_bytes,
            )
    except asyncpg.UniqueViolationError as exc:
        # Every writer of the registry numbers under the name's lock; one that does not (a replica still on
        # code from before the lock) can still take the number between the count and the insert.
        if exc.constraint_name != "datasets_pkey":
            raise
        raise Conflict(
            f"another version of dataset {name!r} was registered while this one was stored; upload the "
            "file again (it gets the next version)",
            field="name",
        ) from exc
    response.status_code = 201 if created else 200
    return DatasetUploaded(created=created, dataset=stored)


@router.get("/datasets", tags=["datasets"], summary="List dataset versions, newest first per name.")
async def list_datasets(
    request: Request,
    _: ViewerDep,
    prefix: Prefix = None,
    model: Annotated[str | None, Query(description="Only datasets meant for this model.")] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> DatasetPage:
    after = decode_version_cursor(cursor, "datasets") if cursor is not None else None
    if after is not None:
        check_cursor_in_list(after[0], prefix=prefix)
    async with _reads(request).acquire() as conn:
        items = await PgQueries(conn).datasets(prefix=prefix, model=model, after=after, limit=limit)
    next_cursor = (
        encode_cursor("datasets", [items[-1].name, items[-1].version]) if len(items) == limit else None
    )
    return DatasetPage(items=items, next_cursor=next_cursor)


async def _dataset(request: Request, name: str, version: int) -> DatasetPublic:
    async with _reads(request).acquire() as conn:
        found = await PgDatasets(conn).get(name, version)
    if found is None:
        raise NotFound(f"dataset {name!r} has no version {version}")
    return found


@router.get("/datasets/{name}/versions/{version}", tags=["datasets"], summary="One dataset version.")
async def get_dataset(
    request: Request, _: ViewerDep, name: DatasetName, version: VersionPath
) -> DatasetPublic:
    return await _dataset(request, name, path_version(version, f"dataset {name!r}"))


@router.get(
    "/datasets/{name}/versions/{version}/file",
    tags=["datasets"],
    summary="Download the dataset file, verified before the first byte.",
    response_class=StreamingResponse,
    responses=_sent_as(*FILE_MEDIA_TYPES.values(), description="The file, in its format."),
)
async def download_dataset(
    request: Request, _: ViewerDep, name: DatasetName, version: VersionPath
) -> Response:
    ds = await _dataset(request, name, path_version(version, f"dataset {name!r}"))
    suffix = ds.artifact.format
    # ds.sha256 is ds.artifact.key (core.record_dataset refuses a dataset whose two differ).
    return await _stream(request, ds.artifact, FILE_MEDIA_TYPES[suffix], f"{name}-v{version}.{suffix.value}")
