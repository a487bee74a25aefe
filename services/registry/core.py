"""The registry's use cases, shared by the event handlers and the HTTP API (one core, thin transports).

Each function runs inside one transaction: the ports it gets are bound to it, and ``publish`` writes to
the outbox, so a state change and the events announcing it commit together or not at all.
"""

from __future__ import annotations

import hashlib
from typing import Any

from contracts.commands import (
    ArchiveRequested,
    PromoteRequested,
    RetrainRequested,
    RollbackRequested,
    within_reason,
)
from contracts.common import ArtifactFormat, ArtifactRef, EventRef, Stage
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.models import ModelStageChanged, ModelVersionRegistered, ModelVersionTagged
from contracts.training import TrainingCompleted
from libs.artifacts import ArtifactCorrupted, ArtifactNotFound, UntrustedArtifact
from libs.bus import PermanentError, bytes_over_limit
from libs.errors import Conflict, InvalidInput, NotFound
from libs.logging import get_logger
from services.registry.dataset_files import CanonicalDataset
from services.registry.domain import (
    CHALLENGER,
    Command,
    alias_effect,
    check_command,
    check_dataset_models,
    check_transition,
    check_upload_name,
    dataset_problems,
    failed_checks_phrase,
    may_be_challenger,
    rejected_by_failed_validation,
    too_wide_to_announce,
    verdict_overtaken,
)
from services.registry.ports import Artifacts, Cause, Datasets, Publish, Versions
from services.registry.schemas import DatasetPublic

log = get_logger(__name__)


async def register_version(
    event: CloudEvent[TrainingCompleted],
    *,
    versions: Versions,
    artifacts: Artifacts,
    publish: Publish,
    source: str,
) -> int:
    """A training run becomes the model's next version at stage candidate, exactly once per run id."""
    done = event.data
    existing = await versions.find_run(done.model, done.run_id)
    if existing is not None:
        if (existing.artifact_key, existing.profile_key) != (done.artifact.key, done.profile.key):
            raise PermanentError(
                f"run {done.run_id} of {done.model} is already version {existing.version} with artifact "
                f"{existing.artifact_key}; this TrainingCompleted names artifact {done.artifact.key}"
            )
        log.info("run already registered", model=done.model, run_id=done.run_id, version=existing.version)
        return existing.version
    # The store must hold exactly what training announced, and the model must be loadable safely,
    # before any service is told the version exists.
    try:
        model_bytes = await artifacts.check_model(done.artifact.key)
        profile_bytes = await artifacts.verify(done.profile.key)
    except (ArtifactCorrupted, UntrustedArtifact) as exc:
        raise PermanentError(f"{done.model} run {done.run_id} is not registered: {exc}") from exc
    # A download is refused when the stored file's length is not the recorded one (api._stream, from a stat):
    # a record that misstates it would have the registry refuse a sound file.
    checked = (("model", done.artifact, model_bytes), ("profile", done.profile, profile_bytes))
    for kind, ref, stored in checked:
        if stored != ref.size_bytes:
            raise PermanentError(
                f"{done.model} run {done.run_id} is not registered: its {kind} {ref.key} is "
                f"{stored:,} bytes in the store, not the {ref.size_bytes:,} the event says"
            )
    number = await versions.register(done, Cause.of(event))
    await publish(
        new_event(
            ModelVersionRegistered(
                model=done.model,
                model_version=number,
                stage=Stage.CANDIDATE,
                run_id=done.run_id,
                job_id=done.job_id,
                artifact=done.artifact,
                profile=done.profile,
                signature=done.signature,
                metrics=done.metrics,
                lineage=done.lineage,
            ),
            source=source,
            cause=event,
        )
    )
    log.info("version registered", model=done.model, version=number, run_id=done.run_id)
    return number


