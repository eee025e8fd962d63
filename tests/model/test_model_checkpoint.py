"""Saved checkpoints: safetensors + code + auto_map, reloaded with identical logits, also without the project."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from model import LeanAlbertConfig, LeanAlbertForMaskedLM, LeanAlbertForSequenceClassification, load_config

HEADS = ("AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small trained-looking masked-LM checkpoint (random, non-zero biases) and fixed inputs with padding."""
    torch.manual_seed(0)
    config = load_config(
        "tiny",
        vocab_size=500,
        num_hidden_layers=3,
        num_hidden_groups=2,
        hidden_size=64,
        intermediate_size=96,
        embedding_size=32,
    )
    model = LeanAlbertForMaskedLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.1)  # zero-initialised biases would hide a bias that fails to load
    directory = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(directory)
    ids = torch.randint(5, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    return directory, model, ids, mask, logits


def test_save_writes_safetensors_code_and_an_auto_map_of_every_head(checkpoint):
    directory = checkpoint[0]
    assert {"model.safetensors", "config.json", "modeling.py", "configuration.py"} <= set(os.listdir(directory))
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration.LeanAlbertConfig"
    assert set(HEADS) <= set(auto_map)
    assert auto_map["AutoModelForMaskedLM"] == "modeling.LeanAlbertForMaskedLM"


def test_round_trip_in_process_gives_identical_logits(checkpoint):
    directory, model, ids, mask, logits = checkpoint
    for loader in (LeanAlbertForMaskedLM, AutoModelForMaskedLM):
        loaded = loader.from_pretrained(directory).eval()
        assert isinstance(loaded, LeanAlbertForMaskedLM)
        assert loaded.mlm_head.decoder.weight is loaded.lean_albert.embeddings.word_embeddings.weight
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, logits, atol=0, rtol=0)
    assert isinstance(AutoConfig.from_pretrained(directory), LeanAlbertConfig)
    encoder = AutoModel.from_pretrained(directory)
    torch.testing.assert_close(encoder.state_dict(), model.lean_albert.state_dict())


def test_a_classifier_starts_from_the_masked_lm_checkpoint(checkpoint):
    directory, model = checkpoint[:2]
    classifier = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=4)
    assert isinstance(classifier, LeanAlbertForSequenceClassification)
    assert classifier.classifier.out_features == 4
    torch.testing.assert_close(classifier.lean_albert.state_dict(), model.lean_albert.state_dict())


TRUST_REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    sys.path.extend(sys.argv[4:])  # site-packages without their .pth files: no editable install of the project
    import torch
    from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)

    torch.set_num_threads(1)
    directory, inputs, outputs = sys.argv[1:4]
    assert importlib.util.find_spec("model") is None, "the project must not be importable here"
    ids, mask = torch.load(inputs)
    masked_lm = AutoModelForMaskedLM.from_pretrained(directory, trust_remote_code=True).eval()
    sequence = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True, num_labels=3)
    tokens = AutoModelForTokenClassification.from_pretrained(directory, trust_remote_code=True, num_labels=5)
    encoder = AutoModel.from_pretrained(directory, trust_remote_code=True)
    with torch.no_grad():
        result = {
            "class": type(masked_lm).__name__,
            "module": type(masked_lm).__module__,
            "logits": masked_lm(ids, attention_mask=mask).logits,
            "sequence_logits": sequence.eval()(ids, attention_mask=mask).logits,
            "token_logits": tokens.eval()(ids, attention_mask=mask).logits,
            "hidden": encoder.eval()(ids, attention_mask=mask).last_hidden_state,
        }
    torch.save(result, outputs)
    """
)


@pytest.mark.timeout(120)
def test_trust_remote_code_loads_every_head_without_the_project(checkpoint, tmp_path):
    directory, model, ids, mask, logits = checkpoint
    torch.save((ids, mask), tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(TRUST_REMOTE_CODE_SCRIPT)
    # -I: neither the cwd nor PYTHONPATH is on sys.path, and cwd is elsewhere too. -S: no .pth files, which is how an
    # editable install (`pip install -e .`) would put the project back; the script adds site-packages by hand.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    environment.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            str(tmp_path / "load.py"),
            str(directory),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "outputs.pt"),
            *{sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]},
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        check=False,  # the assertion below shows stderr on failure
        timeout=110,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "outputs.pt")
    assert result["class"] == "LeanAlbertForMaskedLM"
    assert not result["module"].startswith("model.")  # the copy saved next to the weights, not the project
    torch.testing.assert_close(result["logits"], logits, atol=0, rtol=0)
    with torch.no_grad():
        hidden = model.lean_albert(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(result["hidden"], hidden, atol=0, rtol=0)
    assert result["sequence_logits"].shape == (2, 3)
    assert result["token_logits"].shape == (2, 12, 5)
