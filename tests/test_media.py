"""Media uploads on the real stack: POST /v1/media (types found from the bytes, the 20 MiB cap, dedupe,
the quota), the list, get and delete with their tenant walls, and the public /m/{token} URL (bytes,
headers, HEAD, 304, 404 once deleted). The magic-number checks are also tested on their own."""
from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import msgspec
import pytest

from shared.content import media as store
from shared.content.media_types import NotMedia, sniff
from tests.api_helpers import assert_problem, error_fields
from tests.tenant_env import TenantEnv, tenant_env

M = "/v1/media"
OCTETS = {"Content-Type": "application/octet-stream"}


# -- files, built here ------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(seed: int = 0) -> bytes:
    """A valid 1x1 grey PNG; `seed` changes the pixel (other bytes, another item)."""
    pixel = zlib.compress(bytes([0, seed % 256]))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", pixel) + _png_chunk(b"IEND", b""))


JPEG = (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"  # SOI, APP0 JFIF
        b"\xff\xdb\x00\x43\x00" + bytes(range(1, 65)) + b"\xff\xd9")  # a quantisation table, EOI
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
WEBP = b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00\x2f\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88\xfe\x07\x00"


def mp4(brand: bytes = b"isom") -> bytes:
    ftyp = struct.pack(">I", 24) + b"ftyp" + brand + struct.pack(">I", 0x200) + b"isommp41"
    return ftyp + struct.pack(">I", 8) + b"free" + struct.pack(">I", 16) + b"mdat" + bytes(8)


def _element(element_id: bytes, data: bytes) -> bytes:
    return element_id + bytes([0x80 | len(data)]) + data


def webm(doc_type: bytes = b"webm") -> bytes:
    header = b"".join((_element(b"\x42\x86", b"\x01"), _element(b"\x42\xf7", b"\x01"), _element(b"\x42\xf2", b"\x04"),
                       _element(b"\x42\xf3", b"\x08"), _element(b"\x42\x82", doc_type),
                       _element(b"\x42\x87", b"\x04"), _element(b"\x42\x85", b"\x02")))
    return b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(header)]) + header + b"\x18\x53\x80\x67\x80"  # an empty Segment


# -- the magic numbers, on their own ----------------------------------------------------------------


@pytest.mark.parametrize(("data", "kind", "content_type"), [
    (png(), "photo", "image/png"), (JPEG, "photo", "image/jpeg"), (GIF, "photo", "image/gif"),
    (WEBP, "photo", "image/webp"), (mp4(), "video", "video/mp4"), (mp4(b"mp42"), "video", "video/mp4"),
    (mp4(b"qt  "), "video", "video/quicktime"), (webm(), "video", "video/webm"),
])
def test_each_format_is_told_by_its_bytes(data, kind, content_type):
    assert sniff(data) == (kind, content_type)


@pytest.mark.parametrize(("data", "said"), [
    (b"", "empty"), (b"hello, this is text\n", "are not a JPEG"), (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "are not"),
    (b"\x89PNG\r\n\x1a\nnot a chunk at all", "are not"), (b"RIFF\x00\x00\x00\x00WAVEfmt ", "are not"),
    (mp4(b"M4A "), "'M4A'"), (mp4(b"heic"), "'heic'"), (webm(b"matroska"), "'matroska'"),
    (b"\x1a\x45\xdf\xa3\xff", "could not be read"), (b"\x00\x00\x00\x08ftypisom", "impossible size"),
])
def test_anything_else_is_refused_saying_what_it_is(data, said):
    with pytest.raises(NotMedia, match=said):
        sniff(data)


# -- the API ----------------------------------------------------------------------------------------


