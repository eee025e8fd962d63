"""The reducer's feedback on its mean replies (peer/hivemind_gaps/mean_replies.py ReplyFeedback), on crafted means:
what a reply's encoding drops comes back in the next reply of that part, only where the mean is non-zero, and never
from a mean that is not finite or that the codec could not carry. Real rounds: tests/peer/test_pseudo_gradient_codecs.py
and tests/peer/test_error_feedback.py."""

from __future__ import annotations

import torch
from hivemind.proto import runtime_pb2

import peer.swarm.optimizer  # noqa: F401 - installs our codecs in hivemind's table (int4-block's wire type)
from peer.hivemind_gaps.mean_replies import ReplyFeedback, as_decoded

INT4 = runtime_pb2.CompressionType.QUANTILE_8BIT  # int4-block's and topk-int4's wire type
FP16 = runtime_pb2.CompressionType.FLOAT16
NONE = runtime_pb2.CompressionType.NONE
KEY = (0, 0)  # tensor 0, part 0


def test_what_a_reply_dropped_comes_back_in_the_next_reply_of_that_part():
    feedback = ReplyFeedback()
    mean = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    target, sent = feedback.reply(KEY, mean, INT4)
    assert torch.equal(target, mean) and torch.equal(sent, as_decoded(mean, INT4))
    dropped = mean - sent
    assert dropped.norm() > 0.05 * mean.norm()  # int4 rounding: something to carry
    target, sent = feedback.reply(KEY, mean, INT4)
    assert torch.equal(target, mean + dropped)
    # over the two replies, what members received is off by one rounding, not two
    assert (2 * mean - (sent + as_decoded(mean, INT4))).norm() < 1.5 * dropped.norm()
    assert torch.equal(feedback.reply((0, 1), mean, INT4)[0], mean)  # another part carries its own residual


def test_only_where_the_mean_is_non_zero_so_a_sparse_mean_stays_sparse():
    feedback = ReplyFeedback()
    first = torch.randn(256, generator=torch.Generator().manual_seed(1))
    _, sent = feedback.reply(KEY, first, INT4)
    carried = first - sent
    sparse = torch.zeros(256)
    sparse[:64] = 1.0
    target, _ = feedback.reply(KEY, sparse, INT4)
    assert bool((target[64:] == 0).all())  # zero where the mean is: the reply stays as sparse
    assert torch.equal(target[:64], sparse[:64] + carried[:64])
    # the rest waits for its coordinates' next non-zero mean
    assert torch.equal(feedback.residuals[KEY][64:], carried[64:])


def test_no_residual_from_a_mean_that_is_not_finite_or_not_carried():
    feedback = ReplyFeedback()
    feedback.reply(KEY, torch.randn(100), INT4)
    poisoned = torch.randn(100)
    poisoned[5] = float("nan")
    target, _ = feedback.reply(KEY, poisoned, FP16)
    assert torch.isnan(target[5]) and torch.equal(target[:5], poisoned[:5])  # the mean as it is, nothing added
    assert KEY not in feedback.residuals
    # fp16 clamps at 65504: a crafted mean's excess is no rounding, and must not come back in every later reply
    target, sent = feedback.reply(KEY, torch.full((100,), 1e9), FP16)
    assert float(sent.max()) == 65504.0 and KEY not in feedback.residuals
    # a lossless codec drops nothing: nothing kept
    feedback.reply(KEY, torch.randn(100), NONE)
    assert KEY not in feedback.residuals
