"""Checkpoint store on a real file system: atomic writes, manifests, archives, retention, damage detection, restart."""

import json
import tarfile

import pytest

from monitor.checkpoint import CheckpointNotFound, CheckpointStore, epochs_to_keep, sha256_of, verify_directory
from monitor.history import History


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
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_of(directory / "model.safetensors")
    assert set(manifest["files"]) == {"model.safetensors", "tokenizer/tokenizer.json"}
    listed, archive = store.get()
    assert listed == entry and sha256_of(archive) == entry.archive_sha256
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
