"""The index of hivemind's gaps (peer/hivemind_gaps/__init__.py) stays true, and fails first on a hivemind upgrade.

It pins the hivemind version the table was written for, checks that the private hivemind names the workarounds rely
on still exist, that the tests the table cites exist, and shows gap 7 (handler names) on plain hivemind.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import hivemind
import pytest
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import serialization
from hivemind.dht.protocol import DHTProtocol
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2P, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.control import ControlClient
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from transformers import HfArgumentParser

import peer.hivemind_gaps
from peer.hivemind_gaps.averagers import (
    CheckedTrainingStateAverager,
    ConsistentTrainingStateAverager,
    GuardedGradientAverager,
    GuardedOuterAverager,
    GuardedRobustGradientAverager,
    GuardedTrainingStateAverager,
    OuterAverager,
    RobustGradientAverager,
)
from peer.hivemind_gaps.checked_parts import CheckedRounds, runner_options
from peer.hivemind_gaps.mean_replies import MeanReplies
from peer.hivemind_gaps.optimizer import SwarmOptimizer
from peer.hivemind_gaps.robust_allreduce import RobustAggregation
from peer.hivemind_gaps.state_rounds import CheckedStateRounds
from tests.harness import REPO, run_cli

INDEX = peer.hivemind_gaps.__doc__
ROOM = Path(peer.hivemind_gaps.__file__).parent
REVIEW = "hivemind changed: review the table in peer/hivemind_gaps/__init__.py, then update this test"

# private hivemind names the workarounds call or override, by the class that defines them in 1.1.12
PRIVATE_METHODS = [
    (hivemind.Optimizer, "_make_state_averager"),  # optimizer.py
    (hivemind.Optimizer, "_make_progress_tracker"),  # optimizer.py (vouched_progress.py)
    (ProgressTracker, "_parse_swarm_progress_data"),  # vouched_progress.py VouchedProgressTracker
    (TrainingStateAverager, "_update_scheduler"),  # state_check.py FastSchedulerCatchUp
    (DecentralizedAverager, "_load_state_from_peers"),  # state_check.py CheckedDownloads
    (ServicerBase, "_get_handle_name"),  # averagers.py HivemindHandleNames
    (DecentralizedAverager, "_run_allreduce_inplace_"),  # checked_parts.py, robust_allreduce.py, state_rounds.py,
    # mean_replies.py
    (DecentralizedAverager, "_aggregate_with_group"),  # averager_guard.py GuardedAveragerMixin
    (Matchmaking, "_request_join_group"),  # averager_guard.py follow_members_only
    (HfArgumentParser, "_parse_dataclass_field"),  # peer/swarm/flags.py (transformers)
    (AllReduceRunner, "_accumulate_parts_streaming"),  # mean_replies.py MeanReplyRunner (hivemind's body, copied)
    (AllReduceRunner, "_communicate_with_peer"),  # mean_replies.py MeanReplyRunner, checked_parts.py
    (AllReduceRunner, "_ban_sender"),  # checked_parts.py CheckedAllReduceRunner, mean_replies.py MeanReplyRunner
    (AllReduceRunner, "_check_reasons_to_reject"),  # group_views.py ViewBoundRunner
    (AllReduceRunner, "_generate_input_for_peer"),  # group_views.py ViewBoundRunner
]
# private attributes set in __init__, found in the class's source
PRIVATE_ATTRIBUTES = [
    (TokenAuthorizerBase, "self._local_access_token"),  # peer/swarm/access.py RunAuthorizer
    (DecentralizedAverager, "self._outer_pipe"),  # state_check.py CheckedDownloads.load_state_from_peers
    (DecentralizedAverager, "self._matchmaking"),  # state_check.py CheckedDownloads._donors; averager_guard.py
    (DHTProtocol, "self.routing_table"),  # rejoin.py
    (P2P, "self._client"),  # averager_guard.py admit_members_first (P2P._client.control.handlers)
    (ControlClient, "self.handlers[proto]"),  # averager_guard.py admit_members_first (read per incoming stream)
    (DecentralizedAverager, "self.allreduce_kwargs"),  # traffic.py CountedTraffic.run
    (DecentralizedAverager, "self._running_groups"),  # averager_guard.py fail_group
    (Matchmaking, "self.min_group_size"),  # robust_allreduce.py GroupQuorum._set_min_group_size (read per wait)
    (DecentralizedAverager, "self._state_updated"),  # checked_parts.py run_inplace, state_rounds.py
    (TensorPartContainer, "self.return_deltas"),  # mean_replies.py MeanReplyRunner (read by register_failed_reducer)
    (TensorPartContainer, "self._input_parts_by_peer"),  # mean_replies.py MeanReplyRunner (its parts' keys)
]
# private class attributes
PRIVATE_CLASS_ATTRIBUTES = [
    (RSAPrivateKey, "_process_wide_key"),  # signing_key.py
    (RSAPrivateKey, "_process_wide_key_lock"),  # signing_key.py
    (serialization, "_BASE_COMPRESSION_TYPES"),  # codec_registry.py, traffic.py (a module's table)
]


def test_hivemind_is_the_version_the_index_was_written_for():
    assert hivemind.__version__ == "1.1.12", REVIEW


@pytest.mark.parametrize(("owner", "name"), PRIVATE_METHODS, ids=lambda value: getattr(value, "__name__", value))
def test_the_private_methods_the_workarounds_override_still_exist(owner, name):
    assert name in vars(owner), f"{owner.__name__}.{name} is gone: {REVIEW}"


@pytest.mark.parametrize(("owner", "name"), PRIVATE_ATTRIBUTES, ids=lambda value: getattr(value, "__name__", value))
def test_the_private_attributes_the_workarounds_use_are_still_set(owner, name):
    assignment = re.escape(name) + r"(: [^=\n]+)? = "  # annotated or not
    assert re.search(assignment, inspect.getsource(owner)), f"{owner.__name__} no longer sets {name}: {REVIEW}"


@pytest.mark.parametrize(("owner", "name"), PRIVATE_CLASS_ATTRIBUTES, ids=str)
def test_the_private_class_attributes_the_workarounds_set_still_exist(owner, name):
    assert name in vars(owner), f"{owner.__name__}.{name} is gone: {REVIEW}"


SIGNING_KEY = "print(RSAPrivateKey.process_wide().get_public_key().to_bytes().decode())"


def signing_key_of_a_process(preamble: str = "") -> str:
    """The public key a fresh Python process signs its DHT records with (after `preamble`)."""
    code = f"from hivemind.utils.crypto import RSAPrivateKey\n{preamble}\n{SIGNING_KEY}"
    result = run_cli([sys.executable, "-c", code], timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_hivemind_alone_signs_with_a_new_key_in_every_process():
    assert signing_key_of_a_process() != signing_key_of_a_process()


def test_a_signing_key_file_keeps_one_key_across_processes(tmp_path):
    path = tmp_path / "identity.key.signing-key"
    load = f"from peer.hivemind_gaps.signing_key import use_signing_key; use_signing_key({str(path)!r})"
    first = signing_key_of_a_process(load)
    assert first == signing_key_of_a_process(load) and first.startswith("ssh-rsa ")
    assert path.stat().st_mode & 0o777 == 0o600  # a private key: its owner's only


def keyword_arguments(method) -> dict[str, str]:
    """The ``name=value`` arguments written in a method's source, one per line as hivemind and we write them."""
    return dict(re.findall(r"^\s+(\w+)=(.+),$", inspect.getsource(method), re.MULTILINE))


