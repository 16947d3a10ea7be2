"""The asgd worker: server client, training loop."""
