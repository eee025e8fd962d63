"""The monitor's HTTP API under fuzzing and hostile requests, served for real (uvicorn on 127.0.0.1).

schemathesis generates requests from the app's own /openapi.json (valid and invalid path, query, header values) and
checks that no answer is a 5xx and that answers conform to the schema. Hand-written cases try to escape the checkpoint
directory and to create a checkpoint without the admin token. Behind the server: a real SQLite history and a real
checkpoint store with real files.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from monitor.aggregate import PeerReport, aggregate
from monitor.checkpoint import CheckpointStore
from monitor.history import History
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.server import ServerThread, create_app

TOKEN = "fuzz-admin-token-0123456789"
FUZZ_EXAMPLES = 50  # per operation and mode: about 10 operations x 2 modes, well under a minute
SECRET = b"top secret: never served"  # planted next to and above the checkpoint dir


def fill(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"\x01" * 4096)
    (directory / "config.json").write_text('{"model_type": "lean_albert"}')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "secret.txt").write_bytes(SECRET)
    history = History(root / "history.sqlite")
    store = CheckpointStore(root / "checkpoints", history, keep=10)
    (root / "checkpoints" / "secret.txt").write_bytes(SECRET)
    snapshot = None
    for step in range(4):
        report = PeerReport(
            "peer-a",
            epoch=step,
            samples_per_second=10.0,
            samples_accumulated=32,
            loss_sum=12.0,
            mini_steps=4,
            time=1000.0 + step,
            device="cpu",
        )
        snapshot = aggregate([report], now=1000.0 + step, **({"previous": snapshot} if snapshot else {}))
        history.record(snapshot)
    live = LiveState(run_id="fuzz-run", initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmFuzz"], model={"name": "tiny"})
    live.update(snapshot, invalid=0, refused={})
    for epoch in (1, 3):
        store.write(epoch, fill, loss=3.0, samples_total=epoch * 32)
    made = []

    def request_checkpoint():
        made.append(store.write(100 + len(made), fill))
        return made[-1]

    thread = ServerThread(
        create_app(live, history, store, make_registry(live, store), TOKEN, request_checkpoint), "127.0.0.1", 0
    )
    thread.start()
    thread.url, thread.root, thread.made = f"http://127.0.0.1:{thread.port}", root, made
    yield thread
    thread.stop()
    history.close()


def fuzz(operation, mode: GenerationMode, base_url: str) -> None:
    """Send `max_examples` generated requests to one operation; any failed check fails the test."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,  # the same requests on every run: CI is never flaky because of a lucky draw
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        case.call_and_validate(base_url=base_url)

    check()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda mode: mode.value)
def test_api_never_answers_5xx_and_conforms_to_its_schema(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [operation.label for operation in operations]
    fuzzed = set()
    for operation in operations:
        try:
            fuzz(operation, mode, server.url)
            fuzzed.add(operation.label)
        except Unsatisfiable:  # nothing to make invalid (no parameters, or only a free-form header)
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert {"GET /checkpoints/{epoch}", "GET /api/history"} <= fuzzed


def request(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, Message, bytes]:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method=method, headers=headers or {}), timeout=30
        ) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


TRAVERSALS = [
    "/checkpoints/..%2F..%2Fetc%2Fpasswd",
    "/checkpoints/..%2Fsecret.txt",
    "/checkpoints/..%252F..%252Fsecret.txt",  # double-encoded
    "/checkpoints/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/checkpoints/..%5C..%5Csecret.txt",  # backslashes
    "/checkpoints/secret.txt",
    "/checkpoints/..",
    "/checkpoints/1%00.tar",
    "/checkpoints/1%2F..%2F..%2Fsecret.txt",
    "/checkpoints/-1",
    "/checkpoints/-99999999999999999999999999",
    "/checkpoints/99999999999999999999999999999999999999",
    "/checkpoints/1e400",
    "/checkpoints/0x1",
    "/checkpoints/1.0",
    "/checkpoints/%20",
    "/checkpoints/" + "9" * 5000,
    "/static/..%2F..%2Fsecret.txt",
    "/static/%2e%2e/%2e%2e/secret.txt",
    "/../../secret.txt",
    "/api/history?limit=99999999999999999999999&since=-1",
    "/api/history?since=nan",
    "/api/history?since=inf",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_paths_never_leave_the_checkpoint_dir_nor_answer_5xx(server, path):
    status, _, body = request(server.url + path)
    assert status in (200, 404, 414, 422), (status, body[:200])
    assert SECRET not in body and b"root:" not in body
    if status == 200 and path.startswith("/checkpoints/"):  # lax int parsing: "1.0" is epoch 1, a real archive
        assert body in {path.read_bytes() for path in (server.root / "checkpoints").glob("epoch-*.tar")}


def test_an_existing_epoch_is_served_and_equals_the_file_on_disk(server):
    status, headers, body = request(server.url + "/checkpoints/1")
    assert status == 200 and body == (server.root / "checkpoints" / "epoch-000001.tar").read_bytes()
    assert headers["X-Checkpoint-SHA256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": TOKEN[:-1]},
        {"Authorization": "Bearer " + TOKEN + "x"},
        {"Authorization": "Basic " + TOKEN},
        {"Authorization": "Bearer " + "\u00e9" * 40},
        {"Authorization": "Bearer " + "a" * 100_000},
    ],
)
def test_checkpoints_on_demand_need_the_admin_token_and_nothing_is_written_without_it(server, headers):
    before = sorted(path.name for path in (server.root / "checkpoints").iterdir())
    try:
        status, _, body = request(server.url + "/api/checkpoints", "POST", headers)
    except UnicodeEncodeError:  # urllib refuses a non-latin-1 header: send its utf-8 bytes as latin-1
        raw = {name: value.encode().decode("latin-1") for name, value in headers.items()}
        status, _, body = request(server.url + "/api/checkpoints", "POST", raw)
    assert status in (401, 431), body[:200]
    assert not server.made
    assert sorted(path.name for path in (server.root / "checkpoints").iterdir()) == before


def test_the_right_token_creates_exactly_one_checkpoint(server):
    status, _, body = request(server.url + "/api/checkpoints", "POST", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 201 and json.loads(body)["epoch"] == 100 and len(server.made) == 1
    assert (server.root / "checkpoints" / "epoch-000100.tar").is_file()
