"""LeanAlbert forward code: shapes, masks, weight sharing, rotary, SmallInit, heads, checkpointing, autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import (
    PRESETS,
    LeanAlbertForMaskedLM,
    LeanAlbertForSequenceClassification,
    LeanAlbertForTokenClassification,
    LeanAlbertModel,
    load_config,
)
from model.modeling import LeanAlbertAttention, LeanAlbertRotaryEmbedding, apply_rotary

VOCAB = 300


def small_config(**overrides):
    values = {
        "vocab_size": VOCAB,
        "embedding_size": 16,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 48,
    }
    return load_config("tiny", **{**values, **overrides})


@pytest.fixture(autouse=True)
def one_thread_and_seed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def test_output_shapes_of_every_head():
    config = small_config(num_labels=3)
    ids = torch.randint(5, VOCAB, (2, 7))
    assert LeanAlbertModel(config)(ids).last_hidden_state.shape == (2, 7, 32)
    assert LeanAlbertForMaskedLM(config)(ids).logits.shape == (2, 7, VOCAB)
    assert LeanAlbertForSequenceClassification(config)(ids).logits.shape == (2, 3)
    assert LeanAlbertForTokenClassification(config)(ids).logits.shape == (2, 7, 3)


def test_padding_changes_nothing_for_the_real_tokens():
    model = LeanAlbertForMaskedLM(small_config()).eval()
    ids = torch.randint(5, VOCAB, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 6)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        with_padding = model(padded, attention_mask=mask).logits
        unmasked = model(padded).logits
    torch.testing.assert_close(with_padding[:, :9], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[:, :9], alone, atol=1e-3)  # the mask is what hides the padding


def test_a_sequence_of_padding_only_gives_finite_outputs():
    model = LeanAlbertForMaskedLM(small_config()).eval()
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    logits = model(torch.randint(5, VOCAB, (2, 4)), attention_mask=mask).logits
    assert torch.isfinite(logits).all()


def test_token_types_change_the_output():
    model = LeanAlbertModel(small_config()).eval()
    ids = torch.randint(5, VOCAB, (1, 6))
    zeros, ones = torch.zeros_like(ids), torch.ones_like(ids)
    torch.testing.assert_close(model(ids).last_hidden_state, model(ids, token_type_ids=zeros).last_hidden_state)
    assert not torch.allclose(model(ids).last_hidden_state, model(ids, token_type_ids=ones).last_hidden_state)


def test_sequences_longer_than_the_limit_are_rejected():
    model = LeanAlbertModel(small_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_attention_equals_a_direct_computation_with_rotary_and_mask():
    config = small_config()
    attention = LeanAlbertAttention(config).eval()
    torch.nn.init.normal_(attention.qkv.bias)  # non-zero biases so they are checked too
    hidden, seq, heads, size = torch.randn(2, 5, 32), 5, 2, 16
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    rotation = LeanAlbertRotaryEmbedding(size, config.rotary_embedding_base)(seq, hidden.device)
    actual = attention(hidden, rotation, keep[:, None, None, :])

    q, k, v = (hidden @ attention.qkv.weight.T + attention.qkv.bias).split(32, dim=-1)
    q, k, v = (t.view(2, seq, heads, size).transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, size]
    scores = rotate_directly(q, config.rotary_embedding_base) @ rotate_directly(k, config.rotary_embedding_base).mT
    scores = (scores / math.sqrt(size)).masked_fill(~keep[:, None, None, :], float("-inf"))
    context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(2, seq, 32)
    expected = context @ attention.out.weight.T + attention.out.bias
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def rotate_directly(x, base):
    """RoFormer's definition with 2x2 rotation matrices: pair (2i, 2i+1) at position m turns by m * base^(-2i/d)."""
    *_, seq, size = x.shape
    out = torch.empty_like(x)
    for m in range(seq):
        for i in range(size // 2):
            angle = torch.tensor(m * base ** (-2 * i / size))
            rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
            out[..., m, 2 * i : 2 * i + 2] = x[..., m, 2 * i : 2 * i + 2] @ rotation.T
    return out


def test_rotary_equals_the_rotation_matrices_and_is_computed_in_float32():
    rotation = LeanAlbertRotaryEmbedding(8, 10000.0)(6, torch.device("cpu"))
    x = torch.randn(3, 6, 2, 8)  # [batch, seq, heads, head_size]
    expected = rotate_directly(x.transpose(1, 2), 10000.0).transpose(1, 2)
    torch.testing.assert_close(apply_rotary(x, rotation), expected, atol=1e-6, rtol=1e-5)
    assert apply_rotary(x.bfloat16(), rotation).dtype == torch.float32


def test_rotary_scores_depend_only_on_relative_position():
    size, seq = 16, 40
    rotation = LeanAlbertRotaryEmbedding(size, 10000.0)(seq, torch.device("cpu"))
    query, key = torch.randn(size), torch.randn(size)
    rotated_q = apply_rotary(query.expand(1, seq, 1, size), rotation)[0, :, 0]  # the same vector at every position
    rotated_k = apply_rotary(key.expand(1, seq, 1, size), rotation)[0, :, 0]
    scores = rotated_q @ rotated_k.T  # [query position, key position]
    for offset in (-7, 0, 3, 12):
        diagonal = torch.diagonal(scores, offset=offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 5)[0])
    torch.testing.assert_close(rotated_q.norm(dim=-1), query.norm().expand(seq))  # a rotation keeps lengths


