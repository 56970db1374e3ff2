"""Streaming contact imports (POST /v1/contacts/imports) on the real stack: CSV and NDJSON parsed as
they stream, rows checked and merged by external id or email, rejections with their line and reason,
lists, progress while running, cut-off and stale imports, tenancy, concurrency, and `crier import`.
The parsing itself, without a database, first."""
from __future__ import annotations

import asyncio
import gzip
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api_service.app import create_app
from shared.audience import import_formats, import_lines
from shared.audience.import_formats import HeaderError, parser_for
from shared.platform import db
from shared.platform.logging import configure_logging
from shared.tenants import store as tenants
from shared.tooling import cli
from tests.stack import served

IMPORTS = "/v1/contacts/imports"
CSV = {"Content-Type": "text/csv"}
NDJSON = {"Content-Type": "application/x-ndjson"}


# -- parsing (pure) ------------------------------------------------------------------------------


def parse(format: str, data: bytes, piece: int | None = None, chunk_rows: int = 3) -> list[Any]:
    parser = parser_for(format, chunk_rows)
    piece = piece or len(data) or 1
    chunks = [c for at in range(0, len(data), piece) for c in parser.feed(data[at : at + piece])]
    return chunks + parser.finish()


def rows_of(chunks: list[Any]) -> list[tuple[Any, ...]]:
    return [row for c in chunks for row in zip(c.lines, c.external_ids, c.emails, c.attributes)]


def rejections_of(chunks: list[Any]) -> list[tuple[int, str]]:
    return [(r.line, r.field) for c in chunks for r in c.rejections]


MESSY_CSV = (
    b"\xef\xbb\xbfExternal_ID, email ,first_name,score:number,vip:boolean,tags:json,attributes.email\r\n"
    b"u1,ann@example.com,Ann,3,yes,\"[1,2]\",private@example.com\r\n"
    b"\r\n"  # blank: skipped, but counted as a line
    b"u2,bob@Example.COM,\"Bob \"\"B\"\"\",x,,,\r\n"  # score is not a number
    b"u3,cy@example.com,\"two\nlines\",4,no,{},\r\n"  # a quoted line break: one record over lines 5-6
    b",,,,,,\r\n"  # empty cells only: skipped
    b"u4,not-an-email,D,,,,\r\n"
    b",,E,,,,\r\n"  # no key: rejected
    b"u5,eve@example.com,Eve,1,0,null,x,extra\r\n"  # one field too many
    b"u6,fay@example.com\r\n"  # cells left out are not given
    b"\"u7,unclosed"
)


@pytest.mark.parametrize("piece", [1, 7, 64, None])
def test_csv_rows_columns_and_rejections_whatever_the_pieces(piece):
    chunks = parse("csv", MESSY_CSV, piece)
    assert rows_of(chunks) == [
        (2, "u1", "ann@example.com",
         '{"first_name":"Ann","score":3,"vip":true,"tags":[1,2],"email":"private@example.com"}'),
        (5, "u3", "cy@example.com", '{"first_name":"two\\nlines","score":4,"vip":false,"tags":{}}'),
        (11, "u6", "fay@example.com", None),
    ]
    assert rejections_of(chunks) == [(4, "attributes.score"), (8, "email"), (9, "external_id"), (10, "row"),
                                     (12, "row")]
    assert sum(c.rows_read for c in chunks) == 8  # the header, blank lines and empty rows are not rows


def test_csv_fields_are_normalised_and_empty_cells_not_given():
    data = (b"external_id,email,phone,phone_region,locale,timezone,push_tokens\n"
            b"a, Ann@Example.COM ,030 1234567,DE,pt_br,europe/berlin,t1;t2 t1\n"
            b"b,,+14155550100,,,,\n")
    (chunk,) = parse("csv", data)
    assert chunk.emails == ["Ann@example.com", None]
    assert chunk.phones == ["+49301234567", "+14155550100"]
    assert chunk.locales == ["pt-BR", None] and chunk.timezones == ["Europe/Berlin", None]
    assert chunk.push_tokens == [["t1", "t2"], None]
    assert chunk.given[1] & 1 == 0  # b's email: not given, the stored one stays


