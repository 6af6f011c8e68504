"""The playground page (``GET /`` and ``/playground``) and its assets, served by the ingress.

One static page (``maas/static/playground.{html,js,css}``, shipped in the package) that builds its
tabs from ``GET /v1/models`` and calls the service's own routes from the browser: no CDN, no web
fonts, no request leaves the server's origin. The page needs no API key to load; its calls send the
key typed into it (``Authorization: Bearer``) when the server requires one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
#: Where the page's script and style live (open without an API key, like the page itself).
ASSETS_PATH = "/playground/assets"

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/playground")
async def playground() -> HTMLResponse:
    """The playground page (``no-cache``: a redeploy's page is seen at once)."""
    return HTMLResponse((STATIC / "playground.html").read_text(), headers={"Cache-Control": "no-cache"})


def mount(app) -> None:
    """Add the page's routes and its assets to ``app``."""
    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC), name="playground-assets")