async def change_stage(
    model: str,
    version: int,
    to_stage: Stage,
    *,
    reason: str,
    event: CloudEvent[Any],
    versions: Versions,
    publish: Publish,
    source: str,
    over_verdict: bool = False,
) -> bool:
    """Move a version to ``to_stage`` (aliases follow), record it and announce it; False when it already
    was there. An illegal move raises :class:`PermanentError` (the event is dead-lettered with the reason);
    ``over_verdict`` allows rejected -> production for a version :func:`overtaken_by_verdict` says so of."""
    current = await versions.stage_for_update(model, version)
    if current is None:
        raise PermanentError(f"{event.type} names {model} version {version}, which the registry lacks")
    if current is to_stage:
        return False
    if not (over_verdict and current is Stage.REJECTED and to_stage is Stage.PRODUCTION):
        try:
            check_transition(model, version, current, to_stage)
        except Conflict as exc:
            raise PermanentError(f"{event.type} {event.id}: {exc.message}") from exc
    cause = Cause.of(event)
    # A reason wraps another event's or a command's text, itself up to the cap: cut here, so the history
    # shows what the event says (the event's contract would cut it alone).
    reason = within_reason(reason)
    sequence = await versions.move(model, version, current, to_stage, reason, cause)
    effect = alias_effect(to_stage)
    await versions.drop_aliases(model, version, effect.drop)
    for alias in effect.take:
        await versions.take_alias(model, alias, version, cause)
    await publish(
        new_event(
            ModelStageChanged(
                model=model,
                model_version=version,
                from_stage=current,
                to_stage=to_stage,
                reason=reason,
                caused_by=EventRef(id=event.id, type=event.type),
                aliases=await versions.aliases_of(model, version),
                sequence=sequence,
            ),
            source=source,
            cause=event,
        )
    )
    log.info("stage changed", model=model, version=version, from_stage=current, to_stage=to_stage)
    return True


async def promote(
    model: str,
    version: int,
    *,
    reason: str,
    event: CloudEvent[Any],
    versions: Versions,
    publish: Publish,
    source: str,
) -> None:
    """The version is production now; whatever was production before is archived. A version a failed
    validation rejected before it served goes to production too: serving put it there on a command accepted
    before the verdict (:func:`overtaken_by_verdict`)."""
    current = await versions.stage_for_update(model, version)
    # Another promotion of the model under way (a second consumer, a rollback restoring its stable version)
    # has not committed the version it puts in production: read unlocked, production would miss it, and
    # both versions would end up there. The model's lock (after the version's, the order move() takes them
    # in) makes this one wait for it, then archive it.
    await versions.lock_stages(model)
    over_verdict = await overtaken_by_verdict(versions, model, version, current)
    if over_verdict:
        reason += (
            "; a failed validation had rejected it here first, but serving had already put it on traffic "
            "on a command accepted while it was a candidate, so the registry follows serving"
        )
        log.warning(
            "a version rejected by its validation serves; production follows serving",
            model=model,
            version=version,
            event_type=event.type,
            event_id=event.id,
        )
    for previous in await versions.versions_in(model, Stage.PRODUCTION):
        if previous != version:
            await change_stage(
                model,
                previous,
                Stage.ARCHIVED,
                reason=f"replaced in production by version {version}",
                event=event,
                versions=versions,
                publish=publish,
                source=source,
            )
    await change_stage(
        model,
        version,
        Stage.PRODUCTION,
        reason=reason,
        event=event,
        versions=versions,
        publish=publish,
        source=source,
        over_verdict=over_verdict,
    )


async def overtaken_by_verdict(versions: Versions, model: str, version: int, current: Stage | None) -> bool:
    """Whether the version, in stage ``current`` (as the caller read it under the row's lock, which this
    transaction holds), is rejected by a failed validation read before it ever served
    (:func:`services.registry.domain.verdict_overtaken`)."""
    if current is not Stage.REJECTED:
        return False
    last = await versions.last_move(model, version)
    return last is not None and verdict_overtaken(current, last.from_stage, last.event_type)


async def refuse_out_of_date(
    event: CloudEvent[Any], model: str, version: int, stable: int | None, *, versions: Versions
) -> None:
    """Raise :class:`PermanentError` when a rollout event would bring ``version`` back to traffic over a
    production version other than the one it names as replaced (``stable``): the event is older than the
    registry's stages (a rollout's event re-sent under a new id after production moved on). Applied, it
    would archive the version that serves and call production one that does not."""
    if await versions.stage_for_update(model, version) is not Stage.ARCHIVED:
        return
    production = [v for v in await versions.versions_in(model, Stage.PRODUCTION) if v != version]
    if production and stable not in production:
        rollout_id = getattr(event.data, "rollout_id", "?")
        raise PermanentError(
            f"{event.type} {event.id} (rollout {rollout_id}) would put {model} version {version} on traffic "
            f"in place of version {stable if stable is not None else '(none)'}, but production is version "
            f"{', '.join(map(str, production))}: the event is older than the registry's stages (re-sent "
            "under a new id?); nothing was changed"
        )


