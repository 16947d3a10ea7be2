"""The asgd worker process: the training loop (it speaks to the server through asgd.client)."""
