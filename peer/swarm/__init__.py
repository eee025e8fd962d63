"""What every node of a run speaks: the trainer peers and the monitor both build on this, and only on this.

- config.py: the run-wide settings (``SwarmConfig``: joining; ``OptimConfig``: the optimizer every node must share);
  flags.py and field_docs.py: how any node's config dataclasses are read from flags and ALBERT_* variables.
- dht.py: starting this process's hivemind DHT node and joining the swarm.
- optimizer.py: the optimizer and scheduler factories, so every copy of the training state has one layout.
- progress.py: the signed per-epoch progress records; run_record.py and run_key.py: the run's signed identity;
  scores.py: the signed per-epoch scores robust reducers give the senders (centered_clip.py: the aggregator).
- manifest.py, manifest_protocol.py, join_string.py: the run manifest the monitor signs and serves over p2p, and the
  join string that leads a peer to it (peer/join.py adopts it; monitor/manifest_server.py serves it).
- access.py, access_tokens.py, join_client.py: closed runs (tokens, member list, admission).
- finite.py: the finiteness check every node applies before keeping or sharing numbers.

Workarounds of hivemind's own gaps live next door, in peer/hivemind_gaps/; the trainer app (runtime, training loop,
backups, reports, lifecycle) is the rest of peer/, and the monitor imports none of it.
"""
