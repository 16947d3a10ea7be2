"""User code by import path, resolved alike in every process of a run.

    factory = import_object("mymodel:make", "model")      # ValueError with a clear message
    check_arguments(factory, {"width": 3}, "model 'mymodel:make'", "model.args", fixed=2)

A path ``package.module:name`` is imported with the current working folder on ``sys.path``
(as ``python -m`` would), so a ``mymodel.py`` beside the user resolves in the ``asgd`` command
itself as it does in the server and worker processes it starts there.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys


def import_object(path: str, what: str):
    """``package.module:name`` -> the object, with a clear error when it is not there."""
    if ":" not in path:
        raise ValueError(f"unknown {what} {path!r}: not a registered name nor "
                         "'package.module:factory'")
    module_name, attr = path.split(":", 1)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {path!r}: cannot import {module_name}: {e} (looked in the "
                         f"current folder {cwd} and the installed packages)") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{what} {path!r}: {module_name} has no {attr}") from None


def check_arguments(factory, args: dict, what: str, key: str, fixed: int = 0) -> None:
    """ValueError naming ``what``, the arguments it does not take and the ones it does, when
    ``factory`` cannot be called with ``fixed`` positional arguments and ``args``."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return   # a builtin or C callable: let the call itself complain
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = [p for p in params[fixed:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = [p.name for p in named]
    unknown = sorted(set(args) - set(takes))
    if unknown:
        raise ValueError(f"{what} does not take {', '.join(unknown)} ({key}); it takes "
                         f"{', '.join(takes) if takes else 'no arguments'}")
    missing = [p.name for p in named if p.default is p.empty and p.name not in args]
    if missing:
        raise ValueError(f"{what} needs {', '.join(missing)} in {key}")
