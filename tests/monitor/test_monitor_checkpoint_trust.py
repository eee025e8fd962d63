"""A lying checkpoint server: `albert-checkpoint download --run-key` refuses each attack in one line, runs no code.

A real HTTP server in a thread serves archives crafted as an attacker would (a tampered `configuration.py` behind a
self-consistent manifest, signed by another key or unsigned; links, `../`, a gzip bomb, a tar past --max-size ...)
with a matching sha256 header and listing. The real CLI runs as a subprocess against it: each is refused with one
line on stderr and exit code 1, nothing lands in --out, and the attacker's `configuration.py`, which writes a marker
file when imported, never runs. The manifest signature is also checked with stock openssl and sha256sum, as the
README tells a user without albert-swarm to do.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from monitor.checkpoint import CODE_FILES, MANIFEST, SIGNATURE, write_archive, write_manifest
from peer.swarm.run_key import RunKey
from tests.harness import REPO, child_env

MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('foreign code ran')\n"


class FakeMonitor:
    """Serves `/api/checkpoints` and `/checkpoints/<any>` with whatever archive bytes a test sets, like a monitor."""

    def __init__(self):
        self.archive, self.epoch, self.content_length, self.seen_headers = b"", 4, True, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake.seen_headers.append(dict(self.headers))
                sha256 = hashlib.sha256(fake.archive).hexdigest()
                if self.path == "/api/checkpoints":
                    entry = {"epoch": fake.epoch, "sha256": sha256, "size": len(fake.archive), "url": "/checkpoints/4"}
                    self._send(json.dumps([entry]).encode(), {"Content-Type": "application/json"})
                elif self.path.startswith("/checkpoints/"):  # the sha256 header matches: a self-consistent liar
                    self._send(fake.archive, {"X-Checkpoint-SHA256": sha256, "X-Checkpoint-Epoch": str(fake.epoch)})
                else:
                    self.send_error(404)

            def _send(self, body: bytes, headers: dict):
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                if fake.content_length:  # without it, HTTP/1.0 ends the body when the connection closes
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the downloader stopped reading (size limit)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve(self, archive: bytes, epoch: int = 4, content_length: bool = True) -> None:
        self.archive, self.epoch, self.content_length = archive, epoch, content_length


@pytest.fixture(scope="module")
def fake_monitor():
    fake = FakeMonitor()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return RunKey.load_or_create(root / "trusted.pem"), RunKey.load_or_create(root / "attacker.pem")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A real save_pretrained directory (weights, config.json with auto_map, the model code), made in a subprocess."""
    directory = tmp_path_factory.mktemp("saved") / "model"
    script = (
        "import sys; from model import LeanAlbertForMaskedLM, load_config\n"
        "config = load_config('tiny', vocab_size=64, pad_token_id=0, num_hidden_layers=1, hidden_size=32,"
        " intermediate_size=32, num_attention_heads=2, embedding_size=16)\n"
        "LeanAlbertForMaskedLM(config).save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(directory)], cwd=REPO, env=child_env(), check=True, timeout=120)
    return directory


def checkpoint(tmp_path: Path, saved_model: Path, key: RunKey | None, epoch: int = 4, edit=None) -> Path:
    """A checkpoint directory as the monitor writes it; `edit(directory)` changes it before the manifest is made."""
    directory = tmp_path / f"src-{len(list(tmp_path.glob('src-*')))}" / f"epoch-{epoch:06d}"
    shutil.copytree(saved_model, directory)
    (directory / "training_state.pt").write_bytes(b"\x00" * 128)
    if edit is not None:
        edit(directory)
    write_manifest(directory, key, epoch=epoch, created_at=0.0, run_id="trust-run")
    return directory


def archive_of(directory: Path) -> bytes:
    path = directory.parent / "archive.tar"
    write_archive(directory, path)
    return path.read_bytes()


def crafted_tar(directory_name: str, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir_info(directory_name))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def file_info(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def run_download(fake: FakeMonitor, out: Path, run_key: str, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monitor.checkpoint_cli", "download", "--from", fake.url, "--out", str(out)]
    return subprocess.run(
        [*command, "--run-key", run_key, *flags],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess, out: Path, *phrases: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and all(phrase in lines[0] for phrase in phrases), lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(".albert-checkpoint-*"))  # no half-unpacked scratch left next to --out


def tamper_code(marker: Path):
    def edit(directory: Path) -> None:
        original = (directory / "configuration.py").read_text()
        (directory / "configuration.py").write_text(MARKER_CODE.format(marker=str(marker)) + original)

    return edit


def test_genuine_checkpoint_downloads_and_loads(fake_monitor, keys, saved_model, tmp_path):
    trusted, _ = keys
    fake_monitor.serve(archive_of(checkpoint(tmp_path, saved_model, trusted)))
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory is fine
    result = run_download(fake_monitor, out, trusted.fingerprint)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", *CODE_FILES, "model.safetensors", "training_state.pt", MANIFEST, SIGNATURE]
    )
    assert all("Authorization" not in headers for headers in fake_monitor.seen_headers)  # an open run sends none


@pytest.mark.parametrize("signer", ["attacker", "unsigned"])
def test_self_consistent_foreign_code_is_refused_and_never_runs(fake_monitor, keys, saved_model, tmp_path, signer):
    trusted, attacker = keys
    marker = tmp_path / "marker"
    directory = checkpoint(tmp_path, saved_model, attacker if signer == "attacker" else None, edit=tamper_code(marker))
    fake_monitor.serve(archive_of(directory))
    out = tmp_path / "out"
    result = run_download(fake_monitor, out, trusted.fingerprint)
    expected = f"signed by run key {attacker.fingerprint}" if signer == "attacker" else "not signed"
    assert_refused(result, out, expected)
    assert not marker.exists()
    # the control: the same directory, loaded as a user would, does run the attacker's code
    load = "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)"
    subprocess.run(
        [sys.executable, "-c", load, str(directory)], env=child_env(), check=True, timeout=120, cwd=tmp_path
    )
    assert marker.read_text() == "foreign code ran"


def test_foreign_code_signed_by_the_trusted_key_is_refused_naming_both_versions(
    fake_monitor, keys, saved_model, tmp_path
):
    """A monitor whose disk was tampered with (it signs what it finds) or that runs other code: still no code runs."""
    trusted, _ = keys
    marker = tmp_path / "marker"
    fake_monitor.serve(archive_of(checkpoint(tmp_path, saved_model, trusted, edit=tamper_code(marker))))
    out = tmp_path / "out"
    assert_refused(run_download(fake_monitor, out, trusted.fingerprint), out, "model code (version", "(version")
    assert not marker.exists()


def _extra_code(directory: Path) -> None:
    (directory / "helpers.py").write_text("raise SystemExit('foreign code ran')\n")


def _foreign_auto_map(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "attacker/repo--modeling.Evil"  # transformers would fetch it from the Hub
    (directory / "config.json").write_text(json.dumps(config))


def _tokenizer_auto_map(directory: Path) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "tok.Evil"]}}))


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (_extra_code, "code file helpers.py"),
        (_foreign_auto_map, "'attacker/repo--modeling.Evil'"),
        (_tokenizer_auto_map, "auto_map in tokenizer_config.json names 'tok.Evil'"),
    ],
)
def test_signed_checkpoint_that_names_other_code_is_refused(fake_monitor, keys, saved_model, tmp_path, edit, phrase):
    trusted, _ = keys
    fake_monitor.serve(archive_of(checkpoint(tmp_path, saved_model, trusted, edit=edit)))
    out = tmp_path / "out"
    assert_refused(run_download(fake_monitor, out, trusted.fingerprint), out, phrase)


