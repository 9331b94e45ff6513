"""The trust boundary between router and workers: a shared token, and the tenant it vouches for.

Workers used to take requests from anyone who could reach them, and templates had no owner,
so one API key's client could list, use and delete another's templates (issue 19). Now:

- the router authenticates to workers with a token both read from a file (in a cluster, a
  mounted Secret) or, when no file is named, the `STEPFLEET_WORKER_TOKEN` environment
  variable; a worker with a token answers 401 to any request without it, except the probes
  and scrapes that carry no credentials (`OPEN_PATHS`);
- the router names the tenant of each request (the one its API key maps to) in
  `X-Stepfleet-Tenant`, and drops that header from what clients send; a worker keeps what a
  tenant creates apart from other tenants (`edits.service`), trusting the header because only
  the router holds the token;
- the router chooses a new template's id (`X-Stepfleet-Template-Id`), so the template is
  registered on the id's rendezvous home, where later requests for it are sent.

Tokens are compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from stepfleet.serving.errors import APIError, error_response

TOKEN_ENV = "STEPFLEET_WORKER_TOKEN"
TENANT_HEADER = "x-stepfleet-tenant"
TEMPLATE_ID_HEADER = "x-stepfleet-template-id"
#: Paths a worker answers without the token: kubelet probes and Prometheus scrapes carry none,
#: and the API's schema is public.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
#: A tenant name: what an API keys file may give (and a header can carry).
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


class TokenError(ValueError):
    """The token file cannot be read or holds no token."""


def load_token(path: str | None) -> str | None:
    """The shared token: the file's content (stripped), else `$STEPFLEET_WORKER_TOKEN`, else None."""
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise TokenError(f"cannot read the worker token file {path}: {exc}") from None
        if not token:
            raise TokenError(f"the worker token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def bearer(token: str) -> tuple[str, str]:
    """The header the router sends with every request to a worker."""
    return ("authorization", f"Bearer {token}")


class WorkerAuthMiddleware:
    """Refuse (401, OpenAI's error shape) every request to a non-open path without the token.

    Pure ASGI, like `RequestIdMiddleware`: it never touches `receive`, so handlers still see
    a client's disconnect.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), b"")
        if not hmac.compare_digest(sent, self._expected):
            response = error_response(APIError(
                401, "this worker takes requests from its router only (missing or wrong worker token)",
                code="invalid_worker_token", headers={"WWW-Authenticate": "Bearer"}))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def tenant_of(value: str | None) -> str:
    """The tenant a request speaks for: its header's value, or "" (no tenant: an open router,
    or a client of the worker itself)."""
    return value if value and TENANT_PATTERN.fullmatch(value) else ""
