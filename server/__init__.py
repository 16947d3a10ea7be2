"""The asgd parameter server: parameter store, request handling, checkpoints, ROUTER loop."""
