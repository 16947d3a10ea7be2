"""Where a server or worker is, and who it is, from the environment: for Kubernetes, Slurm and
docker-compose, whose processes are given variables rather than options.

    rank(None, {"SLURM_PROCID": "3"})                        # Setting(3, "SLURM_PROCID")
    rank(None, {"ASGD_RANK_FROM_HOSTNAME": "1"}, "asgd-worker-2")   # 2, the pod's ordinal
    workers((), {"ASGD_WORKERS": "4"}, "--rank")             # Setting(4, "ASGD_WORKERS")
    with_workers(["optimizer.lr=0.1"], Setting(4, "ASGD_WORKERS"))   # run.workers=4 first
    check_rank(Setting(5, "ASGD_RANK"), 4)                   # EnvError: not in [0, 4)
    server_endpoints(None, {"ASGD_SERVER": "tcp://s0:5555,tcp://s1:5555"})

Every value is resolved the same way: the command-line option, else an ``ASGD_*`` variable,
else Slurm's, else the default. The functions are pure (the environment is an argument) and
each result says where it came from, so an error names the variable to fix. A value that is
not a number, or a rank outside ``[0, run.workers)``, is an ``EnvError``.

| variable | for | meaning |
| --- | --- | --- |
| ``ASGD_SERVER`` | worker | the server's endpoint; a sharded server's, comma-separated |
| ``ASGD_BIND`` | server | the endpoint to bind (``--bind``) |
| ``ASGD_SHARD`` | server | the shard this server serves (``--shard``) |
| ``ASGD_RANK`` | worker | the worker's rank (``--rank``) |
| ``ASGD_RANK_FROM_HOSTNAME`` | worker | ``1``: the rank is the host name's ordinal suffix |
| ``ASGD_WORKERS`` | both | ``run.workers`` (a ``--set run.workers=N`` still wins) |
| ``SLURM_PROCID`` | worker | the rank, when neither of the above gives one |
| ``SLURM_NTASKS`` | worker | ``run.workers``, only when the rank is ``SLURM_PROCID`` |

``SLURM_NTASKS`` counts the tasks of the step that ``SLURM_PROCID`` numbers, so the two are
taken together: a worker given ``--rank`` (``asgd launch`` inside a Slurm job) keeps its
configuration's ``run.workers``, and a server (started as a step of its own, of one task)
never reads them.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SERVER = "ASGD_SERVER"
BIND = "ASGD_BIND"
SHARD = "ASGD_SHARD"
RANK = "ASGD_RANK"
RANK_FROM_HOSTNAME = "ASGD_RANK_FROM_HOSTNAME"
WORKERS = "ASGD_WORKERS"
SLURM_RANK = "SLURM_PROCID"
SLURM_WORLD = "SLURM_NTASKS"
# what a process of a cluster takes from its environment: asgd launch, which passes every
# process its place itself, keeps these from its children
CLUSTER_VARIABLES = (SERVER, BIND, SHARD, RANK, RANK_FROM_HOSTNAME, WORKERS, SLURM_RANK,
                     SLURM_WORLD)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
_ORDINAL = re.compile(r"-(\d+)$")


class EnvError(ValueError):
    """A variable (or option) with a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str     # "--rank", "ASGD_RANK", "SLURM_PROCID", "host name asgd-worker-3", "default"

    def describe(self) -> str:
        """``ASGD_RANK=5``, ``--rank 5``: how a message names where the value came from."""
        if self.source.startswith("--"):
            return f"{self.source} {self.value}"
        if self.source.startswith(("ASGD_", "SLURM_")):
            return f"{self.source}={self.value}"
        return f"{self.value} ({self.source})"


def _named(what: str, setting: Setting) -> str:
    """``--rank 5`` as it is; ``rank ASGD_RANK=5``, ``rank 3 (host name w-3)`` otherwise."""
    text = setting.describe()
    return text if setting.source.startswith("--") else f"{what} {text}"


# ----------------------------------------------------------------------------------------------
# reading one variable

