"""hivemind 1.1.12's gaps and the workarounds for them (the index is written in the next commit)."""
