"""Joining by join string: the string's checksum, the manifest's signature, run-wide settings, tokenizer bytes.

The p2p tests run a real DHT serving a real ManifestServer and a real p2p daemon fetching from it; the crafted
manifests and files are what a server that is not the run's monitor (or a damaged copy) would send.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import sys

import hivemind
import pytest
from hivemind.p2p import P2P

from monitor.manifest_server import MAX_STREAMS, ManifestServer
from peer.config import PeerConfig
from peer.join import SettingContradicts, adopt_optim, fetch_tokenizer
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.flags import EnvArgumentParser, explicit_fields
from peer.swarm.join_string import JoinString, JoinStringError
from peer.swarm.manifest import ManifestError, build_manifest, canonical, sign_manifest, verify_manifest
from peer.swarm.manifest_protocol import HANDLER, MAX_NOTICE_CHARS, MAX_REQUEST_BYTES, ProtocolError, ask
from peer.swarm.run_key import RunKey
from tests.harness import child_env, free_port, run_cli

RUN = "join-test"
PEER_ID = "QmPdP1Z8yDsphdKjGdt8SAQoSk3zY7vzsxwxunPz5L1JdC"
MAADDR = f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}"
JOIN = JoinString(RUN, "ab" * 32, (MAADDR, MAADDR.replace("31337", "31338")))


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> RunKey:
    return RunKey.load_or_create(tmp_path_factory.mktemp("key") / "run_key.pem")


@pytest.fixture
def tokenizer_dir(tmp_path):
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    (directory / "tokenizer.json").write_text('{"model": "pretend"}')
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def manifest_of(tokenizer_dir, **optim) -> dict:
    return build_manifest(RUN, OptimConfig(**optim), "tiny", None, "0" * 16, tokenizer_dir, None)


def test_a_join_string_round_trips_as_pasted():
    text = JOIN.encode()
    assert text.startswith("albert1.") and " " not in text
    assert JoinString.decode(f"  '{text}'\n") == JOIN


def test_every_single_character_typo_is_a_damaged_string():
    text = JOIN.encode()
    for position in range(len("albert1."), len(text)):
        if text[position] == ".":
            continue
        typo = text[:position] + ("A" if text[position] != "A" else "B") + text[position + 1 :]
        with pytest.raises(JoinStringError, match="damaged"):
            JoinString.decode(typo)
    with pytest.raises(JoinStringError, match="damaged"):
        JoinString.decode(text[:-20])  # cut short by a terminal


def test_another_format_or_version_says_so():
    with pytest.raises(JoinStringError, match="not a join string"):
        JoinString.decode(MAADDR)
    with pytest.raises(JoinStringError, match="format 'albert2'"):
        JoinString.decode(JOIN.encode().replace("albert1", "albert2", 1))


def crafted(run_id: str = RUN, peers: tuple = (MAADDR,)) -> str:
    """A join string anyone can write: the checksum is no signature, so its content is checked like a stranger's."""
    return JoinString(run_id, "ab" * 32, peers).encode()


@pytest.mark.parametrize(
    ("run_id", "peers", "problem"),
    [
        (RUN, ("/ip4/127.0.0.1/tcp/31337/p2p/0OIl-not-base58",), "is not a multiaddr with a valid peer id"),
        (RUN, ("/ip4/127.0.0.1/tcp/31337/p2p/QmShort",), "is not a multiaddr with a valid peer id"),
        (RUN, ("not a multiaddr/p2p/" + PEER_ID,), "is not a multiaddr with a valid peer id"),
        (RUN, ("/ip4/999.1.1.1/tcp/1/p2p/" + PEER_ID,), "is not a multiaddr with a valid peer id"),
        (RUN, ("/ip4/127.0.0.1/tcp/31337",), "names no peer id"),
        ("", (MAADDR,), "is not a run id"),
        ("a/b", (MAADDR,), "is not a run id"),
        ("run\x1b[2J", (MAADDR,), "is not a run id"),
        ("r" * 129, (MAADDR,), "is not a run id"),
    ],
)
def test_a_crafted_join_string_is_refused_naming_the_problem(run_id, peers, problem):
    with pytest.raises(JoinStringError, match=re.escape(problem)):
        JoinString.decode(crafted(run_id, peers))