def test_file_outside_the_manifest_and_an_edited_file_are_refused(fake_monitor, keys, saved_model, tmp_path):
    trusted, _ = keys
    directory = checkpoint(tmp_path, saved_model, trusted)
    (directory / "notes.txt").write_text("not listed")
    fake_monitor.serve(archive_of(directory))
    out = tmp_path / "out"
    assert_refused(run_download(fake_monitor, out, trusted.fingerprint), out, "notes.txt", "does not list")
    (directory / "notes.txt").unlink()
    (directory / "training_state.pt").write_bytes(b"\x01" * 128)  # same size, other bytes
    fake_monitor.serve(archive_of(directory))
    assert_refused(run_download(fake_monitor, out, trusted.fingerprint), out, "training_state.pt", "sha256")


def test_an_older_signed_checkpoint_replayed_as_another_epoch_is_refused(fake_monitor, keys, saved_model, tmp_path):
    trusted, _ = keys
    fake_monitor.serve(archive_of(checkpoint(tmp_path, saved_model, trusted, epoch=4)), epoch=9)
    out = tmp_path / "out"
    assert_refused(run_download(fake_monitor, out, trusted.fingerprint, "--epoch", "9"), out, "epoch 9", "epoch 4")


def _symlink() -> bytes:
    info = tarfile.TarInfo("epoch-000004/config.json")
    info.type, info.linkname = tarfile.SYMTYPE, "../.."
    return crafted_tar("epoch-000004", [(info, None)])


def _hardlink() -> bytes:
    info = tarfile.TarInfo("epoch-000004/config.json")
    info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    return crafted_tar("epoch-000004", [(info, None)])


