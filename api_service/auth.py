"""Bearer-token authentication: every request carries a tenant and a scope."""
from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.base import DefineMiddleware

from shared.tenants import store as tenants
from shared.tenants.store import Principal

# /u/: unsubscribe links, whose signed code is the credential (api_service/routes/unsubscribe.py)
# /r/ and /o/: tracked links and the open pixel (api_service/routes/tracking.py), the code the same
# /v1/receipts/: providers' status callbacks, signed their way (api_service/routes/receipts.py)
PUBLIC_PATHS = ["/healthz", "/readyz", "/schema", "/u/", "/m/", "/r/", "/o/", "/v1/receipts/"]  # /m/: media the providers fetch


class BearerTokenMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        header = connection.headers.get("authorization")
        if not header:
            raise NotAuthorizedException("missing Authorization header", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise NotAuthorizedException(
                "malformed Authorization header: expected 'Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
            )
        pool = connection.app.state.services.pool
        async with pool.acquire() as con:
            principal = await tenants.authenticate(con, token)
        if principal is None:
            raise NotAuthorizedException(
                "invalid or revoked token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        return AuthenticationResult(user=principal, auth=token)


def auth_middleware() -> DefineMiddleware:
    return DefineMiddleware(BearerTokenMiddleware, exclude=PUBLIC_PATHS)


def require_write(connection: ASGIConnection[Any, Principal, Any, Any], _: BaseRouteHandler) -> None:
    """Guard for commands: a read token may look but not change anything."""
    if not connection.user.can_write:
        raise PermissionDeniedException("this token has the read scope; the request needs write")