def test_csv_lines_too_long_and_bad_bytes_reject_their_row_only():
    long = b"u2,b@example.com," + b"x" * (import_lines.MAX_LINE_BYTES + 10) + b"\n"
    data = b"external_id,email,note\nu1,a@example.com,ok\n" + long + b"u3,c@\xff.com,bad\nu4,d@example.com,\x00\nu5,e@example.com,ok\n"
    chunks = parse("csv", data, piece=4096, chunk_rows=100)
    assert [r[1] for r in rows_of(chunks)] == ["u1", "u5"]
    assert [(r.line, r.field) for c in chunks for r in c.rejections] == [(3, "row"), (4, "row"), (5, "row")]
    assert "longer than" in chunks[0].rejections[0].reason


@pytest.mark.parametrize("header, field", [
    (b"name,city\n", "header"),  # neither external_id nor email
    (b"email,email\n", "header.email"),
    (b"email,plan,plan:string\n", "header.plan:string"),
    (b"", "header"),
])
def test_a_header_that_cannot_be_used_is_an_error(header, field):
    with pytest.raises(HeaderError) as e:
        parse("csv", header + b"a@example.com,x,y\n" if header else b"")
    assert e.value.field == field


def test_ndjson_lines_null_clears_and_bad_lines_are_rejected():
    data = (b'{"external_id":"u1","email":"a@example.com","attributes":{"plan":"pro"}}\n'
            b"\n"
            b'{"external_id":"u2","email":null,"phone":"+14155550100"}\r\n'
            b"not json\n"
            b'{"email":"z@example.com","plan":"x"}\n'
            b'{"external_id":"u3","attributes":{"a":{"b":{"c":{"d":{"e":1}}}}}}\n'
            b'{"external_id":"u4","email":"bad","locale":"xx-"}\n'
            b'{"external_id":"u5","name":"\\u0000"}')
    for piece in (5, None):
        chunks = parse("ndjson", data, piece)
        assert [(r[0], r[1]) for r in rows_of(chunks)] == [(1, "u1"), (3, "u2")]
        assert rejections_of(chunks) == [(4, "row"), (5, "plan"), (6, "attributes"), (7, "email"), (8, "row")]
        (u2,) = [c for c in chunks if "u2" in c.external_ids]
        assert u2.emails[u2.external_ids.index("u2")] is None  # null: cleared


# -- the API -------------------------------------------------------------------------------------


class Env(msgspec.Struct):
    http: Any
    token: str
    other: str  # a write token of another tenant
    read: str
    database_url: str

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def imports(self, body: Any, headers: dict[str, str] = CSV, expect: int = 202, **params: Any) -> Any:
        r = await self.http.post(IMPORTS, content=body, headers={**self.auth(), **headers}, params=params)
        assert r.status_code == expect, r.text
        return r.json()

    async def get(self, path: str, token: str | None = None, expect: int = 200, **params: Any) -> Any:
        r = await self.http.get(path, headers=self.auth(token), params=params)
        assert r.status_code == expect, r.text
        return r.json()

    async def contact(self, external_id: str) -> dict[str, Any]:
        (found,) = (await self.get("/v1/contacts", external_id=external_id))["items"]
        return found

    async def sql(self, query: str, *args: Any) -> Any:
        con = await db.connect(self.database_url)
        try:
            return await con.fetchval(query, *args)
        finally:
            await con.close()


async def _tokens(settings) -> tuple[str, str, str]:
    con = await db.connect(settings.database_url)
    try:
        one, two = await tenants.create_tenant(con, "one"), await tenants.create_tenant(con, "two")
        return ((await tenants.create_token(con, one.id, "write")).token,
                (await tenants.create_token(con, two.id, "write")).token,
                (await tenants.create_token(con, one.id, "read")).token)
    finally:
        await con.close()


@pytest.fixture
async def env(settings):
    settings = msgspec.structs.replace(settings, run_background=False)
    token, other, read = await _tokens(settings)
    async with AsyncTestClient(app=create_app(settings)) as http:
        yield Env(http, token, other, read, settings.database_url)


