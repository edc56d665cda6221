"""relay-worker: local listeners on the compute node, streams multiplexed on carriers."""