class Env(TenantEnv):
    async def upload(self, data: bytes, expect: int = 201, headers: dict[str, str] | None = None, **params: str) -> dict:
        return await self.writer.call("POST", M, expect, content=data, headers=headers or OCTETS, params=params)

    async def refused(self, status: int, code: str | None = None, headers: dict[str, str] | None = None,
                      **kw) -> dict:
        """The problem a writer's upload is answered with (Client.problem takes no headers of its own)."""
        return assert_problem(await self.http.post(M, headers={**self.writer.headers, **(headers or {})}, **kw),
                              status, code)

    async def raw_upload(self, first: bytes, chunks: int) -> tuple[int, dict, int]:
        """An upload straight into the ASGI app, its body `first` then `chunks` MiB of zeros sent
        one MiB a message without Content-Length (a test client reads a body whole before sending
        it): the status, the problem, and how many body messages the app read."""
        messages = [first, *(bytes(1024 * 1024) for _ in range(chunks))]
        read, sent = 0, []

        async def receive() -> dict:
            nonlocal read
            read += 1
            if read > len(messages):
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": messages[read - 1], "more_body": read < len(messages)}

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [(b"authorization", self.writer.headers["Authorization"].encode()),
                   (b"content-type", b"application/octet-stream")]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": M, "raw_path": M.encode(), "root_path": "", "query_string": b"", "headers": headers,
                 "client": ("127.0.0.1", 5000), "server": ("testserver.local", 80)}
        # On the loop the test client runs the app on (its connection pool lives there).
        await asyncio.to_thread(self.http.blocking_portal.call, self.http.app, scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], msgspec.json.decode(body), read

    async def stored(self) -> int:
        return await self.count("SELECT count(*) FROM media")

    async def usage(self, tenant) -> tuple[int, int]:
        row = await self.sql("fetchrow", "SELECT bytes, items FROM media_usage WHERE tenant_id = $1", tenant)
        return (row["bytes"], row["items"]) if row else (0, 0)


@pytest.fixture
async def env(settings) -> AsyncIterator[Env]:
    async with tenant_env(settings, Env) as e:
        yield e


def path(url: str) -> str:
    return urlsplit(url).path


