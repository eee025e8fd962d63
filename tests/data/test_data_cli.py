"""`albert-data` end to end: inspect, tokenizer training, clear one-line errors; and the corpus build recipe."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data import BUNDLED_CORPUS, MLMDataset, load_tokenizer
from data.build_corpus import _NOTE, _clean_markup, _HelpPageText
from data.cli import main

REPO = Path(__file__).resolve().parents[2]
RUSLIT = REPO.parent / "shared" / "corpora" / "ruslit"  # read in place, never copied into the repository


def run_cli(*args):
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "data", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(120)
def test_inspect_prints_masked_sequences_and_the_measured_rates():
    result = run_cli("inspect", "--batches", "8", "--show", "2", "--max-length", "64")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sequence") == 2 and "[MASK=" in result.stdout
    assert "words split between target and non-target: 0" in result.stdout
    rate = float(result.stdout.split("targets ")[1].split("(")[1].split("%")[0])
    assert 10 < rate < 20


@pytest.mark.timeout(120)
def test_a_non_utf8_corpus_ends_the_process_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n\xff\xfe broken\n")
    result = run_cli("inspect", "--corpus", str(bad))
    assert result.returncode == 2
    assert "bad.txt is not UTF-8 text: invalid byte at offset 10" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "--corpus", "{tmp}/missing.txt"], "does not exist"),
        (["inspect", "--tokenizer", "{tmp}"], "has no tokenizer.json"),
        (["inspect", "--corpus", "{tmp}/empty.txt"], "is empty"),
        (["inspect", "--max-length", "2"], "max_length=2"),
        (["tokenizer", "--corpus", "{tmp}/blank.txt", "--out", "{tmp}/tok", "--vocab-size", "256"], "empty corpus"),
    ],
)
def test_user_errors_exit_with_status_2_and_a_message(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    assert main([arg.format(tmp=tmp_path) for arg in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("albert-data ")


def test_tokenizer_command_trains_a_loadable_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    lines = [{"content": f"Документ {i} about the topic number {i % 7}. Ещё немного текста."} for i in range(200)]
    corpus.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    status = main(
        [
            "tokenizer",
            "--corpus",
            str(corpus),
            "--text-column",
            "content",
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "tok"),
        ]
    )
    assert status == 0
    assert "trained on 200 documents" in capsys.readouterr().out
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert tokenizer.decode(tokenizer("Ещё немного текста")["input_ids"], skip_special_tokens=True) == (
        "Ещё немного текста"
    )


def test_tokenizer_command_refuses_a_directory_of_other_files(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious", encoding="utf-8")
    assert main(["tokenizer", "--out", str(tmp_path), "--vocab-size", "256"]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "precious"


def test_bible_markup_is_stripped_to_plain_text():
    verse = (
        '<w lemma="strong:H0430">In</w> <w lemma="strong:H0853">the</w> <w>beginning</w>, <w>God</w>'
        '<note placement="foot"><reference type="annotateRef">1:1 </reference>The Hebrew word.</note>'
        '<w>created</w> <w>the</w> <w>earth</w>.<div eID="gen25" type="x-p"/>'
    )
    assert _clean_markup(_NOTE.sub(" ", verse)) == "In the beginning, God created the earth."


def test_help_page_text_keeps_the_display_area_only():
    parser = _HelpPageText()
    parser.feed(
        '<html><body><header><p>Справка LibreOffice</p></header><div id="DisplayArea">'
        '<h1>Стандартный фильтр</h1><p class="paragraph">Выберите <span>поле</span>.</p>'
        "<script>var x = 1;</script><div><p>Вложенный абзац</p></div></div><p>footer</p></body></html>"
    )
    parser.close()
    assert parser.lines == ["Стандартный фильтр", "Выберите поле.", "Вложенный абзац"]


def test_bundled_corpus_is_small_documented_and_licensed():
    corpus = Path(BUNDLED_CORPUS)
    shards = sorted(corpus.glob("*.jsonl.gz"))
    assert len(shards) == 4 and sum(p.stat().st_size for p in shards) < 4_000_000
    readme = (corpus / "README.md").read_text(encoding="utf-8")
    assert "public domain" in readme.lower() and "MPL-2.0" in readme
    assert "Mozilla Public License Version 2.0" in (corpus / "LICENSE.MPL-2.0").read_text(encoding="utf-8")
    with gzip.open(shards[0], "rt", encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    assert set(first) == {"text", "lang"} and len(first["text"]) >= 200


@pytest.mark.skipif(not RUSLIT.is_dir(), reason="../shared/corpora/ruslit is not present")
def test_ruslit_directory_streams_russian_sequences(tokenizer):
    dataset = MLMDataset(str(RUSLIT / "prose"), tokenizer, max_length=128, peer_id="ruslit")
    sequences = [example for _, example in zip(range(20), dataset)]
    text = tokenizer.decode(sequences[0]["input_ids"], skip_special_tokens=True)
    assert sum("а" <= ch <= "я" for ch in text.lower()) > len(text) / 3
    assert all(len(s["input_ids"]) <= 128 for s in sequences)
