"""What the worker's routes ask for, as `Annotated` dependencies.

Each answers for itself when it cannot be had, so a route's signature says what it needs
and its body never checks: `ReadyEngine` is 503 with `Retry-After` while the model loads or
after it failed to load (with the load error), `Templates` is 501 when the model cannot do
edits, `Submit*` submit as one request kind, `Tenant` is whom the request speaks for (the
router names it; `serving.worker_auth`).

All are `async def`: FastAPI runs a plain `def` dependency on its thread pool, a
round-trip this trivial work does not need.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request

from stepfleet.serving.contracts import RequestKind
from stepfleet.serving.engine import Engine
from stepfleet.serving.errors import APIError
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.http.submit import Submission
from stepfleet.serving.params import Limits
from stepfleet.serving.settings import WorkerSettings
from stepfleet.serving.worker_auth import tenant_of

if TYPE_CHECKING:
    from stepfleet.serving.edits.service import TemplateService

#: Seconds a client is asked to wait while the worker is not ready.
NOT_READY_RETRY_S = 5


async def worker_state(request: Request) -> WorkerState:
    return request.app.state.worker


State = Annotated[WorkerState, Depends(worker_state)]


async def worker_settings(state: State) -> WorkerSettings:
    return state.settings


Settings = Annotated[WorkerSettings, Depends(worker_settings)]


async def worker_limits(state: State) -> Limits:
    return state.limits


WorkerLimits = Annotated[Limits, Depends(worker_limits)]


async def ready_engine(state: State) -> Engine:
    if not state.ready.is_set() or state.engine is None:
        reason = state.load_error or "the model is still loading"
        raise APIError(503, f"worker not ready: {reason}", code="not_ready",
                       headers={"Retry-After": str(NOT_READY_RETRY_S)})
    return state.engine


ReadyEngine = Annotated[Engine, Depends(ready_engine)]


async def template_service(state: State, _: ReadyEngine) -> TemplateService:
    if state.templates is None:
        raise APIError(501, "this worker's model does not support edits", code="edits_unsupported")
    return state.templates


Templates = Annotated["TemplateService", Depends(template_service)]


async def request_tenant(
    x_stepfleet_tenant: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    return tenant_of(x_stepfleet_tenant)


#: The tenant the router named for this request ("" when none): what it may see and own.
Tenant = Annotated[str, Depends(request_tenant)]


def submission(kind: RequestKind) -> Callable[..., Awaitable[Submission]]:
    """A dependency that submits as `kind`.

    It also records `kind` on the request, so a body refused before the route runs (FastAPI
    validates bodies after resolving dependencies) is counted under it too
    (`WorkerState.count_invalid`).
    """

    async def submit_as(request: Request, state: State, engine: ReadyEngine) -> Submission:
        request.state.kind = kind
        return Submission(request, engine, state.metrics, kind)

    return submit_as


SubmitGeneration = Annotated[Submission, Depends(submission(RequestKind.GENERATION))]
SubmitEdit = Annotated[Submission, Depends(submission(RequestKind.EDIT))]
SubmitTemplate = Annotated[Submission, Depends(submission(RequestKind.TEMPLATE))]
