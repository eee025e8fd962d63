"""The training state a peer serves and averages stays coherent: one epoch's, and the tensors the optimizer uses.

Two gaps in hivemind 1.1.12's ``TrainingStateAverager``, closed here:

- ``get_current_state`` (what a joiner downloads) reads the parameters without waiting for the optimizer step, and
  reads the epoch counter, which ``step`` raises before the optimizer step runs. A joiner arriving mid-step could
  receive epoch e's tensors labelled e + 1, or (optimizer not offloaded) some tensors of epoch e and others of e + 1.
  Here the step and the snapshot exclude each other, and the snapshot is a copy.
- With an offloaded optimizer (the default) the averager averages the optimizer's statistics tensors in place, the
  very tensors it found at start-up. Loading a state (a download from peers, a backup) makes the optimizer replace
  them with new tensors, so from then on this peer's LAMB moments were never averaged again, while its stale copies
  kept being averaged into the other peers' moments. Measured: two peers' ``exp_avg`` 40-100% apart for a whole run
  in which every averaging round succeeded. Here the loaded values are copied into the averaged tensors instead.

tests/peer/test_consistent_state.py shows both on plain hivemind and their absence here. The averager classes that use
this mixin are composed in averagers.py.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading

import torch

logger = logging.getLogger(__name__)


class ConsistentStateMixin:
    """For a TrainingStateAverager: ``get_current_state`` waits for a running ``step`` (epoch increment, delayed
    results, optimizer step); loading a state keeps the averaged optimizer statistics the optimizer's own.

    With ``delay_optimizer_step`` the optimizer step itself runs after ``step`` returns; the snapshot then waits for
    hivemind's optimizer lock, so its tensors still belong to one step, though that step's tensors may be served under
    the next epoch's number (the joiner is then one step behind and catches up as any out-of-sync peer does).
    """

    def __init__(self, *args, **kwargs):
        self._changing_state = threading.RLock()
        super().__init__(*args, **kwargs)

    def step(self, *args, **kwargs):
        with self._changing_state:
            return super().step(*args, **kwargs)

    def get_current_state(self):
        with self._changing_state, self.lock_optimizer:
            metadata, tensors, infos = super().get_current_state()
            # copies: on CPU hivemind's tensors are the live parameters, which it hands to the averager's process
            # (through shared memory) to stream out after this lock is released. Taken under the averaged tensors'
            # lock (in hivemind's own order: after lock_optimizer), so a background state round that averages them
            # in place is wholly before or wholly after the copy
            with self.lock_averaged_tensors:
                return metadata, [tensor.clone() for tensor in tensors], infos

    def load_state_from_peers(self, **kwargs):
        # no _changing_state here: the download may take minutes, and hivemind already applies it under
        # lock_averaged_tensors, which get_current_state takes too. Only the epoch label is set after that lock: a
        # joiner served in between gets the new tensors under the old epoch, is out of sync, and downloads again.
        with self.statistics_kept_in_place():
            return super().load_state_from_peers(**kwargs)

    @contextlib.contextmanager
    def statistics_kept_in_place(self):
        """Around anything that loads optimizer state: afterwards (even after an error) the optimizer again holds
        the very statistics tensors the averager averages in place, now holding the loaded values."""
        try:
            yield
        finally:
            if self.reuse_tensors:  # otherwise hivemind copies the optimizer's tensors into its buffers itself
                self._relink_averaged_statistics()

    @torch.no_grad()
    def _relink_averaged_statistics(self) -> None:
        parameters = [parameter for group in self.optimizer.param_groups for parameter in group["params"]]
        keys = self.opt_keys_for_averaging
        with self.get_tensors() as averaged:  # laid out as hivemind's _local_tensors: parameters, then each key's
            statistics = averaged[len(parameters) : len(parameters) * (1 + len(keys))]
            for (key, parameter), tensor in zip(itertools.product(keys, parameters), statistics):
                state = self.optimizer.state.get(parameter, {})
                loaded = state.get(key)
                if loaded is None:
                    logger.warning(f"The loaded optimizer state has no {key!r} for a parameter: it is left as it was")
                    continue
                if loaded.shape != tensor.shape:
                    raise ValueError(
                        f"loaded optimizer state {key!r} has shape {tuple(loaded.shape)}, "
                        f"the parameter's is {tuple(tensor.shape)}"
                    )
                if loaded is not tensor:
                    tensor.copy_(loaded)
                    state[key] = tensor
