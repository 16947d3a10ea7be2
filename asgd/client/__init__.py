"""The client side of asgd: the protocol's ops, the same-host link, the sharded client, and
the data path that moves a model's gradients and weights (what the built-in worker and a
user's own training script both use). Importing this package loads ZeroMQ and msgpack but no
torch; ``Exchange`` (torch) loads when it is first named.

    from asgd.client import Client, ShardedClient, ServerError, ServerTimeout, connect_client
    client = connect_client("tcp://127.0.0.1:5555", worker="w0")     # one server, or shards
    info, weights = client.hello(rank=0)

    from asgd.client import Exchange                # a model's data path (see exchange.py)

Modules: ``ops`` (Client: hello / pull / push / push_pull / stats / bye, the flat form),
``sharded`` (ShardedClient, connect_client), ``exchange`` (Exchange: flat buffers, shared
memory or frames, encodings with error feedback, overlap, resent pushes, local steps'
pseudo-gradient), ``buffers`` (a flat vector held in parts over devices).
"""
from asgd.client.ops import Client, ServerError, ServerTimeout
from asgd.client.sharded import ShardedClient, connect_client

__all__ = ["Client", "Exchange", "ServerError", "ServerTimeout", "ShardedClient",
           "connect_client"]


def __getattr__(name: str):
    if name == "Exchange":        # torch: only for those that move a model's tensors
        from asgd.client.exchange import Exchange

        return Exchange
    raise AttributeError(f"module 'asgd.client' has no attribute {name!r}")
