"""The monitor's suspects over real HTTP (uvicorn on 127.0.0.1): GET /api/suspects, the /metrics series, and the
dashboard's section, from the score records three honest reducers and one lying one signed."""

from __future__ import annotations

import json
import urllib.request

import pytest
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from monitor.checkpoint import CheckpointStore
from monitor.history import History
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.server import ServerThread, create_app
from monitor.suspicion import suspects
from peer.swarm.run_key import RunKey
from peer.swarm.scores import ScoreRecord

HONEST = "12D3KooWNij6fPTbCX4pNDvvw1JSkjP7W1i7RKj2pkLTmEbzWbaN"
ATTACKER = "12D3KooWD6w6FdD3XkD6zhRBv7ALQeKsiVZUBTQJSkW1Y4dfA3ZC"


def score_record(scores: dict[str, float]) -> ScoreRecord:
    return ScoreRecord(epoch=5, time=float(get_dht_time()), rounds=2, scores=scores)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("suspects")
    history = History(root / "history.sqlite")
    store = CheckpointStore(root / "checkpoints", history, keep=2, run_key=RunKey.load_or_create(root / "key.pem"))
    live = LiveState(run_id="suspects-run")
    records = [score_record({HONEST: 1.1, ATTACKER: 1500.0}) for _ in range(3)]
    records.append(score_record({HONEST: 1e6, ATTACKER: 0.0}))  # the attacker's own: framing, clearing itself
    live.suspects = tuple(suspects(records))
    thread = ServerThread(create_app(live, history, store, make_registry(live, store)), "127.0.0.1", 0)
    thread.start()
    thread.url = f"http://127.0.0.1:{thread.port}"
    yield thread
    thread.stop()
    history.close()


def get(server, path: str) -> bytes:
    with urllib.request.urlopen(server.url + path, timeout=10) as response:
        return response.read()


def test_api_lists_the_attacker_first_and_only_it_as_suspicious(server):
    rows = json.loads(get(server, "/api/suspects"))
    assert [(row["peer_id"], row["suspicious"], row["reporters"]) for row in rows] == [
        (ATTACKER, True, 4),
        (HONEST, False, 4),
    ]
    # the median over reporters: the attacker's own record neither clears it nor frames the honest peer
    assert rows[0]["suspicion"] == 1500.0 and rows[1]["suspicion"] == pytest.approx(1.1)


def test_metrics_count_and_label_the_suspects(server):
    families = {family.name: family for family in text_string_to_metric_families(get(server, "/metrics").decode())}
    assert families["albert_swarm_suspicious_peers"].samples[0].value == 1
    by_peer = {sample.labels["peer_id"]: sample.value for sample in families["albert_swarm_peer_suspicion"].samples}
    assert by_peer == {ATTACKER: 1500.0, HONEST: pytest.approx(1.1)}


def test_the_dashboard_has_a_suspects_section_fed_by_the_api(server):
    page = get(server, "/").decode()
    script = get(server, "/static/dashboard.js").decode()
    assert 'id="suspects-table"' in page and 'getJson("/api/suspects")' in script
