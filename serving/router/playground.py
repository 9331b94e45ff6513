"""The playground page the router serves at `/`: a prompt box, live partial images, the fleet.

Plain HTML, CSS and JavaScript shipped as package data (`serving/router/playground/`): no
build step, no third-party script, nothing fetched from outside the router. The page speaks
the public API as any client does: `POST /v1/images/generations` with `stream: true` (it
reads OpenAI's Server-Sent Events from the response body and draws each partial image as
it arrives) and `GET /v1/fleet` every two seconds for the fleet panel.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

#: The page's files.
STATIC_DIR = Path(__file__).with_name("playground")


def install_playground(app: FastAPI) -> None:
    """`GET /` (the page) and `/playground/*` (its script and style sheet)."""

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/playground", StaticFiles(directory=STATIC_DIR), name="playground")
