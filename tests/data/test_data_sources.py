"""Corpus resolution and the document stream: formats, dedup, empty documents and every bad input."""

import gzip
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from data import BUNDLED_CORPUS, CorpusError
from data.sources import DocumentStats, first_invalid_utf8_offset, iter_documents, load_stream, resolve_corpus


def documents_of(spec, text_column="text"):
    source = resolve_corpus(spec, text_column)
    stats = DocumentStats()
    return list(iter_documents(source, load_stream(source, seed=0), stats)), stats


def test_bundled_corpus_has_both_languages():
    source = resolve_corpus(None)
    assert source.builder == "json" and len(source.data_files) == 4
    langs = set()
    for name in source.data_files:
        with gzip.open(name, "rt", encoding="utf-8") as handle:
            langs |= {json.loads(line)["lang"] for line in handle}
    assert langs == {"en", "ru"}


def test_text_file_lines_are_documents_deduplicated_and_empty_ones_counted(write_text):
    path = write_text("corpus.txt", "first line\n\n   \nsecond line\nfirst line\nthird\n")
    documents, stats = documents_of(str(path))
    assert sorted(documents) == ["first line", "second line", "third"]
    assert (stats.documents, stats.empty, stats.duplicates) == (3, 2, 1)


def test_directory_glob_and_compressed_files(tmp_path, write_text):
    write_text("dir/a.txt", "alpha\nbeta\n")
    write_text("dir/sub/b.txt", "gamma\n")
    write_text("dir/.hidden/c.txt", "hidden\n")
    write_text("dir/README.md", "not a corpus file\n")
    with gzip.open(tmp_path / "dir" / "sub" / "d.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("delta\n")
    assert sorted(documents_of(str(tmp_path / "dir"))[0]) == ["alpha", "beta", "delta", "gamma"]
    assert sorted(documents_of(str(tmp_path / "dir" / "**" / "*.txt"))[0]) == ["alpha", "beta", "gamma"]


def test_a_directory_reads_its_dominant_format_and_warns_about_the_rest(tmp_path, write_text, caplog):
    write_text("books/author/book.txt", "a long book line\n" * 20)
    write_text("books/author/info.csv", "title,year\nbook,1850\n")
    source = resolve_corpus(str(tmp_path / "books"))
    assert source.builder == "text" and [p.endswith("book.txt") for p in source.data_files] == [True]
    assert "ignoring 1 other file(s)" in caplog.text


def test_jsonl_with_a_named_text_column(write_text):
    rows = [{"body": "one document", "id": 1}, {"body": "another one", "id": 2}, {"body": "", "id": 3}]
    path = write_text("c.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    documents, stats = documents_of(str(path), text_column="body")
    assert sorted(documents) == ["another one", "one document"] and stats.empty == 1


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet doc one", "parquet doc two"]}), tmp_path / "c.parquet")
    assert sorted(documents_of(str(tmp_path / "c.parquet"))[0]) == ["parquet doc one", "parquet doc two"]


def test_missing_text_column_names_the_columns(write_text):
    path = write_text("c.jsonl", json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match="no column 'text'.*body"):
        documents_of(str(path))


def test_hub_names_are_recognised_without_touching_the_network():
    source = resolve_corpus("someone/some-dataset", text_column="content")
    assert not source.is_local and source.builder == "someone/some-dataset" and source.text_column == "content"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/corpus.txt", "does not exist"),
        ("./missing-dir/", "does not exist"),
        ("/no/such/dir/*.txt", "matches no file"),
    ],
)
def test_missing_corpus_is_an_error(spec, message):
    with pytest.raises(CorpusError, match=message):
        resolve_corpus(spec)


def test_empty_file_unknown_format_and_mixed_formats_are_errors(tmp_path, write_text):
    with pytest.raises(CorpusError, match="is empty"):
        resolve_corpus(str(write_text("empty.txt", "")))
    with pytest.raises(CorpusError, match="cannot tell the format"):
        resolve_corpus(str(write_text("corpus.docx", "x")))
    write_text("mixed/a.txt", "x\n")
    write_text("mixed/b.jsonl", '{"text": "y"}\n')
    with pytest.raises(CorpusError, match="mixes formats"):
        resolve_corpus(str(tmp_path / "mixed" / "*"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match="no readable files"):
        resolve_corpus(str(tmp_path / "nothing"))


def test_a_file_of_blank_lines_yields_no_document(write_text):
    documents, stats = documents_of(str(write_text("blank.txt", "\n \n\t\n")))
    assert documents == [] and stats.empty == 3


def test_non_utf8_file_is_reported_with_its_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine line\nna\u00efve caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt is not UTF-8 text: invalid byte at offset 12"):
        documents_of(str(path))


def test_broken_json_is_an_error(write_text):
    path = write_text("broken.jsonl", '{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(CorpusError, match="broken.jsonl|cannot read corpus"):
        documents_of(str(path))


@given(st.text(max_size=200), st.binary(min_size=1, max_size=3), st.text(max_size=50), st.integers(1, 16))
def test_first_invalid_utf8_offset_matches_the_decoder(tmp_path_factory, head, junk, tail, chunk_size):
    data = head.encode("utf-8") + junk + tail.encode("utf-8")
    path = tmp_path_factory.mktemp("utf8") / "f.bin"
    path.write_bytes(data)
    try:
        data.decode("utf-8")
        expected = None
    except UnicodeDecodeError as error:
        expected = error.start
    assert first_invalid_utf8_offset(path, chunk_size=chunk_size) == expected


def test_bundled_corpus_path_is_a_directory_of_shards():
    assert resolve_corpus(BUNDLED_CORPUS).data_files == resolve_corpus(None).data_files
