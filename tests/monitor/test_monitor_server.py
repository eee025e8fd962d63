"""The HTTP server for real (uvicorn on 127.0.0.1) over a real history and checkpoint store, without a swarm."""

import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.aggregate import PeerProgress, aggregate
from monitor.checkpoint import CheckpointStore
from monitor.checkpoint_cli import CheckpointError, download
from monitor.history import History
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.server import ServerThread, create_app
from peer.swarm.run_key import RunKey
from tests.harness import REPO
from tests.monitor.conftest import CHROMIUM, chromium

TOKEN = "s3cret-admin-token-0123"


def fill(directory):
    (directory / "model.safetensors").write_bytes(b"\x00" * 2048)
    (directory / "config.json").write_text('{"model_type": "lean_albert"}')


def populated(history: History) -> LiveState:
    snapshot = None
    for step in range(6):
        reports = [
            PeerProgress(
                f"peer-{name}",
                epoch=step,
                samples_per_second=10.0 + i,
                samples_accumulated=32,
                loss_sum=(8.0 - step) * 4,
                mini_steps=4,
                time=1000.0 + step,
                device="cpu",
            )
            for i, name in enumerate("ab")
        ]
        snapshot = aggregate(reports, now=1000.0 + step, **({"previous": snapshot} if snapshot else {}))
        history.record(snapshot)
    live = LiveState(run_id="unit-run", initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmTest"], model={"name": "tiny"})
    live.update(snapshot, invalid=1, refused={"key-x": "model fingerprint differs"})
    return live


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    history = History(root / "history.sqlite")
    run_key = RunKey.load_or_create(root / "run_key.pem")
    store = CheckpointStore(root / "checkpoints", history, keep=5, run_key=run_key)
    live = populated(history)
    for epoch in (2, 4):
        store.write(epoch, fill, loss=3.0, samples_total=epoch * 64)
    made = []

    def request_checkpoint():
        made.append(store.write(5, fill, loss=2.0, samples_total=320))
        return made[-1]

    app = create_app(live, history, store, make_registry(live, store), TOKEN, request_checkpoint)
    thread = ServerThread(app, "127.0.0.1", 0)
    thread.start()
    thread.url, thread.store, thread.root, thread.made = f"http://127.0.0.1:{thread.port}", store, root, made
    thread.fingerprint = run_key.fingerprint
    yield thread
    thread.stop()
    history.close()


def get(url, method="GET", headers=None):
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def get_json(url):
    status, _, body = get(url)
    assert status == 200, body
    return json.loads(body)


def test_status_peers_history_and_health(server):
    status = get_json(server.url + "/api/status")
    assert status["run_id"] == "unit-run" and status["epoch"] == 5 and status["alive_peers"] == 2
    assert status["samples_total"] == 6 * 2 * 32 and status["loss"] == pytest.approx(3.0)
    assert status["samples_per_second"] == 21.0 and status["initial_peers_string"] == "/ip4/127.0.0.1/tcp/1/p2p/QmTest"
    assert status["refused_peers"] == {"key-x": "model fingerprint differs"}
    assert [row["peer_id"] for row in get_json(server.url + "/api/peers")] == ["peer-a", "peer-b"]
    history = get_json(server.url + "/api/history")
    assert len(history["series"]) == 6 and [row["epoch"] for row in history["epochs"]] == [0, 1, 2, 3, 4, 5]
    assert get_json(server.url + "/healthz")["status"] == "ok"
    assert "/api/checkpoints" in get_json(server.url + "/openapi.json")["paths"]


def test_metrics_parse_with_prometheus_parser(server):
    status, headers, body = get(server.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if not s.labels
    }
    assert samples["albert_swarm_alive_peers"] == 2 and samples["albert_swarm_epoch"] == 5
    assert samples["albert_swarm_samples_total"] == 384 and samples["albert_monitor_invalid_records_total"] == 1
    assert samples["albert_swarm_checkpoint_epoch"] >= 4 and samples["albert_swarm_checkpoint_age_seconds"] >= 0


def test_checkpoint_download_carries_sha256_and_cli_verifies(server, tmp_path):
    listing = get_json(server.url + "/api/checkpoints")
    assert [c["epoch"] for c in listing][:2] in ([4, 2], [5, 4])
    status, headers, body = get(server.url + "/checkpoints/4")
    assert status == 200 and headers["X-Checkpoint-SHA256"] == hashlib.sha256(body).hexdigest()
    assert headers["X-Checkpoint-SHA256"] == next(c["sha256"] for c in listing if c["epoch"] == 4)
    assert next(c["url"] for c in listing if c["epoch"] == 4).endswith("/checkpoints/4")
    manifest = download(server.url, tmp_path / "got", epoch=4, run_key=server.fingerprint)
    assert manifest["epoch"] == 4 and (tmp_path / "got" / "model.safetensors").stat().st_size == 2048
    assert manifest["run_key"] == RunKey.load_or_create(server.root / "run_key.pem").public_hex
    with pytest.raises(CheckpointError, match="not empty"):
        download(server.url, tmp_path / "got", epoch=4, run_key=server.fingerprint)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitor.checkpoint_cli",
            "download",
            "--from",
            server.url,
            "--run-key",
            server.fingerprint.upper(),  # as a user may paste it
            "--out",
            str(tmp_path / "cli"),
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "files verified" in result.stdout


@pytest.mark.parametrize(
    "path",
    [
        "/checkpoints/..%2F..%2Fetc%2Fpasswd",
        "/checkpoints/-1",
        "/checkpoints/99",
        "/static/..%2Fserver.py",
        "/checkpoints/4%2F..%2F..%2Fhistory.sqlite",
    ],
)
def test_paths_never_escape_the_checkpoint_dir(server, path):
    status, _, body = get(server.url + path)
    assert status in (404, 422) and b"import" not in body and b"SQLite" not in body


def test_checkpoint_on_demand_needs_the_admin_token(server):
    assert get(server.url + "/api/checkpoints", "POST")[0] == 401
    assert get(server.url + "/api/checkpoints", "POST", {"Authorization": "Bearer wrong"})[0] == 401
    assert not server.made
    status, _, body = get(server.url + "/api/checkpoints", "POST", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 201 and json.loads(body)["epoch"] == 5 and len(server.made) == 1


def test_truncated_checkpoint_is_not_served_over_http(server, tmp_path):
    server.store.write(7, fill)
    target = server.root / "checkpoints" / "epoch-000007" / "model.safetensors"
    with open(target, "r+b") as file:
        file.truncate(100)
    assert get(server.url + "/checkpoints/7")[0] == 404
    assert 7 not in [c["epoch"] for c in get_json(server.url + "/api/checkpoints")]
    assert get(server.url + "/checkpoints/latest")[1]["X-Checkpoint-Epoch"] != "7"
    with pytest.raises(CheckpointError, match="404"):
        download(server.url, tmp_path / "bad", epoch=7, run_key=server.fingerprint)
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(get(server.url + "/metrics")[2].decode())
        for s in family.samples
    }
    assert samples["albert_monitor_corrupted_checkpoints_total"] >= 1


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package 'chromium' is not installed (apt-get install chromium)")
@pytest.mark.timeout(240)
def test_dashboard_renders_charts_and_tables_in_headless_chromium(server, tmp_path):
    dom = chromium(server.url + "/", tmp_path, "--dump-dom")
    assert 'id="run-id">unit-run<' in dom and 'id="stat-peers">2<' in dom and 'class="badge ok"' in dom
    assert 'value="/ip4/127.0.0.1/tcp/1/p2p/QmTest"' in dom
    for chart in ("loss", "speed", "peers"):
        for axis in ("time", "epoch"):
            drawn = re.search(rf'id="chart-{chart}-{axis}"><svg[^>]*data-points="(\d+)"', dom)
            assert drawn and int(drawn.group(1)) == 6, f"chart {chart} over {axis} not drawn"
    assert dom.count('class="series"') >= 6
    peers_table = dom.split('id="peers-table"')[1].split("</table>")[0]
    assert peers_table.count("<tr") == 3 and "peer-a" in peers_table and "peer-b" in peers_table
    checkpoints_table = dom.split('id="checkpoints-table"')[1].split("</table>")[0]
    assert 'href="/checkpoints/4"' in checkpoints_table
    screenshot = tmp_path / "dashboard.png"
    chromium(server.url + "/", tmp_path, f"--screenshot={screenshot}")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def test_healthz_answers_503_with_the_age_when_refreshes_stop(tmp_path):
    history = History(tmp_path / "history.sqlite")
    store = CheckpointStore(tmp_path / "checkpoints", history, keep=1)
    live = LiveState(run_id="health-run")
    app = create_app(live, history, store, make_registry(live, store), refresh_period=0.2)
    thread = ServerThread(app, "127.0.0.1", 0)
    thread.start()
    url = f"http://127.0.0.1:{thread.port}/healthz"
    try:
        assert get_json(url)["status"] == "ok"  # just started: no refresh is due yet
        time.sleep(1.0)  # five refresh periods without one
        code, _, raw = get(url)
        body = json.loads(raw)
        assert code == 503, body
        assert body["status"] == "stale" and body["last_refresh_age_seconds"] >= 0.6
        live.update(aggregate([], now=1.0), invalid=0, refused={})  # a refresh: healthy again
        assert get_json(url)["status"] == "ok"
    finally:
        thread.stop()
        history.close()
