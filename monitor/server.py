"""The monitor's HTTP server: dashboard, JSON API, Prometheus metrics and checkpoint downloads.

FastAPI on uvicorn rather than aiohttp (which is already installed): FastAPI validates path and query parameters
from type hints (an epoch is an int, so no path can escape the checkpoint directory) and publishes an OpenAPI schema
at /openapi.json that API clients and fuzzers (schemathesis) use directly.

A closed run (an `authority`) is closed over HTTP too: checkpoints, their listing, per-peer rows and history need a
member's access token; the dashboard, /healthz, the summary numbers of /api/status, swarm-level /metrics and the join
endpoint stay public.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from monitor.access import MAX_FIELD_CHARS, MAX_TIMESTAMP, AdmissionRefused, Authority
from monitor.checkpoint import CheckpointNotFound, CheckpointStore
from monitor.contributor_store import ContributorStore
from monitor.history import MAX_POINTS, CheckpointEntry, History
from monitor.http_guard import BodySizeLimit, MalformedBody, parse_json_object
from monitor.live import LiveState
from monitor.metrics import SwarmLevelView

STATIC_DIR = Path(__file__).with_name("static")
CheckpointRequest = Callable[[], CheckpointEntry]
# Error answers declared in the OpenAPI schema, so clients (and schemathesis' status-code check) know every status.
TOO_LARGE = {413: {"description": "The request body is over the size limit (monitor/http_guard.py)"}}
CHECKPOINT_ON_DEMAND_ERRORS = {
    401: {"description": "Missing or wrong admin token (send 'Authorization: Bearer TOKEN')"},
    403: {"description": "Checkpoints on demand are disabled: the monitor was started without --admin-token"},
    503: {"description": "No checkpoint could be made (no training state yet, or the request timed out)"},
    **TOO_LARGE,
}
CONTRIBUTOR_ERRORS = {404: {"description": "No contributor with that id (ids look like key-0123456789ab)"}}
PEER_ID_PATTERN = r"^key-[0-9a-f]{12}$"  # monitor/records.py peer_label: nothing else can name a contributor
HEALTH_ERRORS = {503: {"description": "The monitor has not refreshed for several refresh periods (stuck or failing)"}}
UNHEALTHY_REFRESH_PERIODS = 3  # refreshes missed before /healthz says 503: one slow DHT read is not unhealthy
DOWNLOAD_ERRORS = {404: {"description": "No verified checkpoint (of that epoch)"}}
# Bounds of /api/history's query values: SQLite takes integers up to 2**63 and a time this far is year 33658.
MAX_TIME, MAX_EPOCH = 1e12, 2**53
JOIN_ERRORS = {
    400: {"description": "The body is not a JSON object (not UTF-8, not JSON, nested too deeply, NaN/Infinity)"},
    403: {"description": "The join request is malformed or its credential is not valid"},
    404: {"description": "The run is open: peers join without a credential"},
    **TOO_LARGE,
}
# The join body as OpenAPI describes it (the handler parses it itself, so a malformed body gets a clear 400/403):
# clients and fuzzers learn its shape from /openapi.json.
JOIN_REQUEST = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["peer_id", "public_key", "timestamp"],
                "properties": {
                    "peer_id": {"type": "string", "maxLength": MAX_FIELD_CHARS, "description": "libp2p peer id"},
                    "public_key": {"type": "string", "maxLength": MAX_FIELD_CHARS, "description": "RSA key (ssh)"},
                    "timestamp": {"type": "integer", "minimum": -MAX_TIMESTAMP, "maximum": MAX_TIMESTAMP},
                    "hmac": {"type": "string", "maxLength": MAX_FIELD_CHARS, "description": "run secret proof"},
                    "join_key": {"type": "string", "maxLength": MAX_FIELD_CHARS, "description": "allowlisted key"},
                    "signature": {"type": "string", "maxLength": MAX_FIELD_CHARS, "description": "join key's proof"},
                },
            }
        }
    },
}
MEMBER_ERRORS = {  # declared in a closed run only
    401: {"description": "Closed run: members only; send 'Authorization: Bearer ACCESS_TOKEN' (see POST /api/join)"},
    403: {"description": "Closed run: the access token is not valid (expired, malformed or of another authority)"},
}
# declares the scheme in the OpenAPI schema; a missing or non-Bearer header is None here, answered 401 below
BEARER = HTTPBearer(auto_error=False, description="A closed run's access token (POST /api/join issues them)")
HOW_TO_JOIN = (
    "this run is closed: send a member's access token as 'Authorization: Bearer TOKEN'; get one with your run "
    "secret or join key from POST /api/join (peer.swarm.join_client.http_access_token, or albert-checkpoint download "
    "--run-secret-file / --join-key-file)"
)


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
    contributors: ContributorStore | None = None,
) -> FastAPI:
    """Build the app; `request_checkpoint` (blocking, returns the new entry) backs POST /api/checkpoints.

    With an `authority` (a closed run), POST /api/join gives access tokens to peers that prove a credential.
    Given the `refresh_period` of the loop that updates `live`, /healthz answers 503 once the last successful
    refresh (or the start, before the first) is older than UNHEALTHY_REFRESH_PERIODS refresh periods plus
    `refresh_grace` (how long one refresh may rightly block); without one (no refresh loop), it always answers 200.
    With `contributors`, /api/contributors serves the contributors table (members only in a closed run, like
    /api/peers) and /contributor?id=... a page of one contributor's history.
    """
    unhealthy_after = (
        math.inf if refresh_period is None else UNHEALTHY_REFRESH_PERIODS * refresh_period + refresh_grace
    )
    app = FastAPI(title="albert-swarm monitor", version="1", docs_url="/docs", redoc_url=None)
    app.add_middleware(BodySizeLimit)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    members = [Depends(member_check(authority))] if authority else []  # nothing changes in an open run
    member_errors = MEMBER_ERRORS if authority else {}
    exposed = SwarmLevelView(registry) if authority else registry  # per-peer series are members' business

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "dashboard.html").read_text(), headers={"Cache-Control": "no-cache"})

    @app.get("/contributor", response_class=HTMLResponse, include_in_schema=False)
    def contributor_page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "contributor.html").read_text(), headers={"Cache-Control": "no-cache"})

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
        return Response(generate_latest(exposed), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/status")
    def status() -> dict:
        snap = live.snapshot
        entries = store.list()
        summary = {
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
            "join": live.join,
            "model": live.model,
            "training_mode": live.mode,
            "latest_checkpoint": entries[0].epoch if entries else None,
            "admin_enabled": bool(admin_token and request_checkpoint),
            "closed_run": authority is not None,
            "revoked_members": live.revoked_count,  # a count (who and why: /api/revocations, members only)
        }
        if authority is not None:
            del summary["refused_peers"]  # keyed by peers' public keys: per-peer, for members only
        return summary

    @app.get("/api/history", dependencies=members, responses=member_errors)
    def api_history(
        since: float = Query(0.0, ge=0.0, le=MAX_TIME, description="Only snapshots at or after this Unix time"),
        epochs_since: int = Query(0, ge=0, le=MAX_EPOCH, description="Only epochs from this one on"),
        limit: int = Query(500, ge=1, le=MAX_POINTS, description="At most this many points per list"),
    ) -> JSONResponse:
        """The run's time series and per-epoch list, each thinned evenly to `limit` points (first and last kept).

        The dashboard fetches the whole run once, then only what came since its newest point and epoch. Plain
        numbers from SQLite: answered as they are (FastAPI's encoder would walk them again, ~4x the query's time).
        """
        series = history.series(since=since, limit=limit)
        return JSONResponse({"series": series, "epochs": history.by_epoch(since=epochs_since, limit=limit)})

    @app.get("/api/peers", dependencies=members, responses=member_errors)
    def peers() -> list[dict]:
        return [asdict(row) for row in live.snapshot.peers]

    @app.get("/api/contributors", dependencies=members, responses=member_errors)
    def contributors_table() -> list[dict]:
        """Who contributed what: samples and compute time are each peer's signed lifetime claim (largest read). In a
        closed run, `suspicion` and `verdict` are the robust reducers' view of the member (null where unscored)."""
        rows = contributors.contributors() if contributors is not None else []
        verdicts = suspects_by_contributor()
        return [{**row, **verdicts.get(row["peer_id"], {"suspicion": None, "verdict": None})} for row in rows]

    def suspect_rows() -> list[dict]:
        revoked = {decision.peer_id: decision for decision in live.revocations}
        rows = [{**suspect.as_dict(), "revoked": suspect.peer_id in revoked} for suspect in live.suspects]
        scored = {suspect.peer_id for suspect in live.suspects}
        for peer_id, decision in revoked.items():
            if peer_id not in scored:
                row = {"peer_id": peer_id, "suspicion": decision.suspicion, "reporters": decision.reporters}
                rows.append({**row, "suspicious": True, "revoked": True})
        contributor_of = live.contributor_of_peer
        return [{**row, "contributor": contributor_of.get(row["peer_id"])} for row in rows]

    def suspects_by_contributor() -> dict[str, dict]:
        verdicts = {}
        for row in suspect_rows():
            if row["contributor"] is not None:
                verdict = "revoked" if row["revoked"] else "suspicious" if row["suspicious"] else "ok"
                verdicts[row["contributor"]] = {"suspicion": row["suspicion"], "verdict": verdict}
        return verdicts

    @app.get("/api/contributors/{peer_id}", dependencies=members, responses={**CONTRIBUTOR_ERRORS, **member_errors})
    def contributor(peer_id: str = PathParam(..., pattern=PEER_ID_PATTERN)) -> dict:
        """One contributor's row and the history of its records (loss, samples/s, lifetime samples over time)."""
        found = contributors.history(peer_id) if contributors is not None else None
        if found is None:
            raise HTTPException(404, f"no contributor {peer_id}")
        return found

    @app.get("/api/suspects", dependencies=members, responses=member_errors)
    def api_suspects() -> list[dict]:
        """Senders scored by the robust reducers (--aggregation centered-clip), most suspicious first; in a closed
        run with --revoke-above, `revoked` says which were revoked, and revoked members no longer scored follow
        (their suspicion and reporters as at the decision). In a closed run, `contributor` is the member's row of
        the contributors table (null in an open run, where nothing ties a peer id to a signing key)."""
        return suspect_rows()

    @app.get("/api/revocations", dependencies=members, responses=member_errors)
    def api_revocations() -> list[dict]:
        """Closed runs: the members revoked for their scores (--revoke-above), newest first, with the evidence."""
        return [decision.as_dict() for decision in live.revocations]

    @app.get("/api/checkpoints", dependencies=members, responses=member_errors)
    def checkpoints(
        request: Request, limit: int = Query(100, ge=1, le=1000, description="The newest this many")
    ) -> list[dict]:
        # --keep-every keeps checkpoints for the life of the run: the answer (polled by the dashboard) stays bounded
        return [_describe(entry, request) for entry in store.list()[:limit]]

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

    @app.post("/api/join", responses=JOIN_ERRORS, openapi_extra={"requestBody": JOIN_REQUEST})
    async def join(request: Request) -> dict:
        """A peer of a closed run asks for an access token; 403 with the reason if its credential is not valid."""
        if authority is None:
            raise HTTPException(404, "this run is open: peers join without --join-url or a credential")
        try:
            body = parse_json_object(await request.body())  # BodySizeLimit bounds what this reads
        except MalformedBody as error:
            raise HTTPException(400, f"a join request is a JSON object: {error}") from error
        try:
            return await run_in_threadpool(authority.join, body)  # RSA work: keep the event loop free
        except AdmissionRefused as error:
            raise HTTPException(403, str(error)) from error

    @app.get(
        "/checkpoints/latest",
        response_class=FileResponse,
        dependencies=members,
        responses={**DOWNLOAD_ERRORS, **member_errors},
    )
    def latest_checkpoint() -> FileResponse:
        return _download(store, None)

    @app.get(
        "/checkpoints/{epoch}",
        response_class=FileResponse,
        dependencies=members,
        responses={**DOWNLOAD_ERRORS, **member_errors},
    )
    def checkpoint(epoch: int) -> FileResponse:
        return _download(store, epoch)

    @app.exception_handler(CheckpointNotFound)
    def not_found(_: Request, error: CheckpointNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    return app


def member_check(authority: Authority):
    """A dependency that lets members of a closed run through: 401 without a credential, 403 with a bad one."""

    def require_member(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if credentials is None:
            raise HTTPException(401, HOW_TO_JOIN, headers={"WWW-Authenticate": 'Bearer realm="albert-swarm"'})
        try:
            authority.check_member(credentials.credentials)
        except AdmissionRefused as error:
            raise HTTPException(403, f"{error}: get a new one from POST /api/join") from error

    return require_member


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
