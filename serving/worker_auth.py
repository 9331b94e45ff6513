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

Rotation without downtime: the token file is re-read when it changes (a Secret volume's
update swaps a symlink; `TokenFile` notices by `stat`), and it may hold several tokens, one
per line: a process *sends* the first and *accepts* any. Rotating is then three Secret edits,
each waiting for the kubelet to propagate the last: `old⏎new` (everyone accepts new), `new⏎old`
(everyone sends new), `new`. No request is refused at any point (docs/reliability.md).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from collections.abc import Callable
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


log = logging.getLogger("stepfleet.auth")


class TokenError(ValueError):
    """The token file cannot be read or holds no token."""


def parse_tokens(text: str) -> tuple[str, ...]:
    """The tokens of a token file: one per non-blank line, stripped; the first is the one sent."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _read_tokens(path: str) -> tuple[str, ...]:
    try:
        tokens = parse_tokens(Path(path).read_text())
    except OSError as exc:
        raise TokenError(f"cannot read the worker token file {path}: {exc}") from None
    if not tokens:
        raise TokenError(f"the worker token file {path} is empty")
    return tokens


def load_token(path: str | None) -> str | None:
    """The token to send: the file's first token, else `$STEPFLEET_WORKER_TOKEN`, else None."""
    if path:
        return _read_tokens(path)[0]
    return os.environ.get(TOKEN_ENV, "").strip() or None


class TokenFile:
    """The shared token(s), re-read when the file changes (checked at most every `check_s`).

    A file that becomes unreadable or empty keeps the last good tokens (and logs): a Secret
    update in flight must not lock the router out of its workers. Without a file, the
    environment variable's token is fixed for the process's life.
    """

    def __init__(self, path: str | None, check_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.check_s = check_s
        self._clock = clock
        self._checked = clock()
        self._stat: tuple[int, int, int] | None = self._signature() if path else None
        if path:
            self._tokens = _read_tokens(path)
        else:
            env = os.environ.get(TOKEN_ENV, "").strip()
            self._tokens = (env,) if env else ()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]  # follows the Secret's symlinks
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self, force: bool = False) -> bool:
        """Re-read the file if it changed since the last look; True when the tokens changed."""
        if not self.path:
            return False
        now = self._clock()
        if not force and now - self._checked < self.check_s:
            return False
        self._checked = now
        signature = self._signature()
        if signature == self._stat:
            return False
        self._stat = signature
        try:
            tokens = _read_tokens(self.path)
        except TokenError as exc:
            log.error("keeping the current worker token(s): %s", exc)
            return False
        changed = tokens != self._tokens
        self._tokens = tokens
        if changed:
            log.info("worker token file %s changed: %d token(s) accepted", self.path, len(tokens))
        return changed

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    @property
    def send(self) -> str | None:
        """The token to send (the file's first)."""
        self.refresh()
        return self._tokens[0] if self._tokens else None

    def accepts(self, authorization: bytes) -> bool:
        """Whether an `Authorization` header carries one of the tokens (constant time for each)."""
        self.refresh()
        if self._matches(authorization):
            return True
        # The router may have seen a rotated file before this process's next look: look now.
        return self.refresh(force=True) and self._matches(authorization)

    def _matches(self, authorization: bytes) -> bool:
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(authorization, f"Bearer {token}".encode())
        return ok


def bearer(token: str) -> tuple[str, str]:
    """The header the router sends with every request to a worker."""
    return ("authorization", f"Bearer {token}")


class WorkerAuthMiddleware:
    """Refuse (401, OpenAI's error shape) every request to a non-open path without the token.

    Pure ASGI, like `RequestIdMiddleware`: it never touches `receive`, so handlers still see
    a client's disconnect.
    """

    def __init__(self, app: ASGIApp, tokens: TokenFile) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), b"")
        if not self.tokens.accepts(sent):
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
