"""deploy/local/driftloop repairs the .venv it made when a setup was interrupted or the checkout moved.

The script runs for real on a copy of the checkout, with a fake Python and a fake uv standing in for the
interpreter, pip and the package index: they do what the script asks of them, note it, and need no
network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.local.processes import wait_until
from deploy.local.settings import PROJECT_ROOT

# The interpreter DRIFTLOOP_PYTHON names: answers the version check, and makes a venv whose python is
# the fake below. FAKE_INTERRUPT stops it the way Ctrl-C does, after bin/python and before pip.
PYTHON = """#!/bin/bash
case "$1" in
  -c) exit 0 ;;
  -m)
    [ "$2" = venv ] || exit 2
    venv="${@: -1}"
    # As venv --clear does: what is in the directory goes, through a link too (os.listdir follows it).
    [ ! -d "$venv" ] || find "$venv/" -mindepth 1 -delete
    mkdir -p "$venv/bin"
    cp "$FAKE_VENV_PYTHON" "$venv/bin/python"
    echo "made a venv at $venv" >>"$FAKE_LOG"
    [ -z "${FAKE_INTERRUPT:-}" ] || exit 130
    touch "$venv/pip" ;;
esac
"""

# A venv's python: `-m pip install uv` (only when pip got installed), and running bin/driftloop.
VENV_PYTHON = """#!/bin/bash
venv="$(cd "$(dirname "$0")/.." && pwd)"
case "$1" in
  -c) exit 0 ;;
  -m)
    [ -e "$venv/pip" ] || { echo "No module named pip" >&2; exit 1; }
    cp "$FAKE_UV" "$venv/bin/uv"
    echo "installed uv" >>"$FAKE_LOG" ;;
  *)
    # The setup's lock must not reach the CLI: a long `driftloop test` would hold up every other run.
    [ ! -e "/proc/$$/fd/9" ] || echo "the CLI holds the setup lock (fd 9)"
    echo "driftloop ran with $venv/bin/python: ${*:2}" ;;
esac
"""

# uv: `pip sync` and `pip install -e`, which writes bin/driftloop with this venv's python on its #! line.
UV = """#!/bin/bash
venv="$(cd "$(dirname "$0")/.." && pwd)"
case "$1 $2" in
  "--version ") exit 0 ;;
  "pip sync") sleep "${FAKE_SYNC_S:-0}"; echo "synced" >>"$FAKE_LOG" ;;
  "pip install")
    printf '#!%s\\n' "$venv/bin/python" >"$venv/bin/driftloop"
    chmod +x "$venv/bin/driftloop"
    echo "installed driftloop" >>"$FAKE_LOG" ;;
