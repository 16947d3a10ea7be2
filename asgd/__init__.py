"""asgd: asynchronous SGD on a parameter-server cluster for PyTorch.

    import asgd
    opt = asgd.Optimizer(model.parameters(), optimizer="adamw", lr=3e-4)
    train = asgd.shard(train_set)          # asgd.rank() of asgd.workers()
    asgd.load("runs/x", model)

The public names load on first use (PEP 562), so ``import asgd.cli`` and the launcher load no
torch; docs/library.md describes them.
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "Optimizer": "asgd.optimizer",
    "rank": "asgd.api",
    "workers": "asgd.api",
    "local_rank": "asgd.api",
    "shard": "asgd.api",
    "load": "asgd.api",
    "run_dir": "asgd.api",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'asgd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value        # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
