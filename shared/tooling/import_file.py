"""`crier import FILE`: stream a CSV or NDJSON file to the API (a progress bar on the bytes sent) and
print what became of it: the counts, and the first rejected rows."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

PIECE = 1024 * 1024  # bytes read from the file and sent at a time
SHOWN_REJECTIONS = 10
_TYPES = {".csv": "text/csv", ".ndjson": "application/x-ndjson", ".jsonl": "application/x-ndjson"}


def token_from(given: str | None, data_dir: Path) -> str | None:
    """--token, else $CRIER_TOKEN, else the dev token `crier dev` wrote."""
    if given:
        return given
    if env := os.environ.get("CRIER_TOKEN"):
        return env
    dev = data_dir / "dev-token"
    return dev.read_text().strip() if dev.exists() else None


def media_type(path: Path, format: str | None) -> tuple[str, bool]:
    """(Content-Type, gzipped) from --format, else the name (`x.csv`, `x.ndjson.gz`), else the first byte."""
    gzipped = path.suffix.lower() == ".gz"
    if format:
        return ("text/csv" if format == "csv" else "application/x-ndjson"), gzipped
    inner = Path(path.stem).suffix.lower() if gzipped else path.suffix.lower()
    if inner in _TYPES:
        return _TYPES[inner], gzipped
    with open(path, "rb") as f:
        first = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    return ("application/x-ndjson" if first.startswith(b"{") else "text/csv"), gzipped


def _list_id(client: httpx.Client, name: str) -> str:
    """The id of the tenant's list with this name, created if there is none."""
    offset = 0
    while True:
        page = _ok(client.get("/v1/lists", params={"limit": 500, "offset": offset}))
        for item in page["items"]:
            if item["name"] == name:
                return item["id"]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            break
    return _ok(client.post("/v1/lists", json={"name": name}))["id"]


class ApiError(Exception):
    pass


def _ok(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        detail = response.json().get("detail") or response.text
    except ValueError:
        detail = response.text
    raise ApiError(f"{response.request.method} {response.request.url.path}: {response.status_code} {detail}")


def _pieces(path: Path, progress: Progress, task: Any) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(PIECE):
            yield piece
            progress.advance(task, len(piece))


def import_file(path: Path, *, api: str, token: str, list_name: str | None = None, format: str | None = None,
                console: Console | None = None) -> int:
    """Stream the file; returns the exit status (0: the import completed)."""
    console = console or Console(stderr=True)
    content_type, gzipped = media_type(path, format)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type,
               "Content-Length": str(path.stat().st_size)}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    # The answer comes once the whole body is merged: no read timeout.
    with httpx.Client(base_url=api.rstrip("/"), timeout=httpx.Timeout(30, read=None)) as client:
        client.headers["Authorization"] = headers["Authorization"]
        try:
            params = {"list_id": _list_id(client, list_name)} if list_name else {}
        except (ApiError, httpx.HTTPError) as e:
            console.print(f"[red]crier import: {e}")
            return 2
        started = time.monotonic()
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(f"importing {path.name}", total=path.stat().st_size)
            try:
                response = client.post("/v1/contacts/imports", params=params, headers=headers,
                                       content=_pieces(path, progress, task))
            except httpx.HTTPError as e:
                console.print(f"[red]crier import: the upload failed: {e!r}")
                return 2
    took = time.monotonic() - started
    try:
        result = _ok(response)
    except ApiError as e:
        console.print(f"[red]crier import: {e}")
        return 1
    _summary(result, took, Console())
    return 0 if result["status"] == "completed" else 1


def _summary(result: dict[str, Any], took: float, out: Console) -> None:
    out.print(f"import {result['id']}: {result['status']} in {took:.1f} s")
    out.print(f"  rows read {result['rows_read']:,}: created {result['created']:,}, updated {result['updated']:,}, "
              f"unchanged {result['unchanged']:,}, rejected {result['rejected']:,}")
    if result.get("error"):
        out.print(f"  [red]{result['error']}")
    rejections = result.get("rejections") or []
    for r in rejections[:SHOWN_REJECTIONS]:
        out.print(f"  line {r['line']}: {r['field']}: {r['reason']}", markup=False)
    if result["rejected"] > SHOWN_REJECTIONS:
        out.print(f"  … {result['rejected'] - SHOWN_REJECTIONS:,} more rejected"
                  f" (the first {len(rejections):,}: GET /v1/contacts/imports/{result['id']})")


def main(file: str, *, api: str, token: str | None, list_name: str | None, format: str | None, data_dir: Path) -> None:
    path = Path(file)
    if not path.is_file():
        sys.exit(f"crier import: no file {file}")
    token = token_from(token, data_dir)
    if not token:
        sys.exit("crier import: no token: give --token, set CRIER_TOKEN, or run `crier dev` (it writes .crier/dev-token)")
    sys.exit(import_file(path, api=api, token=token, list_name=list_name, format=format))
