"""Fixtures for the data tests: the bundled tokenizer and small corpora written to temporary files."""

import os
from pathlib import Path

import pytest

# The Rust tokenizer would otherwise start a thread per core on a machine shared with other test suites.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from data import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def write_text(tmp_path):
    """Write a text file under tmp_path and return its path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write
