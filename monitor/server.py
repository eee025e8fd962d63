"""The monitor's HTTP server: dashboard, JSON API, Prometheus metrics and checkpoint downloads.

FastAPI on uvicorn rather than aiohttp (which is already installed): FastAPI validates path and query parameters
from type hints (an epoch is an int, so no path can escape the checkpoint directory) and publishes an OpenAPI schema
at /openapi.json that API clients and fuzzers (schemathesis) use directly.
"""

from __future__ import annotations

import hmac
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from monitor.access import AdmissionRefused, Authority
from monitor.checkpoint import CheckpointNotFound, CheckpointStore
from monitor.history import CheckpointEntry, History
from monitor.live import LiveState

STATIC_DIR = Path(__file__).with_name("static")
CheckpointRequest = Callable[[], CheckpointEntry]
# Error answers declared in the OpenAPI schema, so clients (and schemathesis' status-code check) know every status.
CHECKPOINT_ON_DEMAND_ERRORS = {
    401: {"description": "Missing or wrong admin token (send 'Authorization: Bearer TOKEN')"},
    403: {"description": "Checkpoints on demand are disabled: the monitor was started without --admin-token"},
    503: {"description": "No checkpoint could be made (no training state yet, or the request timed out)"},
}
HEALTH_ERRORS = {503: {"description": "The monitor has not refreshed for several refresh periods (stuck or failing)"}}
UNHEALTHY_REFRESH_PERIODS = 3  # refreshes missed before /healthz says 503: one slow DHT read is not unhealthy
DOWNLOAD_ERRORS = {404: {"description": "No verified checkpoint (of that epoch)"}}
JOIN_ERRORS = {
    403: {"description": "The join request is malformed or its credential is not valid"},
    404: {"description": "The run is open: peers join without a credential"},
}