def test_a_crafted_join_string_stops_the_peer_with_one_line(tmp_path):
    env = child_env({"HOME": str(tmp_path), "ALBERT_JOIN": crafted(peers=("/ip4/127.0.0.1/tcp/1/p2p/Qm0OIl",))})
    result = run_cli([sys.executable, "-m", "peer", "--backup_dir", str(tmp_path / "backups")], 120, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "is not a multiaddr with a valid peer id" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_a_signed_manifest_verifies_and_carries_every_optim_field(key, tokenizer_dir):
    manifest = manifest_of(tokenizer_dir, learning_rate=0.02)
    verified = verify_manifest(sign_manifest(manifest, key), key.fingerprint, RUN)
    assert verified == json.loads(canonical(manifest))
    assert set(verified["optim"]) == {field.name for field in dataclasses.fields(OptimConfig)}
    assert verified["optim"]["learning_rate"] == {"value": 0.02, "scope": "run-wide"}
    assert verified["optim"]["bandwidth"]["scope"] == "per-peer"
    assert (
        verified["tokenizer"]["files"]["tokenizer.json"]["sha256"]
        == hashlib.sha256(b'{"model": "pretend"}').hexdigest()
    )


def test_a_tampered_manifest_is_refused(key, tokenizer_dir):
    signed = json.loads(sign_manifest(manifest_of(tokenizer_dir, learning_rate=0.02), key))
    signed["manifest"]["optim"]["learning_rate"]["value"] = 0.5
    with pytest.raises(ManifestError, match="altered"):
        verify_manifest(canonical(signed), key.fingerprint, RUN)


def test_a_manifest_signed_by_another_key_is_refused(key, tokenizer_dir, tmp_path):
    impostor = RunKey.load_or_create(tmp_path / "other.pem")
    document = sign_manifest(manifest_of(tokenizer_dir), impostor)
    with pytest.raises(ManifestError, match=f"signed by run key {impostor.fingerprint[:16]}"):
        verify_manifest(document, key.fingerprint, RUN)


def test_a_manifest_of_another_run_or_an_unknown_mode_is_refused(key, tokenizer_dir):
    with pytest.raises(ManifestError, match="of run 'join-test', the join string names 'other'"):
        verify_manifest(sign_manifest(manifest_of(tokenizer_dir), key), key.fingerprint, "other")
    manifest = {**manifest_of(tokenizer_dir), "training_mode": "local-steps-v9"}
    with pytest.raises(ManifestError, match="mode 'local-steps-v9'"):
        verify_manifest(sign_manifest(manifest, key), key.fingerprint, RUN)


def test_explicit_fields_are_flags_and_variables_even_at_their_default_value():
    given = explicit_fields(
        SwarmConfig,
        OptimConfig,
        PeerConfig,
        args=["--learning-rate", str(OptimConfig.learning_rate), "--no_offload_optimizer", "--batch_size=4"],
        environ={"ALBERT_TARGET_BATCH_SIZE": "64", "ALBERT_JOIN": JOIN.encode()},
    )
    assert given == {"learning_rate", "offload_optimizer", "batch_size", "target_batch_size", "join"}


def test_a_contradicting_run_wide_setting_names_the_field_and_both_values(tokenizer_dir):
    manifest = json.loads(canonical(manifest_of(tokenizer_dir, learning_rate=0.02, bandwidth=1000.0)))
    with pytest.raises(SettingContradicts, match=r"--learning-rate 0.01 contradicts the run's learning_rate 0.02"):
        adopt_optim(OptimConfig(learning_rate=0.01), manifest, {"learning_rate"})
    adopted = adopt_optim(OptimConfig(learning_rate=0.02, bandwidth=5.0), manifest, {"learning_rate", "bandwidth"})
    assert (adopted.learning_rate, adopted.bandwidth) == (0.02, 5.0)  # agreeing is fine; bandwidth is this peer's
    manifest["optim"]["newer_setting"] = {"value": 1, "scope": "run-wide"}
    with pytest.raises(ManifestError, match="newer_setting, which this peer does not know"):
        adopt_optim(OptimConfig(), manifest, set())


def test_help_marks_run_wide_settings_only():
    text = EnvArgumentParser((SwarmConfig, OptimConfig, PeerConfig), environ={}).format_help()
    # without whitespace: argparse wraps lines, also at the hyphen of "run-wide"
    blocks = {block.split()[0]: "".join(block.split()) for block in text.split("\n  --")[1:]}
    for name in ("learning_rate", "target_batch_size", "model", "tokenizer", "run_id"):
        assert "[run-wide:--jointakesitfromtherun]" in blocks[name], name
    for name in ("bandwidth", "batch_size", "device", "backup_dir"):
        assert "run-wide" not in blocks[name], name


@pytest.fixture
def serving(tokenizer_dir, key):
    """A real DHT serving a manifest whose listing says tokenizer.json holds other bytes than the served ones."""
    manifest = manifest_of(tokenizer_dir)
    listed = dict(manifest["tokenizer"]["files"])
    listed["tokenizer.json"] = {"sha256": hashlib.sha256(b"what was signed").hexdigest(), "size": 20}
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    server = ManifestServer(dht, RUN, sign_manifest(manifest, key), tokenizer_dir, list(listed))
    yield dht, listed
    server.shutdown()
    dht.shutdown()


def fetch(dht: hivemind.DHT, work) -> object:
    async def run():
        p2p = await P2P.create(initial_peers=[str(maddr) for maddr in dht.get_visible_maddrs()])
        try:
            return await work(p2p, dht.peer_id)
        finally:
            await p2p.shutdown()

    return asyncio.run(run())


def test_a_tokenizer_file_whose_hash_differs_is_refused_and_nothing_is_kept(serving, tmp_path):
    dht, listed = serving
    target = tmp_path / "cache" / "tokenizer"
    with pytest.raises(ManifestError, match="tokenizer file tokenizer.json with sha256 .* the signed manifest says"):
        fetch(dht, lambda p2p, monitor: fetch_tokenizer(p2p, monitor, listed, target))
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_the_server_serves_listed_files_only_and_bounds_answers(serving):
    dht, _ = serving
    with pytest.raises(ProtocolError, match="unknown request"):
        fetch(dht, lambda p2p, monitor: ask(p2p, monitor, {"get": "tokenizer", "name": "../run_key.pem"}, 10**6))
    with pytest.raises(ProtocolError, match="at most 10 were asked for"):
        fetch(dht, lambda p2p, monitor: ask(p2p, monitor, {"get": "manifest"}, 10))


async def raw_exchange(p2p: P2P, monitor, data: bytes) -> bytes:
    """Send a stranger's bytes on the manifest protocol, as they are, and read whatever comes back until it closes."""
    _, reader, writer = await p2p.call_binary_stream_handler(monitor, HANDLER)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("sent", "answered"),
    [
        (b"x" * (MAX_REQUEST_BYTES + 100) + b"\n", b""),  # past the bound: closed unanswered
        (b"[" * 4000 + b"]" * 4000 + b"\n", b""),  # nested past the JSON parser's depth
        (b'"a string"\n', b""),  # JSON, not an object
        (b"\xff\xfe garbage\n", b""),
        (b'{"get": "tokenizer", "name": ["tokenizer.json"]}\n', b'{"error":"unknown request'),
    ],
    ids=["oversize", "nested", "not-an-object", "not-json", "unhashable-name"],
)
def test_a_strangers_malformed_request_is_dropped_and_the_server_serves_on(serving, key, sent, answered):
    dht, _ = serving

    async def exchange(p2p, monitor):
        return await raw_exchange(p2p, monitor, sent), await ask(p2p, monitor, {"get": "manifest"}, 10**6)

    reply, manifest = fetch(dht, exchange)
    assert reply.startswith(answered) and (answered or reply == b"")
    assert verify_manifest(manifest, key.fingerprint, RUN)  # the next request is served as ever


