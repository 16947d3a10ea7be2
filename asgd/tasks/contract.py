"""What the built-in training loop can train: the contract of a data set and a model
(docs/data.md), checked before any process starts and again in each process that loads them.

    x, y, x_test, y_test, k = check_arrays("mydata:make", x, y, x_test, y_test)
    splits = returned_splits("mydata:make", factory())    # a dict a data factory returned
    check_outputs(model, "mymodel:make", x[:2], k)       # one logit per class
    cuda_names(cfg)                                      # the CUDA devices a config asks for

The built-in loop (worker/train.py) trains a classifier with cross-entropy: inputs of one
shape, finite; labels whole numbers in [0, K); a model that maps a batch of B inputs to
(B, K) logits. Anything else (regression targets in [0, 1), negative labels, a loss other than
cross-entropy, a model whose outputs are not one per class) would train to something
meaningless or crash a worker, so it is refused here with one line that says what is wrong
and where to go instead: ``asgd.Optimizer`` in a training script of one's own
(docs/library.md), which takes any model, data and loss. Torch is imported only by the
checks that need it: ``cuda_names`` tells without it whether there is anything to check.
"""
from __future__ import annotations

import numpy as np

OWN_LOOP = ("to train anything else, use asgd.Optimizer in your own training script, run by "
            "`asgd launch --workers 2 train.py` (docs/library.md)")
CLASSIFIER = "the built-in training loop trains classifiers (integer labels in [0, K), " \
             "cross-entropy)"
SPLITS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("num_classes", "loss")
LOSSES = ("cross_entropy",)


def cannot_train(what: str) -> ValueError:
    """The one-line refusal of something the built-in loop cannot train."""
    return ValueError(f"{what}; {CLASSIFIER}; {OWN_LOOP}")


def returned_splits(name: str, ds) -> tuple:
    """(x_train, y_train, x_test, y_test, num_classes, loss) of the dict a data factory
    returned; ValueError naming what is missing or unknown."""
    if not isinstance(ds, dict):
        raise ValueError(f"data set {name!r} returned {type(ds).__name__}: a data factory "
                         "returns a dict of x_train, y_train, x_test, y_test (optionally "
                         "num_classes) or an asgd.tasks.data.Dataset (docs/data.md)")
    missing = [k for k in SPLITS if k not in ds]
    unknown = sorted(str(k) for k in set(ds) - set(SPLITS) - set(OPTIONAL))
    if missing or unknown:
        raise ValueError(f"data set {name!r} returned a dict "
                         + (f"without {', '.join(missing)}" if missing else "")
                         + (" and " if missing and unknown else "")
                         + (f"with keys asgd does not know: {', '.join(unknown)}" if unknown
                            else "")
                         + f"; it takes {', '.join(SPLITS)} and optionally "
                           f"{', '.join(OPTIONAL)} (docs/data.md)")
    return (*(ds[k] for k in SPLITS), ds.get("num_classes"), ds.get("loss"))


def _numpy(a) -> np.ndarray:
    import torch

    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _inputs(name: str, key: str, x) -> np.ndarray:
    x = _numpy(x)
    if x.dtype.kind not in "biuf" or x.ndim < 2 or len(x) == 0:
        raise ValueError(f"data set {name!r}: {key} must be a non-empty array of numbers, one "
                         f"row per sample, got {x.dtype} of shape {tuple(x.shape)} "
                         "(docs/data.md)")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"data set {name!r}: {key} holds {int((~np.isfinite(x)).sum()):,} "
                         "NaN or infinite values")
    return x


def _labels(name: str, key: str, y, n: int) -> np.ndarray:
    """``y`` as int64 class labels, one per sample of ``n``; ValueError (cannot_train) for
    anything but whole numbers >= 0 (floats that are whole, such as 3.0, are labels)."""
    y = _numpy(y)
    if y.ndim != 1 or len(y) != n:
        raise cannot_train(f"data set {name!r}: {key} has shape {tuple(y.shape)}, not one "
                           f"label per sample ({n},)")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise cannot_train(f"data set {name!r}: {key} holds {int(bad.sum()):,} values "
                               f"that are not whole numbers (e.g. {y[bad][0]:g}), not class "
                               "labels")
    elif y.dtype.kind not in "biu":
        raise cannot_train(f"data set {name!r}: {key} holds {y.dtype} values, not integer "
                           "class labels")
    if y.min() < 0:
        raise cannot_train(f"data set {name!r}: {key} holds negative labels (e.g. "
                           f"{y.min():g})")
    return y.astype(np.int64)


def check_arrays(name: str, x, y, xt, yt, num_classes=None, loss=None) -> tuple:
    """(x_train, y_train, x_test, y_test, K) as float32 and int64 tensors from array-likes
    (numpy, torch, lists), or ValueError: inputs non-empty, of one shape, finite; labels
    whole numbers in [0, K), K = ``num_classes`` or the largest label + 1, at least 2;
    ``loss`` None or cross_entropy."""
    import torch

    if loss not in (None, *LOSSES):
        raise cannot_train(f"data set {name!r} asks for loss {loss!r}, which the built-in "
                           "training loop does not have")
    x, xt = _inputs(name, "x_train", x), _inputs(name, "x_test", xt)
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"data set {name!r}: x_train's samples have shape {x.shape[1:]} but "
                         f"x_test's {xt.shape[1:]}")
    y, yt = _labels(name, "y_train", y, len(x)), _labels(name, "y_test", yt, len(xt))
    top = int(max(y.max(), yt.max()))
    if num_classes is not None and (isinstance(num_classes, bool) or
                                    not float(num_classes).is_integer()):
        raise ValueError(f"data set {name!r}: num_classes is {num_classes!r}, not a whole "
                         "number")
    k = int(num_classes) if num_classes is not None else top + 1
    if k < 2:
        raise cannot_train(f"data set {name!r} has {k} class{'' if k == 1 else 'es'} "
                           "(num_classes, or the largest label + 1); a classifier needs 2")
    if top >= k:
        raise cannot_train(f"data set {name!r} holds label {top} but num_classes is {k}")
    x, xt = (torch.as_tensor(a, dtype=torch.float32).contiguous() for a in (x, xt))
    return x, torch.as_tensor(y), xt, torch.as_tensor(yt), k


def check_outputs(model: "torch.nn.Module", name: str, x: torch.Tensor, num_classes: int) -> None:
    """ValueError unless ``model`` maps the batch ``x`` to (len(x), num_classes) logits. Run
    without gradients in eval mode (no running statistics move), then back in its mode."""
    import torch

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:       # the user's forward: any error is "cannot take these inputs"
        raise ValueError(f"model {name!r} cannot take a batch of the data set's inputs "
                         f"(shape {tuple(x.shape)}): {type(e).__name__}: {e}") from None
    finally:
        model.train(training)
    want = (len(x), num_classes)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != want:
        raise cannot_train(f"model {name!r} gives {got} for a batch of {len(x)} inputs, not "
                           f"{want}: one logit per class of the data set's {num_classes}")


def cuda_names(cfg) -> list[tuple[str, str]]:
    """(key, device) of every CUDA device the workers are asked to run on (worker.device,
    worker.stages.devices): cuda, cuda:N, N, with {local_rank} for N. Needs no torch."""
    asked = [("worker.device", cfg.worker.device)] + \
        [("worker.stages.devices", d) for d in (cfg.worker.stages.devices or [])]
    return [(k, d) for k, d in asked if isinstance(d, str) and
            (d.startswith("cuda") or d.replace("{local_rank}", "0").isdigit())]