@pytest.fixture
async def served_env(settings):
    """The app behind a real HTTP server: bodies stream, and other requests run meanwhile."""
    settings = msgspec.structs.replace(settings, run_background=False)
    token, other, read = await _tokens(settings)
    async with served(create_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        yield Env(http, token, other, read, settings.database_url)


async def test_a_csv_with_bad_rows_reports_each_with_its_line_and_writes_the_rest(env):
    body = (b"external_id,email,phone,first_name\n"
            b"ann,ann@example.com,+14155550100,Ann\n"
            b"bob,bob@example,,Bob\n"
            b"cy,cy@example.com,12345,Cy\n"
            b"dee,dee@example.com,,Dee\n"
            b",,,Nobody\n")
    done = await env.imports(body)
    assert done["status"] == "completed" and done["format"] == "csv"
    assert (done["rows_read"], done["created"], done["rejected"]) == (5, 2, 3)
    assert [(r["line"], r["field"]) for r in done["rejections"]] == [(3, "email"), (4, "phone"), (6, "external_id")]
    assert all(r["reason"] for r in done["rejections"])
    assert (await env.contact("dee"))["attributes"] == {"first_name": "Dee"}
    assert (await env.get(f"{IMPORTS}/{done['id']}"))["rejections"] == done["rejections"]


async def test_unknown_columns_become_attributes_merged_key_by_key_and_a_reimport_updates(env):
    await env.imports(b"external_id,email,plan,city,age:number\nann,ann@example.com,pro,Berlin,41\n")
    again = await env.imports(b"external_id,plan,vip:boolean\nann,gold,yes\nbob,free,no\n")
    assert (again["created"], again["updated"], again["unchanged"]) == (1, 1, 0)
    ann = await env.contact("ann")
    assert ann["email"] == "ann@example.com"  # not in the second file: kept
    assert ann["attributes"] == {"plan": "gold", "city": "Berlin", "age": 41, "vip": True}
    same = await env.imports(b"external_id,plan,vip:boolean\nann,gold,yes\nbob,free,no\n")
    assert (same["created"], same["updated"], same["unchanged"]) == (0, 0, 2)
    assert (await env.get("/v1/contacts"))["total"] == 2  # updated, never duplicated


async def test_rows_of_one_contact_in_a_chunk_apply_in_order(env):
    done = await env.imports(b"external_id,email,plan,seen\nann,a1@example.com,free,1\nann,,pro,\nann,a3@example.com,,3\n")
    assert (done["rows_read"], done["created"], done["updated"]) == (3, 1, 2)
    ann = await env.contact("ann")
    assert ann["email"] == "a3@example.com" and ann["attributes"] == {"plan": "pro", "seen": "3"}


async def test_rows_without_external_id_merge_by_email_in_any_case(env):
    r = await env.http.post("/v1/contacts", json={"external_id": "ann", "email": "Ann@Example.com"}, headers=env.auth())
    assert r.status_code == 201, r.text
    done = await env.imports(b"email,plan\nANN@example.COM,gold\nnew@example.com,free\nNew@Example.com,pro\n")
    assert (done["created"], done["updated"], done["rejected"]) == (1, 2, 0)
    assert (await env.contact("ann"))["attributes"] == {"plan": "gold"}
    (new,) = (await env.get("/v1/contacts", email="new@example.com"))["items"]
    assert new["external_id"] is None and new["attributes"] == {"plan": "pro"}
    again = await env.imports(b"email,plan\nNew@example.com,pro\n")
    assert (again["created"], again["unchanged"]) == (0, 1)
    assert (await env.get("/v1/contacts"))["total"] == 2


async def test_ndjson_imports_like_post_contacts_items_and_null_clears(env):
    first = b'{"external_id":"ann","email":"ann@example.com","phone":"+14155550100","attributes":{"a":1}}\n'
    await env.imports(first, NDJSON)
    body = (b'{"external_id":"ann","phone":null,"attributes":{"b":[1,{"c":2}]},"timezone":"Europe/Berlin"}\n'
            b'{"external_id":"bob","email":"bob@example.com","push_tokens":["tok-1"]}\n'
            b'{"external_id":"cy","surname":"x"}\n')
    done = await env.imports(body, NDJSON)
    assert (done["created"], done["updated"], done["rejected"]) == (1, 1, 1)
    assert done["rejections"] == [{"line": 3, "field": "surname", "reason": "unknown field"}]
    ann = await env.contact("ann")
    assert ann["phone"] is None and ann["email"] == "ann@example.com"
    assert ann["attributes"] == {"a": 1, "b": [1, {"c": 2}]}
    assert await env.sql("SELECT timezone FROM contacts WHERE external_id = 'ann'") == "Europe/Berlin"
    assert await env.sql("SELECT push_tokens FROM contacts WHERE external_id = 'bob'") == ["tok-1"]


async def test_list_id_adds_everyone_imported_and_another_tenants_list_is_a_404(env):
    r = await env.http.post("/v1/lists", json={"name": "news"}, headers=env.auth())
    list_id = r.json()["id"]
    await env.imports(b"external_id,email\nann,ann@example.com\n")
    done = await env.imports(b"external_id,email\nann,ann@example.com\nbob,bob@example.com\nbad,x\n", list_id=list_id)
    assert done["list_id"] == list_id
    assert (await env.get(f"/v1/lists/{list_id}"))["member_count"] == 2
    r = await env.http.post(IMPORTS, content=b"external_id\nz\n", headers={**env.auth(env.other), **CSV},
                            params={"list_id": list_id})
    assert r.status_code == 404, r.text
    assert (await env.get(IMPORTS, env.other))["total"] == 0  # nothing recorded, nothing read


async def test_imports_are_the_tenants_own(env):
    done = await env.imports(b"external_id\nann\n")
    await env.get(f"{IMPORTS}/{done['id']}", env.other, expect=404)
    assert (await env.get(IMPORTS, env.other))["items"] == []
    page = await env.get(IMPORTS)
    assert [i["id"] for i in page["items"]] == [done["id"]] and "rejections" not in page["items"][0]
    await env.get(f"{IMPORTS}/{uuid.uuid4()}", expect=404)


async def test_a_tenant_runs_two_imports_at_once_and_another_tenant_is_not_held_up(env):
    # Given two imports of tenant one still running (their streams open elsewhere)
    done = await env.imports(b"external_id\nann\n")
    tenant = await env.sql("SELECT tenant_id FROM contact_imports WHERE id = $1", uuid.UUID(done["id"]))
    for _ in range(2):
        await env.sql("INSERT INTO contact_imports (id, tenant_id, format) VALUES ($1, $2, 'csv')", uuid.uuid4(), tenant)
    # When it starts a third, and the other tenant one
    r = await env.http.post(IMPORTS, content=b"external_id\nbob\n", headers={**env.auth(), **CSV})
    other = await env.http.post(IMPORTS, content=b"external_id\nbob\n", headers={**env.auth(env.other), **CSV})
    # Then the third waits its turn, nothing of it written; the other tenant's goes ahead
    assert r.status_code == 429 and r.json()["code"] == "too_many_imports" and r.headers["retry-after"] == "5"
    assert (await env.get("/v1/contacts", external_id="bob"))["total"] == 0
    assert other.status_code == 202 and other.json()["created"] == 1


async def test_what_an_import_refuses_before_reading(env):
    r = await env.http.post(IMPORTS, content=b"{}", headers={**env.auth(), "Content-Type": "application/json"})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    r = await env.http.post(IMPORTS, content=b"x", headers={**env.auth(env.read), **CSV})
    assert r.status_code == 403
    r = await env.http.post(IMPORTS, content=b"name,city\nx,y\n", headers={**env.auth(), **CSV})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "header"
    assert (await env.get(IMPORTS))["total"] == 0


async def test_a_merge_past_the_stored_attribute_limit_rejects_that_row_only(env):
    big = "x" * 60_000
    for key in ("a", "b"):
        r = await env.http.post("/v1/contacts", json={"external_id": "ann", "attributes": {key: big}}, headers=env.auth())
        assert r.status_code in (200, 201), r.text
    done = await env.imports(f"external_id,c\nann,{'y' * 20_000}\nbob,ok\n".encode())
    assert (done["created"], done["rejected"]) == (1, 1)
    assert done["rejections"][0]["line"] == 2 and done["rejections"][0]["field"] == "attributes"
    assert set((await env.contact("ann"))["attributes"]) == {"a", "b"}


async def test_gzip_bodies_and_idempotency_keys(env):
    body = gzip.compress(b"external_id,email\nann,ann@example.com\n")
    keyed = {**CSV, "Content-Encoding": "gzip", "Idempotency-Key": "import-1"}
    first = await env.imports(body, keyed)
    r = await env.http.post(IMPORTS, content=b"external_id\nbob\n", headers={**env.auth(), **keyed})
    assert r.status_code == 202 and r.headers["Idempotent-Replayed"] == "true" and r.json()["id"] == first["id"]
    assert (await env.get("/v1/contacts"))["total"] == 1  # the retry's body was not read
    r = await env.http.post(IMPORTS, content=b"\x1f\x8b not gzip", headers={**env.auth(), **CSV, "Content-Encoding": "gzip"})
    assert r.status_code == 400


async def test_a_running_import_not_heard_of_for_a_minute_reads_as_failed(env):
    done = await env.imports(b"external_id\nann\n")
    await env.sql("UPDATE contact_imports SET status = 'running', finished_at = NULL, "
                  "updated_at = now() - interval '2 minutes' WHERE id = $1", uuid.UUID(done["id"]))
    got = await env.get(f"{IMPORTS}/{done['id']}")
    assert got["status"] == "failed" and "interrupted" in got["error"] and got["rows_read"] == 1


async def test_contacts_tenant_is_still_checked_and_cascaded_without_the_per_row_foreign_key(env):
    """016_imports.sql checks contacts.tenant_id once per statement: the same guarantees."""
    con = await db.connect(env.database_url)
    try:
        tenant = await tenants.create_tenant(con, "brief")
        await con.execute("INSERT INTO contacts (tenant_id, external_id) SELECT $1, 'k' || g FROM generate_series(1, 3) g",
                          tenant.id)
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await con.execute("INSERT INTO contacts (tenant_id, external_id) VALUES ($1, 'a'), ($2, 'b')",
                              tenant.id, uuid.uuid4())
        await con.execute("DELETE FROM tenants WHERE id = $1", tenant.id)
        assert await con.fetchval("SELECT count(*) FROM contacts WHERE tenant_id = $1", tenant.id) == 0
    finally:
        await con.close()


# -- streaming, on a real server -----------------------------------------------------------------


async def _rows(n: int, start: int = 0, note: int = 0, step: int = 1) -> AsyncIterator[bytes]:
    yield b"external_id,email,note\n"
    pad = "n" * note
    for at in range(start, start + n, 1000):
        yield "".join(f"u{i},user{i}@example.com,{pad}{i}\n" for i in range(at, min(at + 1000, start + n))[::step]).encode()


async def test_a_body_over_the_32_mib_request_cap_streams_in(served_env):
    done = await served_env.imports(_rows(17_000, note=2_000))  # ~34 MiB, generated as it is sent
    assert done["status"] == "completed" and done["created"] == 17_000
    assert done["bytes_read"] > 32 * 1024 * 1024


async def test_progress_shows_while_it_runs_and_a_cut_off_import_fails_keeping_its_chunks(served_env, monkeypatch):
    monkeypatch.setattr(import_formats, "CHUNK_ROWS", 1_000)
    seen: list[dict[str, Any]] = []

    async def body() -> AsyncIterator[bytes]:
        async for piece in _rows(20_000):  # past the 256 KiB the parser takes at a time
            yield piece
        for _ in range(200):  # until a chunk is committed, as another request sees it
            page = await served_env.get(IMPORTS)
            if page["items"] and page["items"][0]["rows_read"] >= 1_000:
                seen.append(page["items"][0])
                break
            await asyncio.sleep(0.05)
        raise ConnectionAbortedError("the client goes away")

    with pytest.raises(Exception):  # what httpx makes of the body's error
        await served_env.http.post(IMPORTS, content=body(), headers={**served_env.auth(), **CSV})
    assert seen and seen[0]["status"] == "running"
    for _ in range(100):
        (last,) = (await served_env.get(IMPORTS))["items"]
        if last["status"] != "running":
            break
        await asyncio.sleep(0.05)
    assert last["status"] == "failed" and "disconnected" in last["error"], last
    assert last["rows_read"] >= 1_000 and last["finished_at"] is not None
    assert (await served_env.get("/v1/contacts"))["total"] == last["created"] >= 1_000


async def test_a_list_deleted_while_its_import_runs_stops_it(served_env, monkeypatch):
    monkeypatch.setattr(import_formats, "CHUNK_ROWS", 1_000)
    r = await served_env.http.post("/v1/lists", json={"name": "gone"}, headers=served_env.auth())
    list_id = r.json()["id"]

    async def body() -> AsyncIterator[bytes]:
        async for piece in _rows(20_000):
            yield piece
        for _ in range(200):  # once a chunk is in, the list goes
            page = await served_env.get(IMPORTS)
            if page["items"] and page["items"][0]["rows_read"]:
                break
            await asyncio.sleep(0.05)
        assert (await served_env.http.delete(f"/v1/lists/{list_id}", headers=served_env.auth())).status_code == 204
        async for piece in _rows(5_000, start=20_000):
            yield piece

    r = await served_env.http.post(IMPORTS, content=body(), headers={**served_env.auth(), **CSV},
                                   params={"list_id": list_id})
    assert r.status_code == 409 and r.json()["code"] == "list_deleted", r.text
    done = await served_env.get(f"{IMPORTS}/{r.json()['import_id']}")
    assert done["status"] == "failed" and "list was deleted" in done["error"] and done["created"] >= 1_000
    assert await served_env.sql("SELECT count(*) FROM list_members") == 0


async def test_two_imports_of_the_same_contacts_at_once_neither_deadlock_nor_lose_updates(served_env, monkeypatch):
    monkeypatch.setattr(import_formats, "CHUNK_ROWS", 2_000)

    async def rows(name: str, order: range) -> AsyncIterator[bytes]:
        yield f"external_id,email,{name}\n".encode()
        yield "".join(f"u{i},user{i}@example.com,{i}\n" for i in order).encode()

    r = await served_env.http.post("/v1/lists", json={"name": "both"}, headers=served_env.auth())
    list_id = r.json()["id"]
    one, two = await asyncio.gather(served_env.imports(rows("a", range(0, 12_000)), list_id=list_id),
                                    served_env.imports(rows("b", range(14_000, -1, -1)), list_id=list_id))
    assert one["status"] == two["status"] == "completed"
    assert (await served_env.get("/v1/contacts", limit=1))["total"] == 14_001
    both = await served_env.sql("SELECT count(*) FROM contacts WHERE attributes ?& array['a', 'b']")
    assert both == 12_000  # each import's attribute on every contact both touched
    assert (await served_env.get(f"/v1/lists/{list_id}"))["member_count"] == 14_001


async def test_crier_import_streams_a_file_creating_the_list_by_name(served_env, tmp_path, capsys):
    path = tmp_path / "people.csv"
    path.write_text("external_id,email,plan\nann,ann@example.com,pro\nbob,not-an-email,free\n")
    base_url = str(served_env.http.base_url)
    command = ["import", str(path), "--list", "newsletter", "--api", base_url, "--token", served_env.token]
    try:
        with pytest.raises(SystemExit) as exited:
            await asyncio.to_thread(cli.main, command)
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert "completed" in out and "created 1" in out and "rejected 1" in out and "line 3: email" in out
        (news,) = (await served_env.get("/v1/lists"))["items"]
        assert news["name"] == "newsletter" and news["member_count"] == 1
        with pytest.raises(SystemExit):  # again: the list is found by its name, not created twice
            await asyncio.to_thread(cli.main, command)
        assert (await served_env.get("/v1/lists"))["total"] == 1
    finally:
        configure_logging("console", os.environ.get("CRIER_TEST_LOG_LEVEL", "warning"))  # cli.main set its own


def test_crier_import_finds_its_token_and_the_files_type(tmp_path, monkeypatch):
    from shared.tooling.import_file import media_type, token_from

    monkeypatch.delenv("CRIER_TOKEN", raising=False)
    assert token_from(None, tmp_path) is None
    (tmp_path / "dev-token").write_text("crier_dev\n")
    assert token_from(None, tmp_path) == "crier_dev"
    monkeypatch.setenv("CRIER_TOKEN", "crier_env")
    assert token_from(None, tmp_path) == "crier_env" and token_from("crier_arg", tmp_path) == "crier_arg"
    (tmp_path / "x.jsonl.gz").write_bytes(gzip.compress(b"{}"))
    (tmp_path / "export").write_bytes(b'\xef\xbb\xbf{"email": "a@example.com"}\n')
    assert media_type(tmp_path / "x.jsonl.gz", None) == ("application/x-ndjson", True)
    assert media_type(tmp_path / "export", None) == ("application/x-ndjson", False)
    assert media_type(tmp_path / "export", "csv") == ("text/csv", False)
