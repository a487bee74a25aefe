"""docs/audit.md's export sample verifies with the example consumer, and an altered copy does not."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "audit.md"
DOC_PUBLIC_KEY = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="


def consumer() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "audit_consumer", ROOT / "docs" / "examples" / "audit_consumer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample() -> str:
    [block] = re.findall(r"```ndjson\n(.*?)```", DOC.read_text(), flags=re.S)
    return block


def test_the_documented_export_verifies_with_the_example_consumer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "export.ndjson"
    export.write_text(sample())
    assert consumer().main(["--export", str(export), "--public-key", DOC_PUBLIC_KEY, "--print"]) == 0
    out = capsys.readouterr().out
    assert "io.driftloop.RollbackRequested.v1" in out
    assert "OK: 1 rows from sequence 1 and 1 checkpoints verified; head 317425123b43a726" in out
    assert out.rstrip().endswith("; every row is vouched for by a signed checkpoint")
    assert "317425123b43a726cdfb1438ae5731110d9c91144568ae75b0618de2ac0a5ac2" in DOC.read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("complaints from the sales team", "complaints from the CEO"),
            "FAILED at sequence 1: the row's hash",
        ),
        (
            ('"sequence":1,"head_hash":"3174', '"sequence":1,"head_hash":"4174'),
            "not signed by a pinned key: its signature does not match its contents (forged or altered)",
        ),
    ],
)
def test_an_altered_export_fails_at_its_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str], message: str
) -> None:
    export = tmp_path / "export.ndjson"
    export.write_text(sample().replace(*change))
    assert consumer().main(["--export", str(export), "--public-key", DOC_PUBLIC_KEY]) == 1
    assert message in capsys.readouterr().err


def test_a_key_that_is_not_pinned_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "export.ndjson"
    export.write_text(sample())
    other = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik="
    assert consumer().main(["--export", str(export), "--public-key", other]) == 1
    assert (
        "FAILED at sequence 1: the checkpoint at 1 (line 3 of the export) is not signed by a pinned key: it "
        "is signed by key 56475aa75463474c, which is not pinned here, so it vouches for nothing"
        in capsys.readouterr().err
    )