def test_our_state_averager_gets_the_arguments_hiveminds_does():
    ours, theirs = (
        keyword_arguments(SwarmOptimizer._make_state_averager),
        keyword_arguments(hivemind.Optimizer._make_state_averager),
    )
    assert theirs and ours == theirs, REVIEW


def test_our_allreduce_builds_its_runner_with_the_arguments_hiveminds_does():
    ours = {name: re.sub(r"\baverager\b", "self", value) for name, value in keyword_arguments(runner_options).items()}
    theirs = keyword_arguments(DecentralizedAverager._run_allreduce_inplace_)
    assert theirs and ours == theirs, REVIEW
    methods = (
        CheckedRounds._run_allreduce_inplace_,
        RobustAggregation._run_allreduce_inplace_,
        CheckedStateRounds._run_allreduce_inplace_,
        MeanReplies._run_allreduce_inplace_,
    )
    for method in methods:  # each builds its runner with start_runner, which passes runner_options
        assert "start_runner(self, " in inspect.getsource(method), REVIEW


def test_a_subclass_of_a_hivemind_averager_renames_its_handlers():
    """Gap 7 on plain hivemind: a subclass's handlers would be ones no plain averager calls."""

    class Subclass(TrainingStateAverager):
        pass

    assert Subclass._get_handle_name("run", "rpc_join_group") != TrainingStateAverager._get_handle_name(
        "run", "rpc_join_group"
    )


@pytest.mark.parametrize(
    ("ours", "hiveminds"),
    [
        (CheckedTrainingStateAverager, TrainingStateAverager),
        (ConsistentTrainingStateAverager, TrainingStateAverager),
        (GuardedTrainingStateAverager, TrainingStateAverager),
        (GuardedGradientAverager, GradientAverager),
        (OuterAverager, DecentralizedAverager),
        (GuardedOuterAverager, DecentralizedAverager),
        (RobustGradientAverager, GradientAverager),
        (GuardedRobustGradientAverager, GradientAverager),
    ],
)
def test_our_averagers_serve_and_call_hiveminds_handler_names(ours, hiveminds):
    for namespace in ("run_state_averager", None):
        assert ours._get_handle_name(namespace, "rpc_download_state") == hiveminds._get_handle_name(
            namespace, "rpc_download_state"
        )


def test_the_index_names_every_module_of_the_room():
    modules = sorted(path.name for path in ROOM.glob("*.py") if path.name != "__init__.py")
    assert [module for module in modules if module not in INDEX] == []


def test_every_test_the_index_cites_exists():
    cited = re.findall(r"(tests/[\w/]+\.py)::\s*(\w+)", INDEX)
    assert len(cited) >= 8
    for path, name in cited:
        assert re.search(rf"^(async )?def {name}\(", (REPO / path).read_text(), re.MULTILINE), f"{path}::{name}"