def test_silent_streams_hold_a_bounded_few_slots_and_a_refusal_flood_one_log_line(serving, key, caplog):
    """MAX_STREAMS streams opened and left silent: one more request is told "busy" at once; once they close, requests
    are served. A hundred refusal notices with terminal escapes: one printable line for the peer in the minute."""
    dht, _ = serving

    async def flood(p2p, monitor):
        silent = [await p2p.call_binary_stream_handler(monitor, HANDLER) for _ in range(MAX_STREAMS)]
        await asyncio.sleep(1.0)  # every one of them is being served (waiting for its request line)
        try:
            with pytest.raises(ProtocolError, match="busy: try again"):
                await ask(p2p, monitor, {"get": "manifest"}, 10**6)
        finally:
            for _, _, writer in silent:
                writer.close()
        await asyncio.sleep(1.0)
        manifest = await ask(p2p, monitor, {"get": "manifest"}, 10**6)
        for _ in range(100):
            await ask(p2p, monitor, {"refused": "\x1b[2J\x1b[31mfake CRITICAL line\n" + "x" * 10**3}, 10)
        return manifest

    with caplog.at_level("WARNING", logger="monitor.manifest_server"):
        assert verify_manifest(fetch(dht, flood), key.fingerprint, RUN)
    lines = [record.getMessage() for record in caplog.records if "refused to join run" in record.getMessage()]
    assert len(lines) == 1 and "\x1b" not in lines[0] and "\n" not in lines[0], lines
    assert len(lines[0]) < MAX_NOTICE_CHARS + 200


def test_a_join_string_whose_monitor_is_down_exits_3_naming_it(tmp_path):
    """Nothing listens at the string's address: one line that says what failed and what to check, no traceback."""
    down = JoinString(RUN, "ab" * 32, (f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER_ID}",)).encode()
    env = child_env({"HOME": str(tmp_path), "ALBERT_JOIN": down})
    result = run_cli([sys.executable, "-m", "peer", "--backup_dir", str(tmp_path / "backups")], 120, env=env)
    assert result.returncode == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "could not fetch the manifest of run 'join-test' from its monitor" in last and "is the monitor up" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "backups").exists()