esac
"""


class Checkout:
    """A copy of the script in a checkout of its own, and the fakes it is run with."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.root = tmp_path / "checkout"
        (self.root / "deploy" / "local").mkdir(parents=True)
        shutil.copy2(PROJECT_ROOT / "deploy" / "local" / "driftloop", self.root / "deploy" / "local")
        (self.root / "requirements.lock").write_text("fastapi==1.0\n")
        fakes = tmp_path / "fakes"
        fakes.mkdir()
        for name, text in (("python", PYTHON), ("venv-python", VENV_PYTHON), ("uv", UV)):
            (fakes / name).write_text(text)
            (fakes / name).chmod(0o755)
        self.log = tmp_path / "log"
        self.env = {
            "PATH": os.environ["PATH"],
            "DRIFTLOOP_PYTHON": str(fakes / "python"),
            "FAKE_VENV_PYTHON": str(fakes / "venv-python"),
            "FAKE_UV": str(fakes / "uv"),
            "FAKE_LOG": str(self.log),
        }

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        return subprocess.run(
            [str(self.root / "deploy" / "local" / "driftloop"), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    @property
    def did(self) -> list[str]:
        return self.log.read_text().splitlines()

    def move(self, to: str) -> None:
        self.root = self.root.rename(self.tmp_path / to)


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return Checkout(tmp_path)


def test_a_first_run_makes_the_venv_installs_the_lock_and_runs_the_cli(checkout: Checkout) -> None:
    first = checkout.run("status")

    venv = checkout.root / ".venv"
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"driftloop ran with {venv}/bin/python: status\n"
    assert checkout.did == [f"made a venv at {venv}", "installed uv", "synced", "installed driftloop"]

    again = checkout.run("status")
    assert again.returncode == 0, again.stderr
    assert checkout.did == []  # nothing to do


def test_a_venv_whose_creation_was_interrupted_is_made_again(checkout: Checkout) -> None:
    interrupted = checkout.run("status", FAKE_INTERRUPT="1")
    assert interrupted.returncode != 0
    assert (checkout.root / ".venv" / "bin" / "python").exists()  # a venv without pip

    repaired = checkout.run("status")

    assert repaired.returncode == 0, repaired.stderr
    assert "an earlier setup of .venv did not finish: making it again" in repaired.stderr
    assert checkout.did[0] == f"made a venv at {checkout.root / '.venv'}"


def test_a_moved_checkout_gets_a_venv_made_for_its_new_path(checkout: Checkout) -> None:
    assert checkout.run("status").returncode == 0
    old = checkout.root
    checkout.move("moved")

    moved = checkout.run("status")

    venv = checkout.root / ".venv"
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == f"driftloop ran with {venv}/bin/python: status\n"
    assert f".venv was made at {old}/.venv, and this checkout is at {checkout.root}" in moved.stderr
    assert checkout.did == [f"made a venv at {venv}", "installed uv", "synced", "installed driftloop"]


def test_a_venv_linked_from_elsewhere_is_replaced_and_what_it_links_to_left_alone(
    checkout: Checkout, tmp_path: Path
) -> None:
    # A .venv linked to another checkout's (to share one): `venv --clear` on the link would empty the other
    # checkout's environment, since it clears what the path holds, through the link.
    shared = tmp_path / "shared-venv"
    (shared / "bin").mkdir(parents=True)
    (shared / "bin" / "python").write_text("the other checkout's python\n")
    (checkout.root / ".venv").symlink_to(shared)

    made = checkout.run("status")

    venv = checkout.root / ".venv"
    assert made.returncode == 0, made.stderr
    assert f".venv is a link to {shared}" in made.stderr
    assert not venv.is_symlink()
    assert (shared / "bin" / "python").read_text() == "the other checkout's python\n"
    assert checkout.did[0] == f"made a venv at {venv}"


def test_a_venv_stamped_before_paths_were_recorded_is_kept_where_it_belongs(checkout: Checkout) -> None:
    assert checkout.run("status").returncode == 0
    stamp = checkout.root / ".venv" / ".driftloop-lock.sha256"
    stamp.write_text(stamp.read_text().splitlines()[0] + "\n")  # the old one-line stamp

    kept = checkout.run("status")

    assert kept.returncode == 0, kept.stderr
    assert checkout.did == []


def test_a_changed_lock_is_synced_into_the_same_venv(checkout: Checkout) -> None:
    assert checkout.run("status").returncode == 0
    (checkout.root / "requirements.lock").write_text("fastapi==2.0\n")

    synced = checkout.run("status")

    assert synced.returncode == 0, synced.stderr
    assert checkout.did == ["synced", "installed driftloop"]


def test_two_first_runs_at_once_make_the_venv_once_and_both_run(checkout: Checkout) -> None:
    # Two terminals on a fresh checkout: the second must not find the first's setup unfinished and make
    # .venv again under it.
    checkout.log.write_text("")
    command = [str(checkout.root / "deploy" / "local" / "driftloop"), "status"]
    env = {**checkout.env, "FAKE_SYNC_S": "1.5"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    syncing = wait_until(  # the first is syncing the packages
        lambda: "installed uv" in checkout.log.read_text() or first.poll() is not None,
        timeout_s=30,
        interval_s=0.05,
    )
    assert syncing and first.poll() is None, first.communicate()
    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    outputs = [p.communicate(timeout=60) for p in (first, second)]

    venv = checkout.root / ".venv"
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert [out for out, _ in outputs] == [f"driftloop ran with {venv}/bin/python: status\n"] * 2
    assert checkout.did == [f"made a venv at {venv}", "installed uv", "synced", "installed driftloop"]
    assert "waiting for another driftloop to finish setting up .venv" in outputs[1][1]