async def test_an_upload_is_served_at_its_public_url_with_the_same_bytes_and_headers(env, settings):
    data = png()
    item = await env.upload(data, headers={"Content-Type": "image/png"}, filename="pixel ä \"1\".png")
    assert item["kind"] == "photo" and item["content_type"] == "image/png" and item["size"] == len(data)
    assert item["sha256"] == hashlib.sha256(data).hexdigest() and item["filename"] == 'pixel ä "1".png'
    assert item["url"].startswith(f"{settings.public_base_url}/m/") and len(path(item["url"])) == 3 + store.TOKEN_CHARS
    assert await env.writer.call("GET", f"{M}/{item['id']}", 200) == item

    r = await env.http.get(path(item["url"]))  # no Authorization: Telegram's servers fetch it
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "image/png" and r.headers["content-length"] == str(len(data))
    assert r.headers["etag"] == f'"{item["sha256"]}"'
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-disposition"] == "inline; filename=\"pixel _ _1_.png\"; filename*=UTF-8''pixel%20%C3%A4%20%221%22.png"

    head = await env.http.head(path(item["url"]))
    assert head.status_code == 200 and head.content == b""
    for name in ("content-type", "content-length", "etag", "cache-control", "x-content-type-options", "content-disposition"):
        assert head.headers[name] == r.headers[name], name

    again = await env.http.get(path(item["url"]), headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == r.headers["etag"]
    assert (await env.http.get(path(item["url"]), headers={"If-None-Match": '"other"'})).status_code == 200


@pytest.mark.parametrize(("data", "said", "kind", "content_type"), [
    (JPEG, "application/octet-stream", "photo", "image/jpeg"),
    (mp4(), "image/png", "video", "video/mp4"),  # the header lies: the bytes decide
    (mp4(b"qt  "), "video/mp4", "video", "video/quicktime"),
    (webm(), "video/webm", "video", "video/webm"),
    (GIF, "image/gif", "photo", "image/gif"),
    (WEBP, "text/plain", "photo", "image/webp"),
])
async def test_the_type_is_told_by_the_bytes_not_the_header(env, data, said, kind, content_type):
    item = await env.upload(data, headers={"Content-Type": said})
    assert (item["kind"], item["content_type"]) == (kind, content_type)
    r = await env.http.get(path(item["url"]))
    assert r.content == data and r.headers["content-type"] == content_type
    assert r.headers["content-disposition"] == "inline"


async def test_a_file_that_is_no_photo_or_video_is_refused_whatever_it_is_called(env):
    text = b"just some text, renamed\n" * 10
    body = assert_problem(await env.http.post(M, content=text, params={"filename": "cat.png"},
                                              headers={**env.writer.headers, "Content-Type": "image/png"}),
                          415, "unsupported_media_type")
    assert error_fields(body) == ["body"] and "not a JPEG, PNG" in body["errors"][0]["reason"]
    for data in (webm(b"matroska"), mp4(b"M4A "), b"<html><script>alert(1)</script></html>"):
        assert error_fields(await env.writer.problem("POST", M, 415, content=data)) == ["body"]
    form = await env.writer.problem("POST", M, 415, files={"file": ("a.png", png(), "image/png")})
    assert "not a form" in form["detail"]
    # The type is known from the first bytes: the rest of a large file of the wrong kind is not read.
    status, problem, read = await env.raw_upload(b"%PDF-1.7\n" + bytes(8192), chunks=15)
    assert status == 415 and problem["errors"][0]["field"] == "body" and read == 1
    gzipped = await env.refused(415, content=png(), headers={"Content-Encoding": "gzip"})
    assert "Content-Encoding" in gzipped["detail"]
    assert error_fields(await env.writer.problem("POST", M, 422, content=b"")) == ["body"]
    assert await env.writer.fields("POST", M, content=png(), params={"filename": "a\nb.png"}) == ["filename"]
    assert await env.stored() == 0 and await env.usage(env.tenant_id) == (0, 0)


async def test_a_body_over_20_mib_is_a_413_and_nothing_is_stored(env):
    over = png() + bytes(store.MAX_FILE_BYTES + 1 - len(png()))
    body = await env.refused(413, "media_too_large", content=over, headers=OCTETS)
    assert body["max_bytes"] == store.MAX_FILE_BYTES and "20 MiB" in body["detail"]

    # No Content-Length: the cap is met while reading, and nothing after it is read.
    status, problem, read = await env.raw_upload(png(), chunks=30)
    assert status == 413 and problem["code"] == "media_too_large" and read == 21  # 20 MiB + the PNG, no more
    # With an Idempotency-Key the body is read by the idempotency middleware, under the same cap.
    keyed = await env.http.post(M, content=over, headers={**env.writer.headers, "Idempotency-Key": "k1"})
    assert str(store.MAX_FILE_BYTES) in assert_problem(keyed, 413)["detail"]
    assert await env.stored() == 0 and await env.usage(env.tenant_id) == (0, 0)


async def test_a_file_of_exactly_20_mib_is_stored_and_served_whole_in_pieces(env):
    data = png() + bytes(range(256)) * ((store.MAX_FILE_BYTES - len(png())) // 256)
    data += bytes(store.MAX_FILE_BYTES - len(data))
    item = await env.upload(data)
    assert item["size"] == store.MAX_FILE_BYTES and await env.usage(env.tenant_id) == (store.MAX_FILE_BYTES, 1)
    r = await env.http.get(path(item["url"]))  # read back 1 MiB at a time
    assert r.status_code == 200 and len(r.content) == store.MAX_FILE_BYTES and r.content == data


async def test_the_same_bytes_again_are_the_item_the_tenant_has(env):
    first = await env.upload(png(), filename="a.png")
    again = await env.upload(png(), 200, headers={"Content-Type": "image/jpeg"}, filename="b.png")
    assert again == first  # its first name and URL
    at_once = await asyncio.gather(*(env.http.post(M, content=png(7), headers={**env.writer.headers, **OCTETS})
                                     for _ in range(5)))
    assert sorted(r.status_code for r in at_once) == [200, 200, 200, 200, 201]
    assert len({r.json()["id"] for r in at_once}) == 1
    assert await env.stored() == 2 and await env.usage(env.tenant_id) == (2 * len(png()), 2)
    # Another tenant's same bytes are its own item.
    theirs = await env.stranger.call("POST", M, 201, content=png(), headers=OCTETS)
    assert theirs["id"] != first["id"] and theirs["url"] != first["url"]


async def test_another_tenant_sees_nothing_and_a_reader_changes_nothing(env):
    item = await env.upload(png())
    for method in ("GET", "DELETE"):
        await env.stranger.problem(method, f"{M}/{item['id']}", 404)
    assert (await env.stranger.call("GET", M, 200))["total"] == 0
    assert await env.reader.call("GET", f"{M}/{item['id']}", 200) == item
    await env.reader.problem("POST", M, 403, content=png(1))
    await env.reader.problem("DELETE", f"{M}/{item['id']}", 403)
    await env.writer.problem("GET", f"{M}/00000000-0000-0000-0000-000000000000", 404)
    assert (await env.http.get(path(item["url"]))).status_code == 200


async def test_a_deleted_item_is_a_404_at_its_url_and_frees_its_room(env):
    item = await env.upload(png())
    await env.writer.call("DELETE", f"{M}/{item['id']}", 204)
    await env.writer.problem("GET", f"{M}/{item['id']}", 404)
    await env.writer.problem("DELETE", f"{M}/{item['id']}", 404)
    gone = await env.http.get(path(item["url"]))
    assert_problem(gone, 404)
    unknown = await env.http.get("/m/" + "A" * store.TOKEN_CHARS)
    assert unknown.json() == gone.json()  # nothing tells a deleted file from one that never was
    assert_problem(await env.http.get("/m/not-a-token"), 404)
    assert (await env.http.head(path(item["url"]))).status_code == 404
    assert await env.stored() == 0 and await env.usage(env.tenant_id) == (0, 0)
    assert (await env.upload(png()))["id"] != item["id"]  # uploaded again: a new item and URL


async def test_the_list_pages_newest_first(env):
    ids = [(await env.upload(png(i)))["id"] for i in range(5)]
    seen = []
    for offset in (0, 2, 4):
        page = await env.writer.call("GET", M, 200, params={"limit": 2, "offset": offset})
        assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == offset
        seen += [item["id"] for item in page["items"]]
    assert seen == ids[::-1]
    assert (await env.writer.call("GET", M, 200, params={"offset": 5}))["items"] == []
    assert await env.writer.fields("GET", M, params={"limit": 0}) == ["limit"]


async def test_past_the_quota_an_upload_is_a_409_and_stores_nothing(env):
    first = await env.upload(png())
    await env.sql("execute", "UPDATE media_usage SET bytes = $2 WHERE tenant_id = $1",
                  env.tenant_id, store.MAX_TENANT_BYTES - len(png(1)) + 1)
    body = await env.writer.problem("POST", M, 409, "media_quota_exceeded", content=png(1))
    assert body["max_bytes"] == store.MAX_TENANT_BYTES and body["max_items"] == store.MAX_TENANT_ITEMS
    assert body["used_items"] == 1
    assert await env.upload(png(), 200) == first  # bytes it has cost nothing
    await env.sql("execute", "UPDATE media_usage SET bytes = $2 - 1, items = $3 WHERE tenant_id = $1",
                  env.tenant_id, store.MAX_TENANT_BYTES - len(png(1)), store.MAX_TENANT_ITEMS)
    await env.writer.problem("POST", M, 409, "media_quota_exceeded", content=png(1))
    assert await env.stored() == 1
    await env.sql("execute", "UPDATE media_usage SET bytes = $2, items = 1 WHERE tenant_id = $1", env.tenant_id, len(png()))
    await env.upload(png(1))  # room again
    await env.stranger.call("POST", M, 201, content=png(1), headers=OCTETS)  # one tenant's quota is its own


async def test_an_idempotency_key_replays_the_first_answer(env):
    headers = {**OCTETS, "Idempotency-Key": "upload-1"}
    first = await env.http.post(M, content=png(), headers={**env.writer.headers, **headers})
    again = await env.http.post(M, content=png(), headers={**env.writer.headers, **headers})
    assert first.status_code == again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and await env.stored() == 1


async def test_the_document_says_what_the_routes_answer(env):
    document = (await env.http.get("/schema/openapi.json")).json()
    upload = document["paths"][M]["post"]
    assert list(upload["requestBody"]["content"]) == ["application/octet-stream"]
    assert {"200", "201", "401", "403", "409", "413", "415", "422"} <= set(upload["responses"])
    public = document["paths"]["/m/{token}"]["get"]
    assert public["security"] == []
    assert {"image/png", "image/jpeg", "video/mp4", "video/webm"} <= set(public["responses"]["200"]["content"])
    assert {"304", "404"} <= set(public["responses"])
