"""What every command shares, the ``asgd`` command line's and the server's and worker's
(server/command.py, worker/command.py): one-line errors for a bad endpoint or configuration,
output that survives a closed pipe, and a fast exit once a process's work is written.

Click and the configuration only: no torch, nothing of asgd.launch (the sides may import it).
"""
from __future__ import annotations

import os
import sys

import click

from asgd.config import ConfigError, load_config


def silence(stream) -> None:
    """Point a dead stream's descriptor at /dev/null so later writes (and the interpreter's
    final flush) do not fail again."""
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError):
        pass


def echo(text: str, err: bool = False) -> None:
    """click.echo that survives a closed pipe (``asgd launch | head``): the run's result is
    in its run directory whatever became of the terminal."""
    try:
        click.echo(text, err=err)
    except (BrokenPipeError, OSError):
        silence(sys.stderr if err else sys.stdout)


def endpoint_or_exit(text: str, option: str, bind: bool = False) -> str:
    from asgd.core.endpoint import parse_endpoint

    try:
        return parse_endpoint(text, bind=bind)
    except ValueError as e:
        echo(f"Error: {option}: {e}", err=True)     # one line, the usage's exit code
        sys.exit(2)


def config_or_exit(path, overrides):
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise click.ClickException(str(e))


def split_or_exit(cfg):
    """``cfg`` as its built-in workers train it (asgd.config.split_batch), or exit with the
    reason it cannot be split."""
    from asgd.config import split_batch

    try:
        return split_batch(cfg)
    except ConfigError as e:
        raise click.ClickException(str(e))


def fast_exit(code: int) -> None:
    """Exit a server or worker process once its work is written: streams and logs flushed,
    then ``os._exit``, skipping interpreter teardown (torch's takes most of a second, and the
    launcher waits for it)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
