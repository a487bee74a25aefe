"""The registry's HTTP routes refuse what the database could not take with a 422 (or a 404 for a version
that cannot exist) before they reach it.

The app here has no database, runtime or artifact store at all (its read pool hands out no connection): a
request that got past validation would fail with a 500, so every 422 and 404 below was given before
anything was read or written.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.responses import HTMLResponse

from contracts.commands import REASON_MAX_CHARS
from contracts.common import ArtifactFormat
from libs.http import create_app
from services.registry import api
from services.registry.settings import RegistrySettings

OPERATOR = {"Authorization": "Bearer dev-operator"}
VIEWER = {"Authorization": "Bearer dev-viewer"}


class NoReads:
    """Stands in for the read pool: its connection is None, so a route that reads anything fails (500)."""

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[None]:
        yield None


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = RegistrySettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    app = create_app(settings, title="registry", description="", routers=[api.router], hot=[api.hot_router])
    app.state.reads = NoReads()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as c:
        yield c


def cursor(position: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(position)).decode().rstrip("=")


@pytest.mark.parametrize(
    "url",
    [
        "/v1/models?cursor=" + cursor(["models", "a\x00b"]),
        "/v1/datasets?cursor=" + cursor(["datasets", "x\x00", 1]),
        "/v1/versions?cursor=" + cursor(["versions", "churn", 2**31]),
        "/v1/datasets?cursor=" + cursor(["datasets", "x", 2**40]),
        "/v1/models/churn/versions?cursor=" + cursor(["versions", "churn", -5]),
    ],
)
async def test_a_cursor_the_database_could_not_compare_is_422(client: httpx.AsyncClient, url: str) -> None:
    r = await client.get(url, headers=VIEWER)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("cursor is not valid")


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets", "/v1/versions", "/v1/models/churn/versions"])
async def test_an_empty_cursor_is_422_not_the_first_page(client: httpx.AsyncClient, path: str) -> None:
    # A client sending the last page's null cursor back as "" would otherwise page for ever.
    r = await client.get(path + "?cursor=", headers=VIEWER)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("cursor is not valid")


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize("key", ["k" * 3000, "%20", "a=b", "-x"])
async def test_a_tag_key_that_could_not_be_indexed_or_found_is_422(
    client: httpx.AsyncClient, key: str, method: str
) -> None:
    body = {"value": "v"} if method == "PUT" else None
    url = f"/v1/models/churn/versions/1/tags/{key}"
    r = await client.request(method, url, json=body, headers=OPERATOR)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("path.key: String should match pattern")


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"name": "churn\n"}, "dataset name 'churn\\n' must match"),
        ({"name": "churn", "models": "churn\n,bad name"}, "model name 'bad name' must match"),
        ({"name": "churn", "description": "a\x00b"}, "body.description: String should match pattern"),
        ({"name": "churn-training"}, "dataset name 'churn-training' is reserved for training's output"),
        ({"name": "churn-holdout"}, "dataset name 'churn-holdout' is reserved for training's output"),
    ],
)
async def test_an_upload_with_a_bad_field_is_422_before_the_file_is_read(
    client: httpx.AsyncClient, form: dict[str, str], message: str
) -> None:
    files = {"file": ("d.csv", b"a,b\n1,2\n", "text/csv")}
    r = await client.post("/v1/datasets", data=form, files=files, headers=OPERATOR)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(message)


async def test_an_upload_naming_more_models_than_a_dataset_serves_is_422_at_once(
    client: httpx.AsyncClient,
) -> None:
    # Each name was looked for among those already split (40,000 names: 17 s on the event loop), then
    # looked up in the database one by one.
    many = ",".join(f"model-{i}" for i in range(40_000))
    files = {"file": ("d.csv", b"a,b\n1,2\n", "text/csv")}
    r = await client.post(
        "/v1/datasets", data={"name": "churn", "models": many}, files=files, headers=OPERATOR
    )
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "models"
    assert r.json()["detail"] == "the upload names 40,000 models; a dataset is meant for at most 100"
    # Named twice is named once.
    twice = ",".join(["churn"] * 101)
    r = await client.post(
        "/v1/datasets", data={"name": "churn", "models": twice}, files=files, headers=OPERATOR
    )
    assert r.status_code == 500  # past every check: the app here has no database


async def test_an_upload_with_a_column_name_too_long_for_a_feature_is_422_naming_the_limit(
    client: httpx.AsyncClient,
) -> None:
    name = "x" * 12_000
    files = {"file": ("d.csv", f"a,{name}\n1,2\n".encode(), "text/csv")}
    r = await client.post("/v1/datasets", data={"name": "churn"}, files=files, headers=OPERATOR)
    assert r.status_code == 422, r.text
    body = r.json()
    assert "column 2 of the header" in body["detail"] and "256 characters" in body["detail"], body
    assert name not in r.text and len(r.text) < 1000


@pytest.mark.parametrize("suffix", ["", "/artifact", "/card"])
@pytest.mark.parametrize("digits", ["9" * 5_000, "0" * 5_000 + "2147483648", "2147483648"])
async def test_a_version_number_beyond_the_last_is_404_before_anything_is_read(
    client: httpx.AsyncClient, digits: str, suffix: str
) -> None:
    # 5,000 digits: more than int() converts (4,300), which raised a ValueError (a 500).
    r = await client.get(f"/v1/models/churn/versions/{digits}{suffix}", headers=VIEWER)
    assert r.status_code == 404, r.text
    assert "a whole number from 1 to 2147483647" in r.json()["detail"]
    assert len(r.text) < 1000


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/churn/versions/{v}",
        "/v1/models/churn/versions/{v}/artifact",
        "/v1/datasets/churn/versions/{v}",
        "/v1/datasets/churn/versions/{v}/file",
    ],
)
@pytest.mark.parametrize("text", ["01", "007", "0", "1.0", "+1", "1_0", "%201"])
async def test_a_version_is_written_one_way_only(client: httpx.AsyncClient, path: str, text: str) -> None:
    # int() (and FastAPI's int path parameter) read '01', '1.0', '+1' and ' 1' as 1 and '1_0' as 10: one
    # version with many names in URLs, as serving's OIP paths no longer allow either.
    r = await client.get(path.format(v=text), headers=VIEWER)
    assert r.status_code == 404, r.text
    assert "no leading zero, no space and no fraction" in r.json()["detail"], r.text


@pytest.mark.parametrize("command", ["promote", "rollback", "archive"])
async def test_a_command_to_a_version_written_another_way_is_404(
    client: httpx.AsyncClient, command: str
) -> None:
    r = await client.post(f"/v1/models/churn/versions/01/{command}", json={"reason": "r"}, headers=OPERATOR)
    assert r.status_code == 404, r.text
    assert r.json()["detail"].startswith("model 'churn' has no version '01'"), r.text


@pytest.mark.parametrize(
    ("form", "files", "field"),
    [
        (
            {"name": "churn"},
            [("file", ("a.csv", b"a\n1\n", "text/csv")), ("file", ("b.csv", b"b\n2\n", "text/csv"))],
            "file",
        ),
        ({"name": ["churn", "churn-b"]}, [("file", ("d.csv", b"a\n1\n", "text/csv"))], "name"),
        (
            {"name": "churn", "description": ["x", "y"]},
            [("file", ("d.csv", b"a\n1\n", "text/csv"))],
            "description",
        ),
    ],
)
async def test_an_upload_giving_a_field_twice_is_422_not_one_of_the_two(
    client: httpx.AsyncClient,
    form: dict[str, Any],
    files: list[tuple[str, tuple[str, bytes, str]]],
    field: str,
) -> None:
    # The form parser keeps the last of two parts: one of two files would be stored and the other dropped.
    r = await client.post("/v1/datasets", data=form, files=files, headers=OPERATOR)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == field and f"gives {field!r} 2 times" in body["detail"], body


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/v1/models/churn/versions/2/rollback", {"reason": "r", "to_version": True}, "to_version"),
        ("/v1/models/churn/versions/2/rollback", {"reason": "r", "to_version": 1.0}, "to_version"),
        ("/v1/models/churn/versions/2/rollback", {"reason": "r", "to_version": "1"}, "to_version"),
        ("/v1/models/churn/retrain", {"reason": "r", "ignore_cooldown": "no"}, "ignore_cooldown"),
        ("/v1/models/churn/retrain", {"reason": "r", "ignore_cooldown": 1}, "ignore_cooldown"),
    ],
)
async def test_a_command_field_of_another_json_type_is_422_not_converted(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], field: str
) -> None:
    # Read laxly, `"to_version": true` was a rollback to version 1 and `"ignore_cooldown": "no"` was false.
    r = await client.post(url, json=body, headers=OPERATOR)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"body.{field}: Input should be a valid"), r.text


COMMAND_URLS = [
    "/v1/models/churn/versions/2/promote",
    "/v1/models/churn/versions/2/rollback",
    "/v1/models/churn/versions/2/archive",
    "/v1/models/churn/retrain",
]
"""Every command route: each takes a ``reason``."""


@pytest.mark.parametrize("url", COMMAND_URLS)
@pytest.mark.parametrize("reason", [" ", "\t\n", "\u3000\u00a0"])
async def test_a_command_reason_of_only_white_space_is_422_naming_it(
    client: httpx.AsyncClient, url: str, reason: str
) -> None:
    # It went into the command's event and the audit trail as a reason that says nothing.
    r = await client.post(url, json={"reason": reason}, headers=OPERATOR)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("body.reason: Value error, a reason must say something"), r.text


@pytest.mark.parametrize("url", COMMAND_URLS)
async def test_a_command_reason_over_the_cap_is_422_naming_it(client: httpx.AsyncClient, url: str) -> None:
    r = await client.post(url, json={"reason": "r" * (REASON_MAX_CHARS + 1)}, headers=OPERATOR)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(
        f"body.reason: String should have at most {REASON_MAX_CHARS} characters"
    ), r.text


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("POST", "/v1/models/churn/versions/2/archive", '{"reason": "superseded"}'),
        ("POST", "/v1/models/churn/retrain", '{"reason": "new export"}'),
        ("PUT", "/v1/models/churn/versions/1/tags/owner", '{"value": "ops"}'),
    ],
)
@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        ("utf-16", "the JSON body reads as UTF-16, not UTF-8: send it as UTF-8"),
        ("utf-32-le", "the JSON body reads as UTF-32LE, not UTF-8: send it as UTF-8"),
        (
            "utf-8-sig",
            "the JSON body starts with a byte order mark (bytes EF BB BF): send it as UTF-8 without one",
        ),
    ],
)
async def test_a_json_body_that_is_not_utf8_is_422_not_read_in_its_encoding(
    client: httpx.AsyncClient, method: str, url: str, body: str, encoding: str, message: str
) -> None:
    # FastAPI's reader (Python's json, on bytes) read UTF-16 and UTF-32 and skipped a byte order mark, where
    # JSON between systems is UTF-8 without one (RFC 8259, section 8.1): the command went on to the core.
    headers = {**OPERATOR, "content-type": "application/json"}
    r = await client.request(method, url, content=body.encode(encoding), headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == message


@pytest.mark.parametrize("path", ["/v1/models", "/v1/versions", "/v1/datasets", "/v1/models/churn/versions"])
@pytest.mark.parametrize("limit", ["1_0", "010", "+10", "10.0"])
async def test_a_limit_written_another_way_is_422(client: httpx.AsyncClient, path: str, limit: str) -> None:
    # Pydantic's int read '1_0' as 10.
    r = await client.get(f"{path}?limit={limit}", headers=VIEWER)
    assert r.status_code == 422, r.text
    assert "write a whole number in decimal digits" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    "url",
    [
        "/v1/models/churn/versions?cursor=" + cursor(["versions", "fraud", 3]),  # another model's versions
        "/v1/versions?prefix=ch&cursor=" + cursor(["versions", "fraud", 3]),
        "/v1/versions?cursor=" + cursor(["datasets", "churn", 3]),  # the datasets list's
        "/v1/datasets?cursor=" + cursor(["versions", "churn", 3]),
        "/v1/models?cursor=" + cursor(["versions", "churn", 3]),
        "/v1/models?prefix=ch&cursor=" + cursor(["models", "fraud"]),
        "/v1/datasets?prefix=ch&cursor=" + cursor(["datasets", "fraud", 1]),
    ],
)
async def test_a_cursor_of_another_list_is_422_not_an_empty_last_page(
    client: httpx.AsyncClient, url: str
) -> None:
    # The cursor's row sorts after every row of the list: the answer was an empty page with no next_cursor.
    r = await client.get(url, headers=VIEWER)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "cursor does not belong to this list: pass its own next_cursor"


@pytest.mark.parametrize(
    ("method", "url", "body", "key"),
    [
        (
            "POST",
            "/v1/models/churn/versions/2/rollback",
            b'{"reason": "r", "to_version": 1, "to_version": 3}',
            "to_version",
        ),
        ("PUT", "/v1/models/churn/versions/1/tags/k", b'{"value": "a", "value": "b"}', "value"),
        (
            "POST",
            "/v1/models/churn/retrain",
            b'{"ignore_cooldown": false, "reason": "r", "ignore_cooldown": true}',
            "ignore_cooldown",
        ),
    ],
)
async def test_a_json_body_naming_a_key_twice_is_422_not_its_last_value(
    client: httpx.AsyncClient, method: str, url: str, body: bytes, key: str
) -> None:
    # FastAPI's reader kept the last value: a rollback to version 3, which a reader keeping the first (a
    # proxy, a log) saw as a rollback to version 1.
    headers = {**OPERATOR, "content-type": "application/json"}
    r = await client.request(method, url, content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert (
        r.json()["detail"]
        == f"the JSON body names the key {key!r} more than once in one object; give each key once"
    )


@pytest.mark.parametrize(
    ("part", "why"),
    [
        (b'name="file"; filename="' + b"x" * 5000 + b'.csv"', "Maximum header size exceeded"),
        (b'name="file"; filename="d.csv"' + b"".join(b"\r\nX-%d: 1" % i for i in range(10)), "header count"),
    ],
)
async def test_a_multipart_body_the_reader_refuses_is_a_422_saying_why(
    client: httpx.AsyncClient, part: bytes, why: str
) -> None:
    # Starlette answered 400 "Invalid multipart data.", whatever the reader had refused.
    body = b"--b\r\nContent-Disposition: form-data; " + part + b"\r\n\r\na\n1\n\r\n--b--\r\n"
    headers = {**OPERATOR, "content-type": "multipart/form-data; boundary=b"}
    r = await client.post("/v1/datasets", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("the multipart body cannot be read: ") and why in r.json()["detail"]


@pytest.mark.parametrize(
    ("name", "description", "field"),
    [(b"churn", b"caf\xe9 export", "description"), (b"churn\xe9", b"export", "name")],
)
async def test_an_upload_whose_text_field_is_not_utf8_is_422_naming_it(
    client: httpx.AsyncClient, name: bytes, description: bytes, field: str
) -> None:
    # Starlette read the bytes as Latin-1: the description 'caf\xe9' (Windows-1252) was stored as 'café' with
    # no word, though the body said nothing of a charset (UTF-8).
    body = (
        b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\n' + name + b"\r\n"
        b'--b\r\nContent-Disposition: form-data; name="description"\r\n\r\n' + description + b"\r\n"
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.csv"\r\n\r\na\n1\n\r\n--b--\r\n'
    )
    headers = {**OPERATOR, "content-type": "multipart/form-data; boundary=b"}
    r = await client.post("/v1/datasets", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert r.json()["detail"].startswith(f"the form field {field!r} is not UTF-8 text (byte 0xe9"), r.text


async def test_the_document_gives_the_media_types_files_and_cards_are_sent_in(
    client: httpx.AsyncClient,
) -> None:
    """A download was documented with no body at all (a client generated from the document drops what it
    gets), and the card as text/plain, which it is never sent as, beside Markdown and HTML."""
    doc = (await client.get("/openapi.json")).json()

    def sent_as(path: str) -> set[str]:
        return set(doc["paths"][path]["get"]["responses"]["200"].get("content", {}))

    assert sent_as("/v1/models/{model}/versions/{version}/artifact") == {
        api.FILE_MEDIA_TYPES[ArtifactFormat.SKOPS],
        api.FILE_MEDIA_TYPES[ArtifactFormat.JSON],
    }
    assert sent_as("/v1/datasets/{name}/versions/{version}/file") == set(api.FILE_MEDIA_TYPES.values())
    card = {api.MarkdownResponse("").headers["content-type"], HTMLResponse("").headers["content-type"]}
    assert sent_as("/v1/models/{model}/versions/{version}/card") == {t.split(";")[0] for t in card}