def create_app(
    live: LiveState,
    history: History,
    store: CheckpointStore,
    registry: CollectorRegistry,
    admin_token: str | None = None,
    request_checkpoint: CheckpointRequest | None = None,
    authority: Authority | None = None,
    refresh_period: float | None = None,
    refresh_grace: float = 0.0,
) -> FastAPI:
    """Build the app; `request_checkpoint` (blocking, returns the new entry) backs POST /api/checkpoints.

    With an `authority` (a closed run), POST /api/join gives access tokens to peers that prove a credential.
    Given the `refresh_period` of the loop that updates `live`, /healthz answers 503 once the last successful
    refresh (or the start, before the first) is older than UNHEALTHY_REFRESH_PERIODS refresh periods plus
    `refresh_grace` (how long one refresh may rightly block); without one (no refresh loop), it always answers 200.
    """
    unhealthy_after = (
        math.inf if refresh_period is None else UNHEALTHY_REFRESH_PERIODS * refresh_period + refresh_grace
    )
    app = FastAPI(title="albert-swarm monitor", version="1", docs_url="/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "dashboard.html").read_text(), headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", responses=HEALTH_ERRORS)
    def healthz() -> JSONResponse:
        now = time.time()
        age = now - max(live.last_refresh, live.started_at)
        healthy = age <= unhealthy_after
        body = {
            "status": "ok" if healthy else "stale",
            "run_id": live.run_id,
            "uptime_seconds": now - live.started_at,
            "last_refresh": live.last_refresh,
            "last_refresh_age_seconds": age,
            "refresh_errors": live.refresh_errors,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/status")
    def status() -> dict:
        snap = live.snapshot
        entries = store.list()
        return {
            "run_id": live.run_id,
            "epoch": snap.epoch,
            "alive_peers": snap.alive_peers,
            "loss": snap.loss,
            "samples_per_second": snap.samples_per_second,
            "samples_total": snap.samples_total,
            "time": snap.time,
            "last_refresh": live.last_refresh,
            "state_epoch": live.state_epoch,
            "invalid_records_total": live.invalid_records_total,
            "invalid_records_by_reason": dict(live.invalid_by_reason),
            "refresh_errors": live.refresh_errors,
            "refused_records_total": live.refused_records_total,
            "refused_peers": live.refused_peers,
            "initial_peers": list(live.initial_peers),
            "initial_peers_string": live.initial_peers_string,
            "model": live.model,
            "latest_checkpoint": entries[0].epoch if entries else None,
            "admin_enabled": bool(admin_token and request_checkpoint),
            "closed_run": authority is not None,
        }

    @app.get("/api/history")
    def api_history(since: float = Query(0.0, ge=0.0), limit: int = Query(2000, ge=1, le=20000)) -> dict:
        return {"series": history.series(since=since, limit=limit), "epochs": history.by_epoch()}

    @app.get("/api/peers")
    def peers() -> list[dict]:
        return [asdict(row) for row in live.snapshot.peers]

    @app.get("/api/checkpoints")
    def checkpoints(request: Request) -> list[dict]:
        return [_describe(entry, request) for entry in store.list()]

    @app.post("/api/checkpoints", status_code=201, responses=CHECKPOINT_ON_DEMAND_ERRORS)
    def make_checkpoint(request: Request, authorization: str | None = Header(None)) -> dict:
        if not admin_token or request_checkpoint is None:
            raise HTTPException(403, "checkpoints on demand are disabled: start the monitor with --admin-token")
        offered = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(offered.encode(), admin_token.encode()):
            raise HTTPException(401, "missing or wrong admin token (send 'Authorization: Bearer TOKEN')")
        try:
            entry = request_checkpoint()
        except (RuntimeError, TimeoutError) as error:
            raise HTTPException(503, f"could not make a checkpoint: {error}") from error
        return _describe(entry, request)

    @app.post("/api/join", responses=JOIN_ERRORS)
    async def join(request: Request) -> dict:
        """A peer of a closed run asks for an access token; 403 with the reason if its credential is not valid."""
        if authority is None:
            raise HTTPException(404, "this run is open: peers join without --join-url or a credential")
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            raise HTTPException(403, f"a join request is a JSON object ({error})") from error
        try:
            return await run_in_threadpool(authority.join, body)  # RSA work: keep the event loop free
        except AdmissionRefused as error:
            raise HTTPException(403, str(error)) from error

    @app.get("/checkpoints/latest", response_class=FileResponse, responses=DOWNLOAD_ERRORS)
    def latest_checkpoint() -> FileResponse:
        return _download(store, None)

    @app.get("/checkpoints/{epoch}", response_class=FileResponse, responses=DOWNLOAD_ERRORS)
    def checkpoint(epoch: int) -> FileResponse:
        return _download(store, epoch)

    @app.exception_handler(CheckpointNotFound)
    def not_found(_: Request, error: CheckpointNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    return app


def _describe(entry: CheckpointEntry, request: Request) -> dict:
    return {
        "epoch": entry.epoch,
        "sha256": entry.archive_sha256,
        "size": entry.archive_size,
        "created_at": entry.created_at,
        "loss": entry.loss,
        "samples_total": entry.samples_total,
        "url": str(request.url_for("checkpoint", epoch=entry.epoch)),
    }


def _download(store: CheckpointStore, epoch: int | None) -> FileResponse:
    entry, archive = store.get(epoch)
    headers = {"X-Checkpoint-SHA256": entry.archive_sha256, "X-Checkpoint-Epoch": str(entry.epoch)}
    return FileResponse(archive, media_type="application/x-tar", filename=archive.name, headers=headers)


class ServerThread:
    """Runs uvicorn in a background thread so the main thread stays free for hivemind (which needs it).

    Args:
        app: the ASGI app.
        host: address to listen on.
        port: port to listen on (0 picks a free one; read `.port` after `start`).
    """

    def __init__(self, app: FastAPI, host: str, port: int):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="monitor-http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                config = self.server.config
                raise OSError(f"the HTTP server could not listen on {config.host}:{config.port} (port in use?)")
            time.sleep(0.05)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