async def record_validation(
    event: CloudEvent[Any], *, versions: Versions, publish: Publish, source: str
) -> None:
    """Keep the report; a pass makes the version the challenger, a failure rejects a candidate."""
    report = event.data
    stage = await versions.stage_for_update(report.model, report.model_version)
    if stage is None:
        raise PermanentError(
            f"{event.type} names {report.model} version {report.model_version}, which the registry lacks"
        )
    verdict = "passed" if not report.failed_checks else "failed"
    held = await versions.report_verdict(report.model, report.model_version, report.report_id)
    if held is not None:
        # The report re-sent under a new event id (a replay, a producer's retry). Applied again, it would
        # list the report twice and take the challenger alias back from a later version.
        if held != verdict:
            raise PermanentError(
                f"{report.model} version {report.model_version} already holds validation report "
                f"{report.report_id}, which {held}; this {event.type} {event.id} says it {verdict}: "
                "a report has one outcome"
            )
        log.info(
            "validation report received again; already recorded, nothing changes",
            model=report.model,
            version=report.model_version,
            report_id=report.report_id,
            event_id=event.id,
        )
        return
    await versions.record_validation(report, Cause.of(event))
    if report.failed_checks:
        if not rejected_by_failed_validation(stage):
            # The report is on the version page and the card; the stage stays what serving does with it.
            log.warning(
                "validation failed for a version that is no longer a candidate; report kept, stage left",
                model=report.model,
                version=report.model_version,
                stage=stage,
                report_id=report.report_id,
                failed_checks=failed_checks_phrase(report.failed_checks, report.failed_checks_total),
            )
            return
        await change_stage(
            report.model,
            report.model_version,
            Stage.REJECTED,
            reason=f"validation {report.report_id} failed: "
            f"{failed_checks_phrase(report.failed_checks, report.failed_checks_total)}",
            event=event,
            versions=versions,
            publish=publish,
            source=source,
        )
        return
    if may_be_challenger(stage):
        await versions.take_alias(report.model, CHALLENGER, report.model_version, Cause.of(event))
    else:
        log.info("validation passed for a version past the gate; report kept", stage=stage)


async def record_dataset(
    event: CloudEvent[DatasetRegistered], *, datasets: Datasets, artifacts: Artifacts, source: str
) -> bool:
    """Record a dataset version another service registered; False when it was already recorded. One under
    the registry's own source that it does not hold as that file was not published here, and is refused, and
    so is one whose file the store lacks or holds at another size (:func:`check_dataset_file`)."""
    ds = event.data
    if event.source == source:
        # The registry's own uploads were recorded in the transaction that published them, and are never
        # deleted: one it lacks was published elsewhere under its source (another deployment).
        held = await datasets.get(ds.name, ds.dataset_version)
        if held is None or held.sha256 != ds.sha256:
            holds = "does not hold it" if held is None else f"holds it as sha256 {held.sha256}"
            raise PermanentError(
                f"{event.type} {event.id} for dataset {ds.name} version {ds.dataset_version} (sha256 "
                f"{ds.sha256}) came under this registry's source {source}, but the registry {holds}: it "
                "was not published here (another deployment under the same source?); nothing was recorded"
            )
        return False
    if ds.sha256 != ds.artifact.key:
        # The file is served by its sha256: recorded, the dataset would hand out whatever artifact that names.
        raise PermanentError(
            f"dataset {ds.name} version {ds.dataset_version} says sha256 {ds.sha256} but its artifact is "
            f"{ds.artifact.key}: they must be the same file"
        )
    # An upload of the same name waits for this transaction, then numbers after the version recorded here.
    await datasets.lock_name(ds.name)
    existing = await datasets.get(ds.name, ds.dataset_version)
    if existing is not None:
        if existing.sha256 != ds.sha256:
            raise PermanentError(
                f"dataset {ds.name} version {ds.dataset_version} is already registered with sha256 "
                f"{existing.sha256} (source {existing.source}); this event says {ds.sha256}"
            )
        return False
    # Looked at only for a dataset new here: one recorded already is answered from its row, whatever the
    # store holds now (its downloads say what became of the file).
    await check_dataset_file(ds, artifacts)
    await datasets.add(ds, event_id=event.id, actor=event.actor)
    return True


