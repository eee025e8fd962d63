"""The monitor's HTTP API under fuzzing and hostile requests, served for real (uvicorn on 127.0.0.1).

schemathesis generates requests from the app's own /openapi.json (valid and invalid path, query, header values) and
checks that no answer is a 5xx and that answers conform to the schema, for an open and a closed run. Hand-written
cases try to escape the checkpoint directory, to create a checkpoint without the admin token, and send crafted bodies
(deep nesting, out-of-range numbers, non-UTF-8, oversized with and without Content-Length) to a closed run's join.
Behind the server: a real SQLite history and a real checkpoint store with real files.
"""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

REJECTED_STATUSES = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]

from monitor.access import Authority
from monitor.aggregate import PeerProgress, aggregate
from monitor.checkpoint import CheckpointStore
from monitor.history import History
from monitor.http_guard import MAX_BODY_BYTES
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.server import ServerThread, create_app
from peer.swarm.join_client import JoinCredential, http_access_token
from tests.monitor.crafted_bodies import CRAFTED_BODIES, JOIN

TOKEN = "fuzz-admin-token-0123456789"
FUZZ_EXAMPLES = 50  # per operation and mode: about 10 operations x 2 modes, well under a minute
SECRET = b"top secret: never served"  # planted next to and above the checkpoint dir


def fuzz_config(member_token: str | None = None) -> SchemathesisConfig:
    """Invalid join bodies may be generated over the size cap: 413 is a refusal too (schemathesis' default list of
    rejecting statuses omits it). With a member's token, schemathesis sends it as the schema's bearer scheme (and
    knows that a request without it is an invalid one)."""
    config = {"checks": {"negative_data_rejection": {"expected-statuses": [*REJECTED_STATUSES, "413"]}}}
    if member_token:
        config["auth"] = {"openapi": {"HTTPBearer": {"bearer": member_token.removeprefix("Bearer ")}}}
    return SchemathesisConfig.from_dict(config)


def fill(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"\x01" * 4096)
    (directory / "config.json").write_text('{"model_type": "lean_albert"}')