def _dot_dot() -> bytes:
    return crafted_tar("epoch-000004", [file_info("epoch-000004/../../escaped.txt", b"x")])


def _absolute() -> bytes:
    return crafted_tar("epoch-000004", [file_info("/tmp/albert-h3-absolute.txt", b"x")])


def _two_directories() -> bytes:
    return crafted_tar("epoch-000004", [file_info("other/config.json", b"{}")])


def _fifo() -> bytes:
    info = tarfile.TarInfo("epoch-000004/pipe")
    info.type = tarfile.FIFOTYPE
    return crafted_tar("epoch-000004", [(info, None)])


def _gzip_bomb() -> bytes:
    """200 MiB of zeros in a tar, gzipped to about 200 KB (what the issue's author sent)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as gz:
        header = tarfile.TarInfo("epoch-000004/model.safetensors")
        header.size = 200 << 20
        gz.write(crafted_tar("epoch-000004", [])[:-1024])  # the directory member, without the end-of-archive blocks
        gz.write(header.tobuf(format=tarfile.PAX_FORMAT))
        zeros = bytes(1 << 20)
        for _ in range(200):
            gz.write(zeros)
        gz.write(bytes(1024))
    return buffer.getvalue()


def _lying_header() -> bytes:
    """A member whose header claims 10 GiB, in an archive of a few KB (caught before any byte is written)."""
    info = tarfile.TarInfo("epoch-000004/model.safetensors")
    info.size = 10 << 30
    headers = _dir_info("epoch-000004").tobuf(format=tarfile.PAX_FORMAT) + info.tobuf(format=tarfile.PAX_FORMAT)
    return headers + b"w" * 512 + bytes(1024)


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (_symlink, "symbolic link"),
        (_hardlink, "hard link"),
        (_fifo, "special member"),
        (_dot_dot, "points outside"),
        (_absolute, "points outside"),
        (_two_directories, "one checkpoint directory"),
        (_gzip_bomb, "gzip-compressed"),
        (_lying_header, "not a readable tar: unexpected end of data"),
        (lambda: b"<html>not a tar</html>" * 40, "not a readable tar"),
    ],
    ids=["symlink", "hardlink", "fifo", "dot-dot", "absolute", "two-dirs", "gzip-bomb", "lying-header", "not-tar"],
)
def test_hostile_archives_are_refused_in_one_line(fake_monitor, keys, tmp_path, make, phrase):
    trusted, _ = keys
    fake_monitor.serve(make())
    out = tmp_path / "out"
    out.mkdir()  # an existing empty --out stays as it was
    assert_refused(run_download(fake_monitor, out, trusted.fingerprint), out, phrase)
    assert (
        out.is_dir() and not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/albert-h3-absolute.txt").exists()
    )


@pytest.mark.parametrize("content_length", [True, False], ids=["announced", "streamed"])
def test_download_stops_past_max_size(fake_monitor, keys, tmp_path, content_length):
    trusted, _ = keys
    bomb = crafted_tar("epoch-000004", [file_info("epoch-000004/model.safetensors", bytes(3 << 20))])
    fake_monitor.serve(bomb, content_length=content_length)
    out = tmp_path / "out"
    result = run_download(fake_monitor, out, trusted.fingerprint, "--max-size", "1M")
    assert_refused(result, out, "size limit of 1048576")


def test_run_key_is_required_and_checked(fake_monitor, keys, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monitor.checkpoint_cli", "download", "--from", fake_monitor.url]
    result = subprocess.run(
        [*command, "--out", str(out)], cwd=REPO, env=child_env(), capture_output=True, text=True, check=False
    )
    assert_refused(result, out, "--run-key is required", "the monitor prints `--run-key FINGERPRINT`")
    assert_refused(run_download(fake_monitor, out, "abc123"), out, "64 hex digits")


def test_closed_run_credential_is_sent_on_every_request(fake_monitor, keys, saved_model, tmp_path):
    """The fake monitor is no join endpoint: the CLI must fail to get a token, in one line, before any download."""
    trusted, _ = keys
    secret = tmp_path / "run.secret"
    secret.write_text("a-long-enough-run-secret-0123456789\n")
    fake_monitor.seen_headers.clear()
    out = tmp_path / "out"
    result = run_download(fake_monitor, out, trusted.fingerprint, "--run-secret-file", str(secret))
    assert_refused(result, out, "cannot get an access token")
    assert not any(headers for headers in fake_monitor.seen_headers)  # POST /api/join is not a GET


def test_authorization_header_reaches_every_request(fake_monitor, keys, saved_model, tmp_path):
    from monitor.checkpoint_cli import download

    trusted, _ = keys
    fake_monitor.serve(archive_of(checkpoint(tmp_path, saved_model, trusted)))
    fake_monitor.seen_headers.clear()
    manifest = download(fake_monitor.url, tmp_path / "out", run_key=trusted.fingerprint, authorization="Bearer T0K")
    assert manifest["epoch"] == 4 and len(fake_monitor.seen_headers) == 2
    assert all(headers.get("Authorization") == "Bearer T0K" for headers in fake_monitor.seen_headers)


@pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("openssl", "sha256sum", "xxd", "jq")),
    reason="needs openssl, sha256sum, xxd and jq on PATH",
)
def test_readme_verification_with_openssl_and_sha256sum(keys, saved_model, tmp_path):
    """The README's "Verify a checkpoint without albert-swarm" commands, run as written, accept and refuse."""
    trusted, attacker = keys
    directory = checkpoint(tmp_path, saved_model, trusted)
    readme = (REPO / "README.md").read_text()
    script = readme.split("<!-- verify-without-albert-swarm -->")[1].split("```bash")[1].split("```")[0]
    run = lambda: subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=directory,
        env={**child_env(), "FINGERPRINT": trusted.fingerprint},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    accepted = run()
    assert accepted.returncode == 0 and "Signature Verified Successfully" in accepted.stdout, accepted.stderr
    assert "model.safetensors: OK" in accepted.stdout
    manifest = (directory / MANIFEST).read_text()
    (directory / MANIFEST).write_text(manifest.replace('"epoch": 4', '"epoch": 5'))  # the trusted key, edited
    edited = run()
    assert edited.returncode != 0 and "Signature Verification Failure" in edited.stdout + edited.stderr
    (directory / MANIFEST).write_text(manifest)
    assert run().returncode == 0
    (directory / "training_state.pt").write_bytes(b"\x01" * 128)
    assert run().returncode != 0  # a file that differs from the signed manifest
    write_manifest(directory, attacker, epoch=4)  # self-consistent, but signed by another key
    assert run().returncode != 0