async def check_dataset_file(ds: DatasetRegistered, artifacts: Artifacts) -> None:
    """Refuse (PermanentError) a dataset whose file the store lacks, or holds at another size than announced.

    Its downloads would fail for ever on a fault of this event: they stat the file first and refuse one
    missing (404) or of another length than recorded (500, api._stream). A stat is enough here: hashing the
    file (a dataset may be gigabytes) would hold the poll's transaction and the name's lock for as long as
    it reads, and every download hashes the file before its first byte anyway, so bytes altered at their
    length are refused there, as store damage. A store that keeps no sizes (``size`` None) leaves only the
    read: the file is hashed then, which gives its length and its integrity at once.
    """
    key, announced = ds.artifact.key, ds.artifact.size_bytes
    refused = f"dataset {ds.name} version {ds.dataset_version} is not recorded"
    try:
        stored = await artifacts.size(key)
        if stored is None:
            stored = await artifacts.verify(key)
    except ArtifactNotFound as exc:
        raise PermanentError(
            f"{refused}: the store holds no file {key}, where the event says {announced:,} bytes; send the "
            "event again once the store holds its file"
        ) from exc
    except ArtifactCorrupted as exc:
        raise PermanentError(f"{refused}: {exc}") from exc
    if stored != announced:
        raise PermanentError(
            f"{refused}: its file {key} is {stored:,} bytes in the store, not the {announced:,} the event "
            "says (its downloads would be refused)"
        )


# --- manual commands ------------------------------------------------------------------------------------


async def require_stage(versions: Versions, model: str, version: int) -> Stage:
    """The version's stage, or 404 naming what is unknown."""
    stage = await versions.stage_for_update(model, version)
    if stage is None:
        if not await versions.model_exists(model):
            raise NotFound(f"model {model!r} is not registered")
        raise NotFound(f"model {model!r} has no version {version}")
    return stage


async def tag(
    model: str,
    version: int,
    key: str,
    value: str | None,
    *,
    actor: str,
    versions: Versions,
    publish: Publish,
    source: str,
) -> bool:
    """Set a version's tag (``value``) or remove it (None), and publish ModelVersionTagged with who did it,
    in the caller's transaction. False (and nothing published) when there was nothing to remove."""
    await require_stage(versions, model, version)
    if value is None:
        previous = await versions.delete_tag(model, version, key)
        if previous is None:
            return False
    else:
        previous = await versions.set_tag(model, version, key, value, actor)
    changed = ModelVersionTagged(model=model, model_version=version, key=key, value=value, previous=previous)
    await publish(new_event(changed, source=source, actor=actor))
    return True


def command_event(payload: EventPayload, *, source: str, actor: str) -> CloudEvent[Any]:
    """A manual command as an event that carries who asked."""
    return new_event(payload, source=source, actor=actor)


async def request_command(
    command: Command,
    model: str,
    version: int,
    *,
    reason: str,
    actor: str,
    to_version: int | None = None,
    versions: Versions,
    publish: Publish,
    source: str,
) -> CloudEvent[Any]:
    """Check that the command can apply now (404, 409 listing the allowed moves), then publish it."""
    stage = await require_stage(versions, model, version)
    check_command(command, model, version, stage)
    payload: EventPayload
    if command is Command.PROMOTE:
        payload = PromoteRequested(model=model, model_version=version, reason=reason)
    elif command is Command.ARCHIVE:
        payload = ArchiveRequested(model=model, model_version=version, reason=reason)
    else:
        if to_version is not None:
            if stage is Stage.CANARY:
                # Serving gives a rolled-back canary's traffic to the stable version, and dead-letters a
                # to_version naming another.
                raise Conflict(
                    f"to_version is for a production rollback: {model} version {version} is canary, and "
                    "rolling it back gives its traffic back to the stable version; leave to_version out",
                    field="to_version",
                )
            if to_version == version:
                raise Conflict("to_version must differ from the version rolled back", field="to_version")
            target = await require_stage(versions, model, to_version)
            if target is not Stage.PRODUCTION:
                check_transition(model, to_version, target, Stage.PRODUCTION)
        payload = RollbackRequested(model=model, model_version=version, to_version=to_version, reason=reason)
    event = command_event(payload, source=source, actor=actor)
    await publish(event)
    return event


