"""The tokenizer: bundled one loads and round-trips, training works, bad directories and mismatches are errors."""

import json
import shutil
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from data import (
    BUNDLED_TOKENIZER,
    TokenizerError,
    check_tokenizer_matches,
    load_tokenizer,
    model_overrides_from_tokenizer,
    train_tokenizer,
)

SMALL_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Съешь же ещё этих мягких французских булок, да выпей чаю. " * 3,
    "In the beginning God created the heavens and the earth.",
    "Стандартный фильтр позволяет выбрать записи базы данных.",
] * 5

ENGLISH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
RUSSIAN = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"
words = st.text(alphabet=ENGLISH + RUSSIAN + "0123456789.,;:!?()-", min_size=1, max_size=12)


def test_bundled_tokenizer_has_albert_specials_and_a_vocab_multiple_of_64(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    assert ids == [0, 1, 2, 3, 4]
    assert len(tokenizer) % 64 == 0 and 8000 <= len(tokenizer) <= 16000
    encoded = tokenizer("Hello world")["input_ids"]
    assert encoded[0] == 2 and encoded[-1] == 3


def test_bundled_tokenizer_loads_with_auto_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token_id == 0


@pytest.mark.parametrize(
    "text",
    [
        "In the beginning, God created the heavens and the earth.",
        "Стандартный фильтр: выберите поле «Имя» и нажмите OK.",
    ],
)
def test_round_trip_of_corpus_text(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(words, min_size=1, max_size=30))
def test_round_trip_of_random_text(tokenizer, parts):
    text = " ".join(parts)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_word_ids_follow_whitespace_words(tokenizer):
    encoding = tokenizer("Стандартный фильтр works", add_special_tokens=False)
    word_ids = encoding.word_ids()
    assert sorted(set(word_ids)) == [0, 1, 2]
    assert word_ids == sorted(word_ids)


def test_train_save_and_load(tmp_path):
    trained = train_tokenizer(SMALL_CORPUS, vocab_size=300, out_dir=tmp_path / "tok")
    assert len(trained) <= 320  # 300 rounded up to a multiple of 64
    loaded = load_tokenizer(tmp_path / "tok")
    text = "the lazy dog ест булок"
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    overrides = model_overrides_from_tokenizer(loaded)
    assert overrides["vocab_size"] % 64 == 0 and overrides["vocab_size"] >= len(loaded)


def test_training_on_an_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_tokenizer([], vocab_size=256, out_dir=tmp_path / "tok")


def test_overrides_name_transformers_config_fields(tokenizer):
    overrides = model_overrides_from_tokenizer(tokenizer)
    assert overrides == {
        "vocab_size": len(tokenizer),
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "mask_token_id": 4,
    }


def test_check_tokenizer_matches_names_both_numbers(tokenizer):
    overrides = model_overrides_from_tokenizer(tokenizer)
    check_tokenizer_matches(SimpleNamespace(**overrides), tokenizer)
    with pytest.raises(ValueError, match=f"vocab_size=30000.*{len(tokenizer)} tokens"):
        check_tokenizer_matches(SimpleNamespace(**{**overrides, "vocab_size": 30000}), tokenizer)
    with pytest.raises(ValueError, match="pad_token_id=5 but the tokenizer has pad_token_id=0"):
        check_tokenizer_matches(SimpleNamespace(**{**overrides, "pad_token_id": 5}), tokenizer)


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_directory_without_tokenizer_json_is_an_error(tmp_path):
    shutil.copy(f"{BUNDLED_TOKENIZER}/tokenizer_config.json", tmp_path)
    with pytest.raises(TokenizerError, match="has no tokenizer.json.*tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_truncated_tokenizer_json_is_an_error(tmp_path):
    shutil.copytree(BUNDLED_TOKENIZER, tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer.json"
    path.write_text(path.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path / "tok")


def test_tokenizer_without_albert_specials_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer(models.WordLevel(unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.train_from_iterator(SMALL_CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="<unk>").save_pretrained(str(tmp_path))
    with pytest.raises(TokenizerError, match="lacks ALBERT's special tokens"):
        load_tokenizer(tmp_path)


def test_a_vocabulary_smaller_than_the_alphabet_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(SMALL_CORPUS, vocab_size=100)
    many_characters = ["".join(chr(0x4E00 + i) for i in range(start, start + 50)) for start in range(0, 500, 50)]
    with pytest.raises(TokenizerError, match="training failed"):
        train_tokenizer(many_characters, vocab_size=256)
