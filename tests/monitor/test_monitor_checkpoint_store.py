"""Checkpoint store on a real file system: atomic writes, manifests, archives, retention, damage detection, restart."""

import json
import tarfile

import pytest

from monitor.checkpoint import (
    MANIFEST,
    SIGNATURE,
    CheckpointNotFound,
    CheckpointStore,
    epochs_to_keep,
    sha256_file,
    signature_problem,
    verify_directory,
)
from monitor.history import History
from monitor.state import NonFiniteState
from peer.swarm.run_key import RunKey, verify_signature
from peer.swarm.run_record import PROTOCOL_VERSION


def fill_with(payload: bytes):
    def fill(directory):
        (directory / "model.safetensors").write_bytes(payload)
        (directory / "tokenizer").mkdir()
        (directory / "tokenizer" / "tokenizer.json").write_text('{"vocab": 1}')

    return fill


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(tmp_path / "ckpt", History(tmp_path / "h.sqlite"), keep=2, keep_every=10)


def test_write_produces_verified_directory_archive_and_manifest(store):
    entry = store.write(4, fill_with(b"w" * 1000), loss=2.5, samples_total=640)
    directory = store.directory(entry)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["epoch"] == 4 and manifest["loss"] == 2.5 and manifest["samples_total"] == 640
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(directory / "model.safetensors")
    assert set(manifest["files"]) == {"model.safetensors", "tokenizer/tokenizer.json"}
    listed, archive = store.get()
    assert listed == entry and sha256_file(archive) == entry.archive_sha256
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [
            "epoch-000004/manifest.json",
            "epoch-000004/model.safetensors",
            "epoch-000004/tokenizer",
            "epoch-000004/tokenizer/tokenizer.json",
        ]
    assert not list(store.root.glob(".tmp-*"))


