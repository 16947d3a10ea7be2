"""``python -m server``: the same command as ``asgd server``."""
from server.command import server_command

server_command(prog_name="python -m server")
