"""The composition root: builds the Litestar app and everything it uses from Settings."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from api_service.auth import auth_middleware
from api_service.idempotency import idempotency_middleware
from api_service.openapi import document
from api_service.problems import (
    ProblemRequest,
    exception_handlers,
    problem_details_plugin,
)
from api_service.ratelimit import rate_limited
from api_service.routes.broadcasts import BroadcastController
from api_service.routes.contacts import ContactController
from api_service.routes.dashboard import DashboardController
from api_service.routes.health import healthz, readyz
from api_service.routes.imports import ImportController
from api_service.routes.lists import ListController
from api_service.routes.media import MediaController, media_file, media_file_head
from api_service.routes.messages import MessageController
from api_service.routes.providers import ProviderController
from api_service.routes.receipts import take_receipts, verify_receipt_endpoint
from api_service.routes.segments import SegmentController
from api_service.routes.stats import StatsController
from api_service.routes.suppressions import SuppressionController
from api_service.routes.templates import TemplateController
from api_service.routes.tracking import click, click_head, pixel
from api_service.routes.unsubscribe import unsubscribe, unsubscribe_page
from api_service.services import Services
from shared.background import start_background_tasks, stop_background_tasks
from shared.platform import bus, db
from shared.platform.logging import get_logger
from shared.platform.settings import Settings

log = get_logger(__name__)
MAX_BODY = 32 * 1024 * 1024  # a 10,000-contact import fits; more is a 413


def create_app(settings: Settings) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await db.migrate(settings.database_url)
        pool = await db.create_pool(settings.database_url, max_size=settings.db_pool_size)
        nc = await bus.connect(settings.nats_url, name="crier-api")
        js = nc.jetstream()
        names = await bus.ensure_streams(js, settings)
        services = Services(settings=settings, pool=pool, nats=nc, js=js, names=names)
        app.state.services = services
        tasks = (start_background_tasks(settings, pool, nc, js, names, services.clock)
                 if settings.run_background else [])
        log.info("api ready", host=settings.api_host, port=settings.api_port)
        try:
            yield
        finally:
            await stop_background_tasks(tasks)
            await bus.close(nc)
            await pool.close()

    app = Litestar(
        route_handlers=[healthz, readyz, BroadcastController, ContactController, ListController, ProviderController, SegmentController,
                        SuppressionController, unsubscribe_page, unsubscribe, ImportController,
                        MediaController, media_file, media_file_head, TemplateController, MessageController,
                        click, click_head, pixel, StatsController, take_receipts, verify_receipt_endpoint, DashboardController],
        lifespan=[lifespan],
        # The failed-auth gate, auth, the rate limiter (it needs the token), then idempotency (keys are
        # per token; a 401, 403 or 429 is never stored)
        middleware=[*rate_limited(settings, auth_middleware()), idempotency_middleware()],
        plugins=[problem_details_plugin()],
        exception_handlers=exception_handlers,
        request_class=ProblemRequest,
        request_max_body_size=MAX_BODY,
        openapi_config=OpenAPIConfig(
            title="Crier",
            version="0.1.0",
            description="Broadcasts to whole audiences, every recipient tracked. Errors are RFC 9457 problem details.",
            path="/schema",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", description="API token")}
            ),
            security=[{"bearer": []}],
        ),
        debug=False,
    )
    document(app)  # the errors, headers and media types each route can answer
    return app