def test_failed_write_leaves_nothing_behind(store):
    def broken(directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.write(3, broken)
    assert list(store.root.iterdir()) == [] and store.list() == []


def test_retention_keeps_newest_and_every_kth():
    assert epochs_to_keep([1, 2, 10, 11, 12, 20, 21], keep=2, keep_every=10) == {10, 20, 21}
    assert epochs_to_keep([5, 6, 7], keep=5, keep_every=0) == {5, 6, 7}


def test_store_prunes_after_each_write(store):
    for epoch in (9, 10, 11, 12, 13):
        store.write(epoch, fill_with(bytes([epoch]) * 10))
    assert [entry.epoch for entry in store.list()] == [13, 12, 10]
    assert sorted(path.name for path in store.root.iterdir()) == [
        "epoch-000010",
        "epoch-000010.tar",
        "epoch-000012",
        "epoch-000012.tar",
        "epoch-000013",
        "epoch-000013.tar",
    ]


def test_retention_always_keeps_the_newest_good_epoch():
    assert epochs_to_keep([4, 8, 9], keep=2, keep_every=0, newest_good=4) == {4, 8, 9}
    assert epochs_to_keep([4, 8, 9], keep=0, keep_every=0, newest_good=4) == {4}


def truncate(path):
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def test_damaged_newer_checkpoints_never_push_out_the_newest_good_one(store):
    """A run restarted from epoch 5 while the checkpoints of epochs 8 and 9 are damaged: with keep=2 those two were
    "the newest two", and the checkpoint just written (the only good one) was deleted at once."""
    for epoch in (8, 9):
        truncate(store.directory(store.write(epoch, fill_with(b"d" * 4096))) / "model.safetensors")
    store.write(5, fill_with(b"g" * 4096))
    assert [entry.epoch for entry in store.list()] == [5]
    assert store.get()[0].epoch == 5
    store.write(6, fill_with(b"h" * 4096))  # a newer good one: 5 is no longer needed
    assert [entry.epoch for entry in store.list()] == [6]
    assert not (store.root / "epoch-000005").exists()


def test_refused_write_keeps_every_good_checkpoint(tmp_path):
    """A state refused at write time (e.g. non-finite, monitor/state.py) writes nothing and prunes nothing."""
    store = CheckpointStore(tmp_path / "ckpt", History(tmp_path / "h.sqlite"), keep=1)
    store.write(3, fill_with(b"g" * 100))

    def refused(directory):
        raise NonFiniteState("not writing a checkpoint of epoch 4: the model parameters hold NaN or infinite values")

    for epoch in (4, 5, 6):
        with pytest.raises(NonFiniteState):
            store.write(epoch, refused)
    assert [entry.epoch for entry in store.list()] == [3]
    assert sorted(path.name for path in store.root.iterdir()) == ["epoch-000003", "epoch-000003.tar"]


@pytest.mark.parametrize("damaged", ["model.safetensors", "archive", "manifest.json"])
def test_truncated_file_is_detected_and_never_listed_or_served(store, damaged):
    store.write(1, fill_with(b"a" * 4096))
    entry = store.write(2, fill_with(b"b" * 4096))
    target = store.root / "epoch-000002.tar" if damaged == "archive" else store.directory(entry) / damaged
    with open(target, "r+b") as file:
        file.truncate(target.stat().st_size // 2)
    assert [e.epoch for e in store.list()] == [1]
    with pytest.raises(CheckpointNotFound):
        store.get(2)
    assert store.get()[0].epoch == 1  # "latest" falls back to the newest intact one
    assert store.corrupted == 1
    store.list()
    assert store.corrupted == 1  # counted once, however often it is looked at


def test_same_size_corruption_is_caught_by_sha256(store):
    entry = store.write(5, fill_with(b"x" * 100))
    (store.directory(entry) / "model.safetensors").write_bytes(b"y" * 100)
    assert store.list() == []
    assert "sha256" in verify_directory(store.directory(entry))


def test_reopen_reconciles_interrupted_writes_and_unindexed_checkpoints(tmp_path):
    history = History(tmp_path / "h.sqlite")
    first = CheckpointStore(tmp_path / "ckpt", history, keep=5)
    first.write(1, fill_with(b"1"))
    entry = first.write(2, fill_with(b"2"))
    # a crash after the rename but before the index row: the directory is complete, the archive missing
    history.remove_checkpoint(2)
    (tmp_path / "ckpt" / "epoch-000002.tar").unlink()
    (tmp_path / "ckpt" / ".tmp-epoch-000003-abc").mkdir()  # a crash in the middle of writing epoch 3
    history.close()

    reopened = CheckpointStore(tmp_path / "ckpt", History(tmp_path / "h.sqlite"), keep=5)
    reopened.reconcile()
    assert [e.epoch for e in reopened.list()] == [2, 1]
    assert reopened.get(2)[0].archive_sha256 == entry.archive_sha256  # the archive is rebuilt byte for byte
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


def test_signed_manifest_names_key_protocol_and_code(tmp_path):
    key = RunKey.load_or_create(tmp_path / "run_key.pem")
    store = CheckpointStore(tmp_path / "ckpt", History(tmp_path / "h.sqlite"), run_key=key)

    def fill(directory):
        fill_with(b"m" * 64)(directory)
        (directory / "modeling.py").write_text("# code\n")

    entry = store.write(3, fill)
    directory = store.directory(entry)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["run_key"] == key.public_hex and manifest["protocol"] == PROTOCOL_VERSION
    assert manifest["model_code"] == {"modeling.py": sha256_file(directory / "modeling.py")}
    signature = (directory / SIGNATURE).read_text().strip()
    assert verify_signature(key.public_hex, (directory / MANIFEST).read_bytes(), signature)
    with tarfile.open(store.get()[1]) as tar:
        assert "epoch-000003/manifest.sig" in tar.getnames()


def test_manifest_edited_after_signing_is_never_served(tmp_path):
    key = RunKey.load_or_create(tmp_path / "run_key.pem")
    store = CheckpointStore(tmp_path / "ckpt", History(tmp_path / "h.sqlite"), run_key=key)
    store.write(1, fill_with(b"1" * 10))
    entry = store.write(2, fill_with(b"2" * 10), loss=3.0)
    manifest_path = store.directory(entry) / MANIFEST
    manifest_path.write_text(manifest_path.read_text().replace('"loss": 3.0', '"loss": 0.1'))  # files still match
    assert verify_directory(store.directory(entry)) is None
    assert [e.epoch for e in store.list()] == [1] and store.corrupted == 1


def test_reconcile_signs_intact_unsigned_checkpoints_and_rebuilds_their_archive(tmp_path):
    history = History(tmp_path / "h.sqlite")
    unsigned = CheckpointStore(tmp_path / "ckpt", history, keep=5)  # e.g. written before checkpoints were signed
    old = unsigned.write(1, fill_with(b"1" * 10))
    unsigned.write(2, fill_with(b"2" * 10))
    history.remove_checkpoint(2)  # one indexed, one found on disk only
    damaged = unsigned.write(3, fill_with(b"3" * 10))
    (unsigned.directory(damaged) / "model.safetensors").write_bytes(b"x" * 10)
    assert not (unsigned.directory(old) / SIGNATURE).exists()

    key = RunKey.load_or_create(tmp_path / "run_key.pem")
    signed = CheckpointStore(tmp_path / "ckpt", history, keep=5, run_key=key)
    signed.reconcile()
    assert [e.epoch for e in signed.list()] == [2, 1]  # the damaged one is neither signed nor served
    assert not (signed.root / "epoch-000003" / SIGNATURE).exists()
    for epoch in (1, 2):
        entry, archive = signed.get(epoch)
        assert signature_problem(signed.directory(entry), key.public_hex) is None
        assert sha256_file(archive) == entry.archive_sha256
        with tarfile.open(archive) as tar:
            assert f"epoch-{epoch:06d}/manifest.sig" in tar.getnames()
    assert signed.get(1)[0].archive_sha256 != old.archive_sha256
