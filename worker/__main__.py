"""``python -m worker``: the same command as ``asgd worker``."""
from worker.command import worker_command

worker_command(prog_name="python -m worker")