def test_pull_names_the_first_non_finite_tensor_of_a_downloaded_state():
    """The check `pull` runs on the state a peer served (end to end it would need a peer serving NaN: not here)."""
    from types import SimpleNamespace

    import torch

    from monitor.checkpoint_cli import non_finite_tensor

    network = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(network.parameters())
    network(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    keeper = SimpleNamespace(run_model=SimpleNamespace(model=network), averager=SimpleNamespace(optimizer=optimizer))
    assert non_finite_tensor(keeper) is None
    optimizer.state[network.bias]["exp_avg"][0] = float("inf")
    assert non_finite_tensor(keeper) == "optimizer state exp_avg of parameter 1"
    with torch.no_grad():
        network.weight[0, 0] = float("nan")
    assert non_finite_tensor(keeper) == "parameter weight"


def test_a_closed_runs_member_downloads_and_verifies_and_a_stranger_cannot(keys, saved_model, tmp_path):
    """A real closed monitor's HTTP server: without a credential the CLI is refused; with the run secret it
    gets a token from POST /api/join, downloads, and verifies the signed checkpoint against --run-key."""
    from monitor.access import Authority
    from monitor.checkpoint import CheckpointStore
    from monitor.history import History
    from monitor.live import LiveState
    from monitor.metrics import make_registry
    from monitor.server import ServerThread, create_app

    trusted, _ = keys
    secret = tmp_path / "run.secret"
    secret.write_text("a-long-enough-run-secret-0123456789\n")
    authority = Authority(tmp_path / "run" / "authority.key", 60.0, str(secret))
    history = History(tmp_path / "history.sqlite")
    store = CheckpointStore(tmp_path / "checkpoints", history, keep=2, run_key=trusted)

    def fill(directory: Path) -> None:
        shutil.copytree(saved_model, directory, dirs_exist_ok=True)
        (directory / "training_state.pt").write_bytes(b"\x00" * 128)

    store.write(4, fill, run_id="closed-run")
    live = LiveState(run_id="closed-run")
    server = ServerThread(
        create_app(live, history, store, make_registry(live, store), authority=authority), "127.0.0.1", 0
    )
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        command = [sys.executable, "-m", "monitor.checkpoint_cli", "download", "--from", url]
        command += ["--run-key", trusted.fingerprint]
        run = partial(subprocess.run, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
        stranger = run([*command, "--out", str(tmp_path / "stranger")], check=False)
        assert_refused(stranger, tmp_path / "stranger", "401")
        out = tmp_path / "member"
        member = run([*command, "--out", str(out), "--run-secret-file", str(secret)], check=False)
        assert member.returncode == 0, member.stderr
        assert "epoch 4" in member.stdout and (out / SIGNATURE).is_file() and (out / "model.safetensors").is_file()
    finally:
        server.stop()
        history.close()
