"""/v1/providers: the tenant's provider accounts (SMTP servers, null), their pacing; secrets are write-only."""
from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from api_service.auth import require_write
from api_service.idempotency import MAX_KEY_LENGTH
from api_service.openapi import problem_response
from api_service.problems import problem
from api_service.schemas.common import NO_NUL, Page
from api_service.schemas.providers import (
    Provider,
    ProviderCheck,
    ProviderCreate,
    ProviderPatch,
    check_endpoint,
    patched,
    to_response,
    validated,
)
from shared.broadcasts import view as broadcasts_view
from shared.channels import accounts as repo
from shared.channels.provider import ProviderUnavailable
from shared.channels.registry import build_provider
from shared.kernel.limits import MAX_OFFSET
from shared.platform.logging import get_logger

Limit = Annotated[int, QueryParameter(ge=1, le=500, description="page size")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]  # a bigint in SQL
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        max_length=MAX_KEY_LENGTH,
        description="a retried POST with the same key returns the provider the first one created",
    ),
]
NOT_FOUND = "provider not found"
log = get_logger(__name__)


class ProviderController(Controller):
    path = "/v1/providers"
    tags = ["providers"]

    @post("/", guards=[require_write], summary="Create a provider (kind smtp, twilio or null)")
    async def create(
        self, request: Request, state: State, data: JSONBody[ProviderCreate], idempotency_key: IdempotencyKey = None
    ) -> Provider:
        new = validated(data)
        await check_endpoint(new.kind, new.config,
                             allow_private_networks=state.services.settings.allow_private_networks)
        async with state.services.pool.acquire() as con:
            row = await repo.create(
                con,
                tenant_id=request.user.tenant_id,
                name=new.name,
                channel=new.channel,
                kind=new.kind,
                config=new.config,
                batch_size=new.batch_size,
                batch_delay_ms=new.batch_delay_ms,
                max_retries=new.max_retries,
                idempotency_key=idempotency_key,
                at=state.services.clock(),
            )
        return to_response(row)

    @get("/", summary="List providers")
    async def list_providers(
        self,
        request: Request,
        state: State,
        channel: Annotated[str | None, QueryParameter(
            description="only providers of this channel", max_length=32, pattern=NO_NUL)] = None,
        kind: Annotated[str | None, QueryParameter(
            description="only providers of this kind (smtp, null)", max_length=32, pattern=NO_NUL)] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> Page[Provider]:
        async with state.services.pool.acquire() as con:
            rows, total = await repo.page(con, request.user.tenant_id, limit, offset, channel=channel, kind=kind)
        return Page(items=[to_response(r) for r in rows], total=total, limit=limit, offset=offset)

    @get("/{provider_id:uuid}", summary="Get a provider")
    async def get_provider(self, request: Request, state: State, provider_id: FromPath[uuid.UUID]) -> Provider:
        async with state.services.pool.acquire() as con:
            row = await repo.get(con, request.user.tenant_id, provider_id)
        if row is None:
            raise problem(404, NOT_FOUND)
        return to_response(row)

    @patch("/{provider_id:uuid}", guards=[require_write], summary="Change some settings of a provider")
    async def edit(
        self, request: Request, state: State, provider_id: FromPath[uuid.UUID], data: JSONBody[ProviderPatch]
    ) -> Provider:
        tenant_id = request.user.tenant_id
        # Locked so two concurrent PATCHes of different fields both land (the config is merged, not replaced).
        async with state.services.pool.acquire() as con, con.transaction():
            row = await repo.get(con, tenant_id, provider_id, for_update=True)
            if row is None:
                raise problem(404, NOT_FOUND)
            changes = patched(row, data)
            if "config" in changes:
                await check_endpoint(row.kind, changes["config"],
                                     allow_private_networks=state.services.settings.allow_private_networks)
            if changes:
                row = await repo.update(con, tenant_id, provider_id, changes, at=state.services.clock())
        assert row is not None
        return to_response(row)

    @post("/{provider_id:uuid}/test", guards=[require_write], status_code=200,
          summary="Check the settings: connect, TLS and login, then hang up; nothing is sent")
    async def test_provider(self, request: Request, state: State, provider_id: FromPath[uuid.UUID]) -> ProviderCheck:
        async with state.services.pool.acquire() as con:
            row = await repo.get(con, request.user.tenant_id, provider_id)
        if row is None:
            raise problem(404, NOT_FOUND)
        provider = build_provider(row.kind, row.config,
                                  allow_private_networks=state.services.settings.allow_private_networks)
        try:
            await provider.open()
        except ProviderUnavailable as exc:
            # The details (the server's replies) stay here: the tenant is told the class only.
            log.info("provider test failed", provider_id=str(provider_id), failure=exc.failure, error=str(exc))
            return ProviderCheck(ok=False, failure=exc.failure)
        finally:
            await provider.close()
        return ProviderCheck(ok=True)

    @delete("/{provider_id:uuid}", guards=[require_write], summary="Delete a provider (not while a broadcast uses it)",
            responses={409: problem_response("broadcasts that are queued, sending or paused use it (`broadcasts`)")})
    async def delete_provider(self, request: Request, state: State, provider_id: FromPath[uuid.UUID]) -> None:
        tenant_id = request.user.tenant_id
        async with state.services.pool.acquire() as con, con.transaction():
            if await repo.get(con, tenant_id, provider_id, for_update=True) is None:
                raise problem(404, NOT_FOUND)
            # Running jobs load the provider for every batch: deleting it would strand them.
            active = await broadcasts_view.active_with_provider(con, tenant_id, provider_id)
            if active:
                raise problem(
                    409,
                    f"provider is in use by {len(active)} broadcast(s) that are queued, sending or paused",
                    "provider_in_use",
                    broadcasts=[str(b) for b in active],
                )
            await repo.delete(con, tenant_id, provider_id, at=state.services.clock())
