"""The trainer peer: joins a hivemind swarm, trains LeanAlbert with hivemind.Optimizer and reports signed progress.

Two layers live here. peer/swarm/ (and peer/hivemind_gaps/) is what every node of a run speaks: the run-wide
configuration, the DHT, the optimizer factories, the records and access control; the monitor uses only that layer.
The other modules are the trainer app: ``runtime`` builds a peer, ``train`` runs its loop through the
``training_mode`` seam, with ``backup``, ``report``, ``faults`` and ``lifecycle`` around it.
"""
