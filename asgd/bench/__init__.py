"""Benchmarks of the transport: asgd's push_pull against what the wire and torch RPC allow."""