def test_parameter_count_depends_on_groups_not_depth():
    def count(**overrides):
        return LeanAlbertForMaskedLM(small_config(**overrides)).num_parameters()

    assert count(num_hidden_layers=1) == count(num_hidden_layers=2) == count(num_hidden_layers=6)
    assert count(num_hidden_layers=6, num_hidden_groups=2) > count(num_hidden_layers=6)
    assert count(num_hidden_layers=6, num_hidden_groups=3) - count(num_hidden_layers=6) == 2 * (
        count(num_hidden_layers=6, num_hidden_groups=2) - count(num_hidden_layers=6)
    )


def test_groups_cover_contiguous_blocks_of_layers():
    model = LeanAlbertModel(small_config(num_hidden_layers=6, num_hidden_groups=2)).eval()
    calls = []
    for index, layer in enumerate(model.encoder.groups):
        layer.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    model(torch.randint(5, VOCAB, (1, 4)))
    assert calls == [0, 0, 0, 1, 1, 1]


def test_the_decoder_is_tied_to_the_word_embeddings_and_has_its_own_bias():
    model = LeanAlbertForMaskedLM(small_config())
    assert model.mlm_head.decoder.weight is model.lean_albert.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.bias.shape == (VOCAB,)


def test_weight_decay_is_decidable_by_rank():
    model = LeanAlbertForMaskedLM(small_config(num_labels=2))
    for name, parameter in model.named_parameters():
        is_matrix = name.endswith(".weight") and "norm" not in name
        assert (parameter.dim() >= 2) == is_matrix, name


def test_small_init_statistics():
    hidden, layers = 256, 8
    config = small_config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=512,
        embedding_size=64,
        vocab_size=4000,
    )
    model = LeanAlbertForMaskedLM(config)
    small, wang = math.sqrt(2 / (5 * hidden)), 2 / (layers * math.sqrt(hidden))
    layer = model.lean_albert.encoder.groups[0]
    expected = {
        model.lean_albert.embeddings.word_embeddings.weight: small,
        model.lean_albert.embeddings.projection.weight: small,
        layer.attention.qkv.weight: small,
        layer.ffn.wi.weight: small,
        model.mlm_head.dense.weight: small,
        layer.attention.out.weight: wang,
        layer.ffn.wo.weight: wang,
    }
    for weight, std in expected.items():
        assert abs(weight.mean().item()) < 0.05 * std
        assert weight.std().item() == pytest.approx(std, rel=0.05)
    for name, parameter in model.named_parameters():
        if name.endswith(".bias"):
            assert not parameter.any(), name
        elif "norm" in name:
            assert (parameter == 1).all(), name


def test_mlm_loss_ignores_unlabelled_positions():
    model = LeanAlbertForMaskedLM(small_config()).eval()
    ids = torch.randint(5, VOCAB, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 4] = 7, 9
    output = model(ids, labels=labels)
    expected = F.cross_entropy(output.logits[[0, 1], [1, 4]], torch.tensor([7, 9]))
    torch.testing.assert_close(output.loss, expected)
    other_labels = labels.clone()
    other_labels[0, 0] = -100  # already ignored: must change nothing
    torch.testing.assert_close(model(ids, labels=other_labels).loss, output.loss)


