"""Leases on the local stack: the first of two commands to end stops nothing the other uses, the last one
stops what they started, and a command that died (SIGKILL) holds nothing up.

The other commands are real processes holding real leases (flocks) on the test's state folder; Kafka,
Postgres and the platform are fakes that note whether they run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.infra import EVERYTHING, INFRASTRUCTURE, PLATFORM
from deploy.local.leases import Leases
from deploy.local.processes import pid_alive
from tests.unit.infra_fakes import FakeInfra

# Takes a lease on the folder argv[1] for the command argv[2], using argv[3:]; with CHILD set it first
# starts a `sleep` that outlives it, with FORK a forked copy of itself that does. Says "holding" and waits
# to be killed.
HOLDER = """
import os, subprocess, sys, time
from pathlib import Path

from deploy.local.leases import Leases

lease = Leases(Path(sys.argv[1])).take(sys.argv[2], sys.argv[3:])
if os.environ.get("CHILD"):
    # close_fds=False: as a fork does, it would get every descriptor that may be inherited.
    child = subprocess.Popen(["sleep", "300"], start_new_session=True, close_fds=False)
    Path(os.environ["CHILD"]).write_text(str(child.pid))
if os.environ.get("FORK"):
    # A fork without exec (multiprocessing's fork start method, os.fork): the child gets every descriptor.
    # It says so once os.fork has returned in it, its at-fork handlers run: killed before then, the command
    # would leave a child that had not yet had the chance to let go (a race of the test, not of the leases).
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(tell, b"x")
        time.sleep(300)
        os._exit(0)
    os.close(tell)
    assert os.read(ready, 1) == b"x"
    Path(os.environ["FORK"]).write_text(str(pid))
print("holding", flush=True)
time.sleep(300)
"""


class FakePlatform:
    """This checkout's platform: runs once started, until stopped."""

    def __init__(self) -> None:
        self.running = False

    def supervisor_pid(self) -> int | None:
        return 4242 if self.running else None

    def stop(self) -> bool:
        was, self.running = self.running, False
        return was


