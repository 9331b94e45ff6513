"""A fake worker for router tests: the worker's public API shape, no model, scriptable failures.

It records what it received (path, headers, body) so tests can check that the router
forwards requests (multipart included) byte for byte, and it can be told to be slow, to
fail with a status, to be saturated (429 with Retry-After), or to hang: with `hung` set it
accepts connections and answers nothing, load polls included, as a SIGSTOPped process does.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeWorker:
    name: str
    pool: str = "p"
    delay_s: float = 0.0
    status: int = 200
    retry_after: str = "2"
    backlog_s: float = 0.0
    hung: bool = False
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, path: str = "/v1/images/generations") -> int:
        with self.lock:
            return sum(1 for s in self.seen if s.path == path)

    def app(self) -> FastAPI:
        app = FastAPI()

        def headers(rid: str) -> dict[str, str]:
            return {"X-Request-Id": rid, "X-Stepfleet-Backlog-Seconds": f"{self.backlog_s:.3f}",
                    "X-Stepfleet-Step-Units": "0"}

        async def while_hung() -> None:
            while self.hung:
                await asyncio.sleep(0.02)

        @app.get("/v1/load")
        async def load() -> dict:
            await while_hung()
            return {"ready": True, "pool": self.pool, "waiting": 0, "running": 0, "paused": 0,
                    "step_units": 0, "backlog_s": self.backlog_s, "max_batch": 4}

        @app.get("/readyz")
        async def readyz() -> dict:
            return {"status": "ready"}

        @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "DELETE", "PUT"])
        async def anything(request: Request, rest: str) -> JSONResponse:
            body = await request.body()
            rid = request.headers.get("x-request-id", "")
            with self.lock:
                self.seen.append(Seen(request.method, request.url.path, dict(request.headers), body))
            await while_hung()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.status == 429:
                return JSONResponse({"error": {"message": "queue full", "type": "rate_limit_error", "param": None,
                                               "code": "queue_full"}}, 429,
                                    headers={**headers(rid), "Retry-After": self.retry_after})
            if self.status >= 400:
                return JSONResponse({"error": {"message": f"{self.name} broken", "type": "server_error",
                                               "param": None, "code": "boom"}}, self.status, headers=headers(rid))
            out: dict = {"created": 0, "worker": self.name, "path": request.url.path,
                         "data": [{"b64_json": "AAAA"}]}
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form()
                out["form"] = {k: (v if isinstance(v, str) else {"filename": v.filename, "size": len(await v.read())})
                               for k, v in form.items()}
            return JSONResponse(out, headers=headers(rid))

        return app