@pytest.mark.parametrize("sparse_prediction", [False, True])
def test_mlm_loss_and_gradients_equal_cross_entropy_over_all_logits(sparse_prediction):
    reference = LeanAlbertForMaskedLM(small_config()).train()
    model = LeanAlbertForMaskedLM(small_config(sparse_prediction=sparse_prediction)).train()
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(5, VOCAB, (3, 10))
    labels = torch.where(torch.rand(3, 10) < 0.3, ids, -100)
    labels[2, 9] = ids[2, 9]
    all_logits = reference(ids).logits  # no labels: every position decoded, plain cross-entropy below
    expected_loss = F.cross_entropy(all_logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
    expected_loss.backward()
    output = model(ids, labels=labels)
    output.loss.backward()
    torch.testing.assert_close(output.loss, expected_loss)
    for (name, expected), parameter in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected.grad, atol=1e-6, rtol=1e-5, msg=name)
    if sparse_prediction:  # only the labelled positions are decoded, in row-major order
        torch.testing.assert_close(output.logits, all_logits[labels != -100])
    else:
        torch.testing.assert_close(output.logits, all_logits)


def test_classification_losses_and_pooling():
    config = small_config(num_labels=3)
    ids, mask = torch.randint(5, VOCAB, (2, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    classifier = LeanAlbertForSequenceClassification(config).eval()
    output = classifier(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, torch.tensor([0, 2])))
    changed = ids.clone()
    changed[0, 4] = 6  # a padded position: mean pooling over the mask must ignore it
    torch.testing.assert_close(classifier(changed, attention_mask=mask).logits, output.logits)

    tagger = LeanAlbertForTokenClassification(config).eval()
    tags = torch.tensor([[0, 1, 2, -100, -100], [2, 2, 1, 0, -100]])
    output = tagger(ids, attention_mask=mask, labels=tags)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits.view(-1, 3), tags.view(-1)))


def gradients(model, ids, labels):
    model.zero_grad()
    model(ids, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_gives_the_same_gradients(enable):
    model = LeanAlbertForMaskedLM(small_config(num_hidden_layers=3, num_hidden_groups=2)).train()
    ids = torch.randint(5, VOCAB, (2, 8))
    labels = torch.where(torch.rand(2, 8) < 0.5, ids, -100)
    labels[0, 0] = ids[0, 0]
    plain = gradients(model, ids, labels)
    with pytest.warns(FutureWarning) if enable == "gradient_checkpointing_enable" else _no_warning_check():
        getattr(model, enable)()
    assert model.lean_albert.encoder.gradient_checkpointing
    recomputed = []
    # A pre-hook: the recomputation stops early, once it has rebuilt what backward needs, so post-hooks never run.
    model.lean_albert.encoder.groups[0].register_forward_pre_hook(lambda *args: recomputed.append(1))
    checkpointed = gradients(model, ids, labels)
    assert len(recomputed) == 4  # 2 layers on group 0, each run again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


class _no_warning_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_trains_on_cpu(dtype):
    model = LeanAlbertForMaskedLM(small_config()).train()
    ids = torch.randint(5, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.autocast("cpu", dtype=dtype):
        output = model(ids, attention_mask=mask, labels=ids)
    assert output.logits.dtype == dtype
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_few_steps_of_training_reduce_the_loss():
    model = LeanAlbertForMaskedLM(small_config()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(5, VOCAB, (4, 16))
    masked = torch.rand(4, 16) < 0.3
    inputs, labels = ids.masked_fill(masked, 4), torch.where(masked, ids, -100)
    losses = []
    for _ in range(40):
        loss = model(inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_instantiates_and_reports_its_parameter_count(name):
    config = load_config(name)
    with torch.device("meta"):
        model = LeanAlbertForMaskedLM(config)
    h, e, v, inner = config.hidden_size, config.embedding_size, config.vocab_size, config.intermediate_size
    embeddings = v * e + config.type_vocab_size * e + 2 * e + e * h + h
    layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (2 * inner * h + 2 * inner) + (inner * h + h)
    head = h * e + e + 2 * e + v  # transform, LayerNorm, decoder bias (the decoder weight is tied)
    unique = embeddings + config.num_hidden_groups * layer + 2 * h + head
    assert model.num_parameters() == unique
    unrolled = unique + (config.num_hidden_layers - config.num_hidden_groups) * layer
    assert model.num_unrolled_parameters() == unrolled
    print(f"{name}: {unique / 1e6:.1f}M unique parameters, {model.num_unrolled_parameters() / 1e6:.1f}M unrolled")
