"""LeanAlbertConfig and load_config: presets, files, overrides and the errors users see."""

import json

import pytest
import torch

from model import PRESETS, LeanAlbertConfig, LeanAlbertForMaskedLM, load_config


def test_presets_have_the_documented_shapes():
    sahajbert, ruleanalbert = load_config("sahajbert"), load_config("ruleanalbert")
    assert (sahajbert.hidden_size, sahajbert.num_hidden_layers, sahajbert.num_hidden_groups) == (2048, 24, 1)
    assert (sahajbert.intermediate_size, sahajbert.num_attention_heads, sahajbert.embedding_size) == (8192, 16, 128)
    assert (ruleanalbert.hidden_size, ruleanalbert.num_hidden_layers, ruleanalbert.num_hidden_groups) == (4096, 32, 1)
    assert (ruleanalbert.intermediate_size, ruleanalbert.num_attention_heads) == (16384, 64)
    assert all(load_config(name).gated_ffn and load_config(name).hidden_act == "gelu" for name in PRESETS)
    assert set(PRESETS) == {"tiny", "base", "large", "sahajbert", "ruleanalbert"}


def test_overrides_apply_on_top_of_a_preset():
    config = load_config("tiny", vocab_size=8064, pad_token_id=3, mask_token_id=5)
    assert (config.vocab_size, config.pad_token_id, config.mask_token_id) == (8064, 3, 5)
    assert config.hidden_size == PRESETS["tiny"]["hidden_size"]


def test_loads_a_config_file_and_a_checkpoint_directory(tmp_path):
    config = load_config("tiny", vocab_size=1000, num_hidden_layers=2)
    config.save_pretrained(tmp_path)
    from_dir = load_config(tmp_path)
    from_file = load_config(tmp_path / "config.json", hidden_dropout_prob=0.1)
    assert from_dir.to_dict() == config.to_dict()
    assert (from_file.num_hidden_layers, from_file.hidden_dropout_prob) == (2, 0.1)


@pytest.mark.parametrize(
    "args, overrides, message",
    [
        (("tinny",), {}, "unknown model config 'tinny'"),
        (("/nonexistent/config.json",), {}, "no such preset or file"),
        (("tiny",), {"hidden_size": "256"}, "hidden_size must be an int"),
        (("tiny",), {"hidden_size": True}, "hidden_size must be an int"),
        (("tiny",), {"hidden_dropout_prob": 1.5}, "hidden_dropout_prob must be in"),
        (("tiny",), {"hiden_size": 256}, "unknown model config field(s) hiden_size"),
        (("tiny",), {"num_attention_heads": 5}, "heads of an even size"),
        (("tiny",), {"num_hidden_groups": 9}, "cannot exceed num_hidden_layers"),
        (("tiny",), {"pad_token_id": 16000}, "pad_token_id must be in"),
        (("tiny",), {"hidden_act": "gleu"}, "hidden_act must be one of"),
    ],
)
def test_bad_names_and_values_raise_value_errors_listing_the_presets(args, overrides, message):
    with pytest.raises(ValueError) as error:
        load_config(*args, **overrides)
    assert message in str(error.value)
    assert "tiny, base, large, sahajbert, ruleanalbert" in str(error.value)


def test_bad_files_raise_value_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    (tmp_path / "typed.json").write_text(json.dumps({"num_hidden_layers": "four"}))
    (tmp_path / "empty_dir").mkdir()
    cases = {
        "broken.json": "cannot read model config",
        "list.json": "must hold a JSON object",
        "bert.json": "model_type 'bert'",
        "typed.json": "num_hidden_layers must be an int",
        "empty_dir": "holds no config.json",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match="tiny, base") as error:
            load_config(tmp_path / name)
        assert message in str(error.value), name


def test_config_json_round_trip_keeps_every_field(tmp_path):
    config = load_config("tiny", num_hidden_groups=2, gated_ffn=False, classifier_pooling="cls")
    config.save_pretrained(tmp_path)
    again = LeanAlbertConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lean_albert"


def test_a_model_builds_from_every_config_a_user_can_load(tmp_path):
    load_config("tiny", vocab_size=500).save_pretrained(tmp_path)
    model = LeanAlbertForMaskedLM(load_config(tmp_path, num_hidden_layers=1))
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 500)