def serve(root: Path, authority: Authority | None = None):
    """A monitor's HTTP server over a real history (4 snapshots) and store (epochs 1 and 3), open or closed."""
    (root / "secret.txt").write_bytes(SECRET)
    history = History(root / "history.sqlite")
    store = CheckpointStore(root / "checkpoints", history, keep=10)
    (root / "checkpoints" / "secret.txt").write_bytes(SECRET)
    snapshot = None
    for step in range(4):
        report = PeerProgress(
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

    app = create_app(live, history, store, make_registry(live, store), TOKEN, request_checkpoint, authority)
    thread = ServerThread(app, "127.0.0.1", 0)
    thread.start()
    thread.url, thread.root, thread.made, thread.history = f"http://127.0.0.1:{thread.port}", root, made, history
    return thread


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    thread = serve(tmp_path_factory.mktemp("fuzz"))
    yield thread
    thread.stop()
    thread.history.close()


@pytest.fixture(scope="module")
def closed_server(tmp_path_factory):
    """A closed run's server (an authority admitting a run secret): the join endpoint and member checks are live."""
    root = tmp_path_factory.mktemp("fuzz-closed")
    (root / "run.secret").write_text("fuzz-run-secret-0123456789\n")
    thread = serve(root, Authority(root / "authority.key", 60.0, str(root / "run.secret")))
    yield thread
    thread.stop()
    thread.history.close()


def fuzz(operation, mode: GenerationMode, base_url: str) -> set[int]:
    """Send `max_examples` generated requests to one operation; any failed check fails the test. Returns the
    statuses seen."""
    statuses = set()

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
        statuses.add(case.call_and_validate(base_url=base_url).status_code)

    check()
    return statuses


@pytest.mark.timeout(180)
@pytest.mark.parametrize("run", ["open", "closed", "closed-member"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda mode: mode.value)
def test_api_never_answers_5xx_and_conforms_to_its_schema(request, run, mode):
    """Open; closed as a stranger sees it (401s); closed as a member sees it (its token gets past the checks)."""
    server = request.getfixturevalue("server" if run == "open" else "closed_server")
    token = None
    if run == "closed-member":
        token = http_access_token(server.url, JoinCredential(secret_file=str(server.root / "run.secret")))
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=fuzz_config(token))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [operation.label for operation in operations]
    fuzzed = {}
    for operation in operations:
        try:
            fuzzed[operation.label] = fuzz(operation, mode, server.url)
        except Unsatisfiable:  # nothing to make invalid (no parameters, or only a free-form header)
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert {"GET /checkpoints/{epoch}", "GET /api/history"} <= set(fuzzed)
    if mode is GenerationMode.POSITIVE:  # the members' pages: to a stranger 401 (none) or 403 (a made-up token)
        for label in ("GET /api/peers", "GET /api/history", "GET /checkpoints/latest"):
            assert fuzzed[label] <= {401, 403} if run == "closed" else fuzzed[label] == {200}, (label, fuzzed[label])


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


# --- crafted bodies, sent as an attacker would (raw HTTP) ------------------------------------------------------------


def raw_post(url: str, body: bytes, headers: dict | None = None, path: str = "/api/join") -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def assert_up(server) -> None:
    status, _, body = request(server.url + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


@pytest.mark.parametrize("name", list(CRAFTED_BODIES))
def test_crafted_join_bodies_get_a_4xx_naming_the_problem_and_the_monitor_stays_up(closed_server, name):
    body = CRAFTED_BODIES[name]
    assert len(body) <= MAX_BODY_BYTES, name
    status, answer = raw_post(closed_server.url, body, {"Content-Type": "application/json"})
    assert status in (400, 403), (name, status, answer)
    assert isinstance(answer["detail"], str) and answer["detail"], answer
    assert_up(closed_server)


def test_refusals_name_the_problem(closed_server):
    assert "nested too deeply" in raw_post(closed_server.url, CRAFTED_BODIES["nested arrays"])[1]["detail"]
    assert "not UTF-8" in raw_post(closed_server.url, CRAFTED_BODIES["non-UTF-8"])[1]["detail"]
    assert "NaN is not a JSON number" in raw_post(closed_server.url, CRAFTED_BODIES["NaN timestamp"])[1]["detail"]
    assert "JSON object, not list" in raw_post(closed_server.url, CRAFTED_BODIES["array"])[1]["detail"]
    for name in ("10**400 timestamp", "1e400 timestamp", "2**53+1 timestamp", "bool timestamp"):
        status, answer = raw_post(closed_server.url, CRAFTED_BODIES[name])
        assert status == 403 and "integer 'timestamp'" in answer["detail"], (name, answer)


def exchange(url: str, head: bytes, parts: list[bytes]) -> bytes:
    """Send a request head and then body parts over a raw socket; return what the server answered.

    The server may answer (and close) before all parts are sent: a refusal must not wait for the whole body.
    """
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head)
        try:
            for part in parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
        return answer


@pytest.mark.parametrize("path", ["/api/join", "/api/checkpoints"])
def test_oversized_bodies_get_413_before_they_are_read(closed_server, path):
    url, host = closed_server.url, closed_server.url.removeprefix("http://")
    # a declared length over the cap, with only a few bytes of it sent: answered at once
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    answer = exchange(url, (head + f"Content-Length: {10**12}\r\n\r\n").encode(), [b"{"])
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit of 65536" in answer, answer[:300]
    # no length (chunked), and the body never ends: refused once the cap is passed, without waiting for the end
    chunk = b"%x\r\n%s\r\n" % (4096, b" " * 4096)
    answer = exchange(url, (head + "Transfer-Encoding: chunked\r\n\r\n").encode(), [chunk] * 17)
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit" in answer, answer[:300]
    # just over the cap with a correct Content-Length, through an ordinary client
    status, answer = raw_post(url, b" " * (MAX_BODY_BYTES + 1), path=path)
    assert status == 413 and "over the limit" in answer["detail"]
    assert_up(closed_server)
    assert not closed_server.made  # nothing was written on the way


def test_a_body_just_under_the_cap_is_read_and_judged(closed_server):
    body = (JOIN + '"timestamp": 1, "pad": "' + "x" * (MAX_BODY_BYTES - 200) + '"}').encode()
    assert len(body) <= MAX_BODY_BYTES
    status, answer = raw_post(closed_server.url, body)
    assert status == 403 and "malformed public key" in answer["detail"]