class Stack:
    """The local infrastructure of a state folder, the platform, and other commands holding leases."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        fake = FakeInfra(tmp_path / ".driftloop", monkeypatch)
        self.infra, self.kafka, self.postgres = fake.local, fake.kafka, fake.postgres
        self.infrastructure_runs = fake.runs
        self.platform = FakePlatform()
        self.holders: list[subprocess.Popen[bytes]] = []

    def other_command(self, command: str, uses: tuple[str, ...] = INFRASTRUCTURE, **env: str) -> int:
        """Another command, in a process of its own, holding a lease; returns its pid."""
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(self.infra.layout.leases), command, *uses],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.holders.append(holder)
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        return holder.pid

    def kill(self, pid: int) -> None:
        """SIGKILL a command: nothing of its own clean-up runs."""
        os.kill(pid, signal.SIGKILL)
        next(holder for holder in self.holders if holder.pid == pid).wait()

    def close(self) -> None:
        for holder in self.holders:
            holder.kill()
            holder.wait()


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    shared = Stack(tmp_path, monkeypatch)
    yield shared
    shared.close()


def test_the_first_of_two_commands_to_end_stops_nothing_the_other_uses(stack: Stack) -> None:
    first = stack.infra.lease("driftloop test")
    first.up()
    second = stack.other_command("driftloop test")

    end = first.end(stack.platform)

    assert stack.infrastructure_runs()
    assert end.stopped == ()
    assert end.left_running == ("kafka", "postgres")
    assert [user.describe() for user in end.users] == [f"pid {second} (driftloop test)"]


def test_the_last_command_to_end_stops_what_the_first_started(stack: Stack) -> None:
    first = stack.infra.lease("driftloop test")
    first.up()
    last = stack.infra.lease("driftloop test")
    assert last.up().started == ()  # it found them running
    first.end(stack.platform)

    end = last.end(stack.platform)

    assert not stack.kafka.running and not stack.postgres.running
    assert end.stopped == ("kafka", "postgres")
    assert stack.infra.leases.started() == frozenset()


def test_a_command_killed_with_sigkill_holds_nothing_up(stack: Stack) -> None:
    lease = stack.infra.lease("driftloop test")
    lease.up()
    killed = stack.other_command("driftloop test")
    stack.kill(killed)

    end = lease.end(stack.platform)

    assert end.stopped == ("kafka", "postgres")
    assert end.users == ()
    assert list(stack.infra.layout.leases.glob("*.lease")) == []  # its lease file is cleared away


@pytest.mark.parametrize("how", ["CHILD", "FORK"], ids=["started", "forked-without-exec"])
def test_what_a_command_starts_does_not_keep_its_lease_alive_after_it_died(how: str, stack: Stack) -> None:
    # A service or a `sleep` the command started must not inherit the lock and hold the lease for it, nor
    # a copy of the command forked without exec (os.fork, multiprocessing's fork start method).
    child_pid_file = stack.tmp_path / "child.pid"
    lease = stack.infra.lease("driftloop test")
    lease.up()
    killed = stack.other_command("driftloop demo", INFRASTRUCTURE, **{how: str(child_pid_file)})
    child = int(child_pid_file.read_text())
    try:
        stack.kill(killed)
        assert pid_alive(child)

        assert [holder.pid for holder in stack.infra.users()] == [os.getpid()]
        assert lease.end(stack.platform).stopped == ("kafka", "postgres")
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_forked_child_ending_gives_up_nothing_of_its_parents_lease(tmp_path: Path) -> None:
    leases = Leases(tmp_path)
    lease = leases.take("driftloop test", INFRASTRUCTURE)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: its clean-up (a finally, an atexit) runs as the parent's
        try:
            lease.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)

    assert lease.path.exists()
    assert [holder.pid for holder in leases.holders()] == [os.getpid()]
    lease.close()
    assert leases.holders() == []


def test_what_a_killed_command_started_is_stopped_by_the_next_to_end(stack: Stack) -> None:
    killed = stack.other_command("driftloop test")
    stack.infra.leases.add_started(INFRASTRUCTURE)  # as its `up` noted when it started them
    stack.kafka.running = stack.postgres.running = True
    stack.kill(killed)
    lease = stack.infra.lease("driftloop test")
    assert lease.up().started == ()

    end = lease.end(stack.platform)

    assert end.stopped == ("kafka", "postgres")


def test_looking_for_what_ended_commands_left_stops_nothing_a_running_one_uses(stack: Stack) -> None:
    # `infra down --left-behind`, as .ci/run's exit trap runs it after a `driftloop test`.
    killed = stack.other_command("driftloop test")
    stack.infra.leases.add_started(INFRASTRUCTURE)
    stack.kafka.running = stack.postgres.running = True
    running = stack.other_command("driftloop test")
    stack.kill(killed)

    assert stack.infra.stop_unused(stack.platform).stopped == ()
    assert stack.infrastructure_runs()

    stack.kill(running)

    assert stack.infra.stop_unused(stack.platform).stopped == ("kafka", "postgres")


def test_a_test_run_keeps_the_infrastructure_but_not_the_platform_of_a_demo_that_ended(stack: Stack) -> None:
    demo = stack.infra.lease("driftloop demo", EVERYTHING)
    demo.up()
    stack.platform.running = True
    demo.note_started(PLATFORM)
    tests = stack.other_command("driftloop test", INFRASTRUCTURE)

    end = demo.end(stack.platform)

    assert end.stopped == (PLATFORM,)  # nothing else used it
    assert stack.infrastructure_runs()  # the test run does
    assert [user.pid for user in end.users] == [tests]


def test_a_demo_still_running_keeps_the_platform_of_one_that_ended(stack: Stack) -> None:
    first = stack.infra.lease("driftloop demo", EVERYTHING)
    first.up()
    stack.platform.running = True
    first.note_started(PLATFORM)
    stack.other_command("driftloop demo", EVERYTHING)

    assert first.end(stack.platform).stopped == ()
    assert stack.platform.running and stack.infrastructure_runs()


def test_a_platform_that_runs_keeps_the_infrastructure_it_runs_on(stack: Stack) -> None:
    # An `up` in another terminal started it on the infrastructure a `test` started.
    lease = stack.infra.lease("driftloop test")
    lease.up()
    stack.platform.running = True

    end = lease.end(stack.platform)

    assert end.stopped == () and end.platform_pid == 4242
    assert stack.infrastructure_runs()


def test_what_is_kept_is_stopped_by_no_command_that_ends(stack: Stack) -> None:
    # A `driftloop up` that got ready took over what a running `test` had started.
    tests = stack.infra.lease("driftloop test")
    tests.up()
    up = stack.infra.lease("driftloop up", EVERYTHING)
    up.up()
    up.keep()
    up.end(stack.platform)

    end = tests.end(stack.platform)

    assert end.stopped == () and end.left_running == ()
    assert tests.taken_over(end) == ["postgres", "kafka"]
    assert stack.infrastructure_runs()


def test_infra_up_takes_over_what_commands_started(stack: Stack) -> None:
    tests = stack.infra.lease("driftloop test")
    tests.up()

    assert stack.infra.keep(INFRASTRUCTURE) == ["kafka", "postgres"]

    assert tests.end(stack.platform).stopped == ()


def test_a_lease_file_that_cannot_be_read_counts_as_using_everything(tmp_path: Path) -> None:
    leases = Leases(tmp_path)
    lease = leases.take("driftloop test", INFRASTRUCTURE)
    lease.path.write_text("not json")  # still locked: its command runs

    (holder,) = leases.holders()

    assert holder.needs(PLATFORM) and holder.needs("kafka")
    lease.close()
    assert leases.holders() == []