def _get(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, stripped; None when it is unset or empty."""
    text = env.get(name)
    if text is None or not text.strip():
        return None
    return text.strip()


def env_int(env: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    """An integer variable (``minimum`` or more), None when unset or empty."""
    text = _get(env, name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise EnvError(f"{name}={text!r} is not an integer") from None
    if value < minimum:
        raise EnvError(f"{name}={value} must be >= {minimum}")
    return value


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """A yes/no variable: 1/true/yes/on or 0/false/no/off (unset: no)."""
    text = (env.get(name) or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise EnvError(f"{name}={env.get(name)!r}: expected 1 or 0")


def hostname_ordinal(hostname: str) -> int:
    """The ordinal a Kubernetes StatefulSet gives its pod: ``asgd-worker-3`` -> 3 (a domain
    after the first dot is ignored)."""
    name = (hostname or "").strip().split(".")[0]
    m = _ORDINAL.search(name)
    if not m:
        raise EnvError(f"{RANK_FROM_HOSTNAME}=1 but the host name {hostname!r} does not end "
                       f"in -<ordinal> (a StatefulSet pod's name, e.g. asgd-worker-3)")
    return int(m.group(1))


def current_hostname(env: Mapping[str, str]) -> str:
    """``$HOSTNAME`` (a pod's name in Kubernetes), else the system's host name."""
    return _get(env, "HOSTNAME") or socket.gethostname()


# ----------------------------------------------------------------------------------------------
# worker

def rank(option: int | None, env: Mapping[str, str], hostname: str | None = None) -> Setting:
    """``--rank``, else ``ASGD_RANK``, else the host name's ordinal with
    ``ASGD_RANK_FROM_HOSTNAME=1``, else ``SLURM_PROCID``, else 0. Not yet checked against
    run.workers (``check_rank``)."""
    if option is not None:
        if option < 0:
            raise EnvError(f"--rank {option} must be >= 0")
        return Setting(option, "--rank")
    value = env_int(env, RANK)
    if value is not None:
        return Setting(value, RANK)
    if env_flag(env, RANK_FROM_HOSTNAME):
        host = hostname if hostname is not None else current_hostname(env)
        return Setting(hostname_ordinal(host), f"host name {host}")
    value = env_int(env, SLURM_RANK)
    if value is not None:
        return Setting(value, SLURM_RANK)
    return Setting(0, "default")


def _overrides_key(overrides: Sequence[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def workers(overrides: Sequence[str], env: Mapping[str, str],
            rank_source: str | None) -> Setting | None:
    """run.workers from the environment: ``ASGD_WORKERS``, else ``SLURM_NTASKS`` when the
    rank is ``SLURM_PROCID``; None when ``--set run.workers=`` is given or nothing is set
    (the configuration's value stands). ``rank_source`` is None for a server."""
    if _overrides_key(overrides, "run.workers"):
        return None
    value = env_int(env, WORKERS, minimum=1)
    if value is not None:
        return Setting(value, WORKERS)
    if rank_source == SLURM_RANK:
        value = env_int(env, SLURM_WORLD, minimum=1)
        if value is not None:
            return Setting(value, SLURM_WORLD)
    return None


def with_workers(overrides: Sequence[str], setting: Setting | None) -> list[str]:
    """The overrides with ``run.workers=N`` first (so that any ``--set`` still wins)."""
    head = [f"run.workers={setting.value}"] if setting is not None else []
    return head + list(overrides)


def check_rank(rank_: Setting, n_workers: int, workers_: Setting | None = None) -> int:
    """The rank, if it is in ``[0, n_workers)``; EnvError naming both sources otherwise."""
    if 0 <= rank_.value < n_workers:
        return rank_.value
    where = workers_.describe() if workers_ is not None else "the configuration"
    where = f" (run.workers from {where})"
    raise EnvError(f"{_named('rank', rank_)} is not in [0, run.workers={n_workers}){where}")


def server_endpoints(option: str | None, env: Mapping[str, str]) -> Setting | None:
    """``--server``, else ``ASGD_SERVER``: the endpoints as given (comma-separated for the
    shards of a sharded server); None when neither is set."""
    if option is not None and option.strip():
        return Setting(option, "--server")
    text = _get(env, SERVER)
    return Setting(text, SERVER) if text is not None else None


# ----------------------------------------------------------------------------------------------
# server

def bind(option: str | None, env: Mapping[str, str]) -> Setting | None:
    """``--bind``, else ``ASGD_BIND``; None: the configuration's server.bind."""
    if option is not None and option.strip():
        return Setting(option, "--bind")
    text = _get(env, BIND)
    return Setting(text, BIND) if text is not None else None


def shard(option: int | None, env: Mapping[str, str], shards: int) -> int:
    """``--shard``, else ``ASGD_SHARD``, else 0; EnvError unless in ``[0, shards)``."""
    if option is not None:
        got = Setting(option, "--shard")
    else:
        value = env_int(env, SHARD)
        got = Setting(value, SHARD) if value is not None else Setting(0, "default")
    if not 0 <= got.value < shards:
        raise EnvError(f"{_named('shard', got)} is not in [0, server.shards={shards})")
    return got.value


def environ() -> Mapping[str, str]:
    """This process's environment (the one impure call the commands make)."""
    return os.environ
