"""Issuing tokens at once: each `token issue` is a read-modify-write of one file, and none may lose another's
token, which its operator has already been shown; one that waits for another says so; and the file, once
replaced, stays replaced through a crash."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from deploy import cli
from deploy.cli import main
from libs.auth import Principal, Role, TokenStore, hash_token, issue_token

Issued = list[tuple[str, str]] | str
"""What an issuing process reports: the names and tokens it issued, or how it failed."""

ISSUERS = 8
TOKENS_EACH = 5

# A safety net against a hang, not a measure: every wait below is released by the other side's event.
STUCK_S = 60.0


def issue_several(path: Path, issuer: int, start: Barrier, issued: Queue[Issued]) -> None:
    """One issuing process: TOKENS_EACH tokens, begun together with the others; what it issued, or how it
    failed, is its one item on ``issued``."""
    start.wait()
    names = [f"issuer-{issuer}-{n}" for n in range(TOKENS_EACH)]
    try:
        issued.put([(name, issue_token(path, name=name, role=Role.viewer)) for name in names])
    except Exception as exc:  # the parent's to report: a child's traceback goes to no test output
        issued.put(f"issuer {issuer}: {exc!r}")


def test_issuers_running_at_once_all_keep_their_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(ISSUERS)
    issued: Queue[Issued] = context.Queue()
    issuers = [context.Process(target=issue_several, args=(path, i, start, issued)) for i in range(ISSUERS)]
    for process in issuers:
        process.start()
    try:
        results = [issued.get(timeout=STUCK_S) for _ in issuers]
    finally:
        for process in issuers:
            process.join(timeout=STUCK_S)
            if process.is_alive():
                process.kill()

    assert [failed for failed in results if isinstance(failed, str)] == []
    tokens = [pair for result in results if not isinstance(result, str) for pair in result]
    store = TokenStore.load(path, dev=False)
    lost = [name for name, token in tokens if store.authenticate(token) != Principal(name, Role.viewer)]
    assert len(tokens) == ISSUERS * TOKENS_EACH
    assert lost == []
    assert sorted(path.parent.iterdir()) == [path, path.with_name("tokens.json.lock")]  # no temporary left


def test_an_issuer_that_reads_the_file_while_another_holds_it_waits_and_loses_no_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first issuer stops between reading the file and storing its token (its `show`); the second goes
    # on until it has read the file too, or is about to wait for the file's lock, and only then does the
    # first store its token. Without a lock both stored what they read plus their own, and the second's
    # rename took the first's token away.
    path = tmp_path / "tokens.json"
    first_has_read = threading.Event()
    second_under_way = threading.Event()
    second_thread: list[threading.Thread] = []
    real_flock = fcntl.flock

    def flock(fd: Any, operation: int) -> None:
        if threading.current_thread() in second_thread and operation & fcntl.LOCK_EX:
            second_under_way.set()
        real_flock(fd, operation)

    def first_shows(token: str) -> None:
        first_has_read.set()
        assert second_under_way.wait(STUCK_S)

    def second() -> str:
        second_thread.append(threading.current_thread())
        return issue_token(path, name="bob", role=Role.operator, show=lambda token: second_under_way.set())

    monkeypatch.setattr(fcntl, "flock", flock)
    with ThreadPoolExecutor(max_workers=2) as pool:
        first_issued = pool.submit(issue_token, path, name="alice", role=Role.viewer, show=first_shows)
        assert first_has_read.wait(STUCK_S)
        second_issued = pool.submit(second)
        alice, bob = first_issued.result(STUCK_S), second_issued.result(STUCK_S)

    store = TokenStore.load(path, dev=False)
    assert store.authenticate(alice) == Principal("alice", Role.viewer)
    assert store.authenticate(bob) == Principal("bob", Role.operator)


def test_the_lock_file_is_for_its_owner_alone(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"

    issue_token(path, name="alice", role=Role.viewer)

    assert path.stat().st_mode & 0o777 == 0o600
    assert path.with_name("tokens.json.lock").stat().st_mode & 0o777 == 0o600


def test_a_temporary_file_a_crashed_issuer_left_does_not_stop_the_next(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    alice = issue_token(path, name="alice", role=Role.viewer)
    # What the old fixed temporary name, or a killed issuer's, leaves behind: not ours to read or reuse.
    (tmp_path / "tokens.tmp").mkdir()

    bob = issue_token(path, name="bob", role=Role.viewer)

    store = TokenStore.load(path, dev=False)
    assert store.authenticate(alice) == Principal("alice", Role.viewer)
    assert store.authenticate(bob) == Principal("bob", Role.viewer)


def test_an_issue_that_waits_for_another_says_what_it_waits_for_and_goes_on_once_it_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # It blocked on the lock without a word: with the other issuer stuck printing to a pipe nobody reads,
    # the command looked hung.
    path = tmp_path / "tokens.json"
    lock = path.with_name("tokens.json.lock")
    said = threading.Event()
    released = threading.Event()
    said_while_held: list[bool] = []
    real_say = cli.say

    def say(message: str) -> None:
        said_while_held.append(not released.is_set())
        real_say(message)
        said.set()

    def other_issuer_finishes() -> None:
        said.wait(STUCK_S)
        os.close(held)  # releases its lock, as the other issuer's exit would
        released.set()

    monkeypatch.setattr(cli, "say", say)
    held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)  # another issuer, between reading the file and replacing it
    other_issuer = threading.Thread(target=other_issuer_finishes)
    other_issuer.start()
    try:
        status = main(["token", "issue", "alice", "--role", "viewer", "--file", str(path)])
    finally:
        other_issuer.join(STUCK_S)

    out, err = capsys.readouterr()
    assert status == 0
    assert said_while_held[0]
    waiting = f"driftloop: waiting for {lock}: another `token issue` is writing {path} ..."
    assert err.splitlines()[0] == waiting
    assert [line for line in err.splitlines() if "waiting" in line] == [waiting]
    assert TokenStore.load(path, dev=False).authenticate(out.strip()) == Principal("alice", Role.viewer)


def synced_folders(monkeypatch: pytest.MonkeyPatch, path: Path, fail: OSError | None = None) -> list[bool]:
    """Record each fsync of a folder, as whether the token file already held the latest token shown (the
    rename was done); raise ``fail`` instead of syncing one, if given."""
    shown: list[str] = []
    folders: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            assert os.path.samestat(os.fstat(fd), os.stat(path.parent))
            folders.append(path.exists() and hash_token(shown[-1]) in path.read_text())
            if fail is not None:
                raise fail
        real_fsync(fd)

    def show_token(token: str) -> None:
        shown.append(token)
        real_show_token(token)

    real_show_token = cli.show_token
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(cli, "show_token", show_token)
    return folders


def test_the_rename_is_made_durable_by_syncing_the_folder_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file was synced before the rename, but not the folder that holds the new name: a crash could
    # bring back the old file, without the token already shown.
    path = tmp_path / "tokens.json"
    folders = synced_folders(monkeypatch, path)

    assert main(["token", "issue", "alice", "--role", "viewer", "--file", str(path)]) == 0

    assert folders == [True]


def test_a_folder_that_cannot_be_synced_is_an_error_saying_the_token_is_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.json"
    synced_folders(monkeypatch, path, fail=OSError(errno.EIO, os.strerror(errno.EIO)))

    status = main(["token", "issue", "alice", "--role", "viewer", "--file", str(path)])

    out, err = capsys.readouterr()
    assert status == 1
    assert (
        f"driftloop: error: the token file {path} (--file) holds the new token, but its folder could not be "
        "synced (Input/output error), so a crash may yet take the token out of it"
    ) in err
    assert "no token was added" not in err and "Traceback" not in err
    assert TokenStore.load(path, dev=False).authenticate(out.strip()) == Principal("alice", Role.viewer)