async def request_retrain(
    model: str,
    *,
    reason: str,
    ignore_cooldown: bool,
    actor: str,
    versions: Versions,
    datasets: Datasets,
    publish: Publish,
    source: str,
) -> CloudEvent[Any]:
    """Ask training for a run; the model must be known here (a version, or a dataset meant for it)."""
    if not (await versions.model_exists(model) or await datasets.named_for(model)):
        raise NotFound(
            f"model {model!r} is unknown to the registry: it has no version and no dataset names it "
            "(upload one with models=<name>)"
        )
    event = command_event(
        RetrainRequested(model=model, reason=reason, ignore_cooldown=ignore_cooldown),
        source=source,
        actor=actor,
    )
    await publish(event)
    return event


async def archive(
    event: CloudEvent[ArchiveRequested], *, versions: Versions, publish: Publish, source: str
) -> None:
    """Carry out an ArchiveRequested: the registry owns that stage."""
    req = event.data
    stage = await versions.stage_for_update(req.model, req.model_version)
    if stage is None:
        raise PermanentError(
            f"ArchiveRequested names {req.model} version {req.model_version}, which does not exist"
        )
    if stage is Stage.ARCHIVED:
        return
    try:
        check_command(Command.ARCHIVE, req.model, req.model_version, stage)
    except Conflict as exc:
        raise PermanentError(f"ArchiveRequested {event.id}: {exc.message}") from exc
    await change_stage(
        req.model,
        req.model_version,
        Stage.ARCHIVED,
        reason=f"archived on request: {req.reason}",
        event=event,
        versions=versions,
        publish=publish,
        source=source,
    )


# --- datasets ---------------------------------------------------------------------------------------------


async def upload_dataset(
    name: str,
    dataset: CanonicalDataset,
    *,
    models: list[str],
    description: str | None,
    actor: str,
    versions: Versions,
    datasets: Datasets,
    artifacts: Artifacts,
    publish: Publish,
    source: str,
    max_event_bytes: int,
) -> tuple[DatasetPublic, bool]:
    """Store a validated upload as the name's next version and announce it; the same content as an
    existing version of the name gives that version back (False: nothing new). ``max_event_bytes``: what
    consumers accept; an upload whose DatasetRegistered would be larger is refused (422)."""
    # Everything the event and the row are made of is checked before the file is stored.
    check_upload_name(name)
    check_dataset_models(models)
    if description is not None and "\x00" in description:
        raise InvalidInput("description holds a NUL character", field="description")
    for model in models:
        latest = await versions.latest_signature(model)
        if latest is None:
            continue
        problems = dataset_problems(dataset.columns, model, latest[0], latest[1])
        if problems:
            column, message = problems[0]
            raise InvalidInput(message, field="file", column=column, problems=[m for _, m in problems])
    sha256 = hashlib.sha256(dataset.parquet).hexdigest()
    # Content and number are read under the name's lock: the same file uploaded twice at once gives one
    # version (the second finds the first's), and an upload never takes a number another writer is adding.
    await datasets.lock_name(name)
    existing = await datasets.with_content(name, sha256)
    if existing is not None:
        return existing, False
    version = await datasets.next_version(name)

    def announcement(ref: ArtifactRef) -> CloudEvent[DatasetRegistered]:
        registered = DatasetRegistered(
            name=name,
            dataset_version=version,
            sha256=ref.key,
            artifact=ref,
            row_count=dataset.row_count,
            columns=dataset.columns,
            source="upload",
            models=models,
            description=description,
        )
        return new_event(registered, source=source, actor=actor)

    # The event lists every column: measured before the file is stored, with the URI the store will give it
    # (measured without, an event within the URI's length of the limit passed, and was refused once stored).
    unstored = ArtifactRef(
        key=sha256, uri=artifacts.uri(sha256), format=ArtifactFormat.PARQUET, size_bytes=len(dataset.parquet)
    )
    if excess := bytes_over_limit(announcement(unstored), max_bytes=max_event_bytes):
        raise InvalidInput(
            too_wide_to_announce(dataset.columns, description, excess, max_event_bytes), field="file"
        )
    ref = await artifacts.put(dataset.parquet)
    event = announcement(ref)
    registered = event.data
    await datasets.add(registered, event_id=event.id, actor=actor)
    await publish(event)
    stored = await datasets.get(name, version)
    assert stored is not None
    log.info("dataset uploaded", dataset=name, version=version, rows=dataset.row_count, sha256=ref.key)
    return stored, True
