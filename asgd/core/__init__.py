"""The contract and the update maths, shared by every process: the wire protocol, the
parameter layout, the optimizer and schedule, the staleness rules and the checkpoint file. No
sockets and no processes here."""
