"""The trainer peer: joins a hivemind swarm, trains LeanAlbert with hivemind.Optimizer and reports signed progress."""
