"""Exported models: a run's weights in one file, in fp32 or dynamically quantized to INT8.

    path = export_run("runs/x", "model.asgd", int8=True)     # from the run's checkpoint
    model, info = load_model("model.asgd")                   # ready for inference
    classes = predict(model, inputs)                         # (N,) int64
    report = compare(path_fp32, path_int8, ds.x_test, ds.y_test)   # size, latency, accuracy

The file is the checkpoint's container (asgd.core.checkpoint: magic, CRC-32 per frame, written
atomically), never a pickle: frame 0 a msgpack header (``kind: asgd-model``, the model's name,
args, input shape and classes, the precision, and the quantization of each INT8 tensor), then
one raw frame per tensor of the model's ``state_dict``. An INT8 file holds each weight of an
``nn.Linear`` and ``nn.LSTM`` as int8 values with its scale and zero point (per tensor,
symmetric: torch's default dynamic qconfig); biases and everything else stay float32.

INT8 here is torch.ao's *dynamic* quantization: weights stored in int8, activations quantized
on the fly, per batch. It applies to ``nn.Linear`` and ``nn.LSTM``; convolutions stay fp32
(dynamic quantization has no convolution kernels), so a CNN only gains on its linear head.
Loading rebuilds the float model from the header (a user model, ``package.module:factory``,
must import as at training time), loads the tensors, quantizes it with
``quantize_dynamic`` and then sets every quantized weight to the stored int8 values exactly.
"""
from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from asgd.core import protocol
from asgd.core.checkpoint import CheckpointError, read_frames, write_frames

FORMAT = 1
KIND = "asgd-model"
QUANTIZABLE = {nn.Linear, nn.LSTM}     # what quantize_dynamic replaces
PRECISIONS = ("fp32", "int8")


class ExportError(ValueError):
    """A run that cannot be exported, or a file that is not an exported model."""


# ----------------------------------------------------------------------------------------------
# building

def trained_model(run_dir, checkpoint_dir=None):
    """(model, cfg, checkpoint) of a run: its model rebuilt from the checkpoint's config
    (``init_from`` and ``freeze`` included) with the checkpoint's weights, in eval mode."""
    from asgd.config import from_dict
    from asgd import rundir
    from asgd.core.checkpoint import load_checkpoint
    from asgd.tasks.task import build_task

    run_dir = Path(run_dir)
    ckpt = load_checkpoint(rundir.checkpoint_dir(run_dir, checkpoint_dir))
    cfg = from_dict(ckpt.config)
    task = build_task(cfg, data=False)
    ckpt.layout.check_same(task.layout, "checkpoint's", "configured model's")
    task.layout.load_into(task.model, ckpt.flat)
    return task.model.eval(), cfg, task, ckpt


def quantize(model: nn.Module) -> nn.Module:
    """``model`` with its Linear and LSTM layers dynamically quantized to int8 (a copy)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():   # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, QUANTIZABLE, dtype=torch.qint8, inplace=False)


def _quantized_weights(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """name (as in the float model's state_dict) -> quantized weight tensor, of every
    dynamically quantized Linear and LSTM in ``qmodel``."""
    from torch.ao.nn.quantized import dynamic as nnqd

    out = {}
    for mname, m in qmodel.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, nnqd.Linear):
            w, _ = m._weight_bias()
            out[prefix + "weight"] = w
        elif isinstance(m, nnqd.LSTM):
            for k, w in m._weight_bias()["weight"].items():
                out[prefix + k] = w
    return out


def _set_quantized_weights(qmodel: nn.Module, qweights: dict[str, torch.Tensor]) -> None:
    """Replace the packed weights of ``qmodel``'s quantized layers by ``qweights``."""
    from torch.ao.nn.quantized import dynamic as nnqd

    done = set()
    for mname, m in qmodel.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, nnqd.Linear):
            _, b = m._weight_bias()
            m.set_weight_bias(qweights[prefix + "weight"], b)
            done.add(prefix + "weight")
        elif isinstance(m, nnqd.LSTM):
            wb = m._weight_bias()
            d = {**wb["bias"], **{k: qweights[prefix + k] for k in wb["weight"]}}
            m.set_weight_bias(d)
            done.update(prefix + k for k in wb["weight"])
    left = set(qweights) - done
    if left:
        raise ExportError(f"int8 tensors without a quantized layer: {', '.join(sorted(left))}")


# ----------------------------------------------------------------------------------------------
# writing and reading

def write_model(path, model: nn.Module, model_cfg, input_shape, num_classes: int,
                int8: bool = False, source: dict | None = None) -> Path:
    """Write ``model`` (float) to ``path`` in fp32, or quantized to INT8; returns the path."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    quant, tensors = {}, []
    if int8:
        qweights = _quantized_weights(quantize(model.cpu().eval()))
        for name, q in qweights.items():
            if q.qscheme() not in (torch.per_tensor_symmetric, torch.per_tensor_affine):
                raise ExportError(f"{name}: quantization scheme {q.qscheme()} not supported")
            quant[name] = {"scale": float(q.q_scale()), "zero_point": int(q.q_zero_point())}
    for name, t in state.items():
        if name in quant:
            tensors.append((name, qweights[name].int_repr().contiguous()))
        else:
            tensors.append((name, t.to(torch.float32).contiguous()
                            if t.is_floating_point() else t.contiguous()))
    header = {"kind": KIND, "format": FORMAT, "precision": "int8" if int8 else "fp32",
              "model": {"name": model_cfg.name, "args": dict(model_cfg.args)},
              "input_shape": list(input_shape), "num_classes": int(num_classes),
              "quantized": quant, "source": source or {}}
    path = Path(path)
    write_frames(path, protocol.encode(header, tensors))
    return path


def read_model(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, name -> tensor) of an exported model file, checksums verified."""
    try:
        header, tensors = protocol.decode(read_frames(Path(path)))
    except (CheckpointError, protocol.ProtocolError) as e:
        raise ExportError(str(e)) from None
    if header.get("kind") != KIND:
        raise ExportError(f"{path} is not an exported asgd model (asgd export writes one)")
    if header.get("format") != FORMAT or header.get("precision") not in PRECISIONS:
        raise ExportError(f"{path}: unsupported model format {header.get('format')!r} / "
                          f"precision {header.get('precision')!r}")
    return header, {t.name: t.to_torch().clone() for t in tensors}


def load_model(path) -> tuple[nn.Module, dict]:
    """(model ready for inference, header) from an exported model file."""
    from asgd.tasks.models import model_factory

    header, tensors = read_model(path)
    m = header["model"]
    model = model_factory(m["name"])(tuple(header["input_shape"]), header["num_classes"],
                                     **m["args"])
    quant = header.get("quantized") or {}
    qweights = {}
    state = {}
    for name, t in tensors.items():
        if name in quant:
            q = quant[name]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qweights[name] = torch._make_per_tensor_quantized_tensor(
                    t.to(torch.int8), q["scale"], q["zero_point"])
            state[name] = qweights[name].dequantize()
        else:
            state[name] = t
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path} does not fit model {m['name']!r}: {e}") from None
    model.eval()
    if header["precision"] == "int8":
        model = quantize(model)
        _set_quantized_weights(model, qweights)
        model.eval()
    return model, header


def export_run(run_dir, out=None, int8: bool = False, checkpoint_dir=None) -> Path:
    """Export a run's checkpoint to ``out`` (default ``<run>/model-fp32.asgd`` or
    ``model-int8.asgd``); returns the path."""
    model, cfg, task, ckpt = trained_model(run_dir, checkpoint_dir)
    out = Path(out) if out else Path(run_dir) / f"model-{'int8' if int8 else 'fp32'}.asgd"
    return write_model(out, model, cfg.model, task.input_shape, task.num_classes, int8,
                       source={"run": str(Path(run_dir).resolve()), "version": ckpt.version})


# ----------------------------------------------------------------------------------------------
# inference

def read_inputs(path, input_shape) -> torch.Tensor:
    """Inputs from a .npy file (N, *input_shape), or a .csv / .txt file of one flattened
    sample a row, as a float32 tensor (N, *input_shape)."""
    import numpy as np

    path = Path(path)
    try:
        if path.suffix == ".npy":
            a = np.load(path, allow_pickle=False)
        elif path.suffix in (".csv", ".txt"):
            a = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None,
                           dtype=np.float32, ndmin=2)
        else:
            raise ExportError(f"{path}: inputs must be .npy, .csv or .txt")
    except (OSError, ValueError) as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"cannot read inputs {path}: {e}") from None
    size = 1
    for d in input_shape:
        size *= d
    if a.ndim == 0 or a.size % size or a.size == 0:
        raise ExportError(f"{path}: {a.shape} does not hold samples of shape "
                          f"{list(input_shape)}")
    return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32)).reshape(-1, *input_shape)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The predicted class of every sample of ``x``: (N,) int64."""
    out = [model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


@torch.no_grad()
def batch_latency(model: nn.Module, x: torch.Tensor, batch_size: int, repeats: int = 5,
                  min_batches: int = 20) -> float:
    """Median over ``repeats`` of the mean seconds per batch of ``batch_size`` (one warm-up
    pass first), over at least ``min_batches`` batches each."""
    batches = [x[i:i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
    batches = batches or [x]
    while len(batches) < min_batches:
        batches = batches * 2
    for b in batches[:3]:
        model(b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            model(b)
        times.append((time.perf_counter() - t) / len(batches))
    return statistics.median(times)


def compare(fp32_path, int8_path, x, y, batch_size: int = 100, repeats: int = 5) -> dict:
    """File size, per-batch latency (median of ``repeats``, measured alternately) and
    accuracy on (x, y) of an fp32 and an INT8 export of the same model."""
    from asgd.tasks.evaluate import evaluate

    out = {"batch_size": batch_size, "repeats": repeats, "threads": torch.get_num_threads()}
    models = {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        model, _ = load_model(path)
        models[name] = model
        acc, loss = evaluate(model, x, y)
        out[name] = {"file": str(path), "bytes": Path(path).stat().st_size,
                     "test_accuracy": acc, "test_loss": loss}
    lat = {"fp32": [], "int8": []}
    for _ in range(repeats):      # alternate, so that drift in the machine hits both alike
        for name in ("fp32", "int8"):
            lat[name].append(batch_latency(models[name], x, batch_size, repeats=1))
    for name in lat:
        out[name]["latency_ms"] = statistics.median(lat[name]) * 1e3
    out["size_ratio"] = out["fp32"]["bytes"] / out["int8"]["bytes"]
    out["latency_ratio"] = out["fp32"]["latency_ms"] / out["int8"]["latency_ms"]
    out["accuracy_drop"] = out["fp32"]["test_accuracy"] - out["int8"]["test_accuracy"]
    return out


def other_precision_name(name: str, int8: bool) -> str:
    """The file ``asgd export --report`` writes beside ``name`` for the other precision:
    model-int8.asgd -> model-fp32.asgd (and back), m.asgd -> m-fp32.asgd."""
    stem, suffix = Path(name).stem, Path(name).suffix
    mine, other = ("int8", "fp32") if int8 else ("fp32", "int8")
    return f"{stem.removesuffix(f'-{mine}')}-{other}{suffix}"


def report_both(run_dir, path: Path, int8: bool, checkpoint_dir=None, batch_size: int = 100,
                repeats: int = 5) -> dict:
    """``asgd export --report``: the other precision exported beside ``path`` (the file just
    written), then both compared on the run's test split (``compare``)."""
    from asgd.config import from_dict
    from asgd.core.checkpoint import load_checkpoint
    from asgd.rundir import checkpoint_dir as find_checkpoint
    from asgd.tasks.data import load_dataset

    torch.set_num_threads(1)
    other = path.with_name(other_precision_name(path.name, int8))
    other = export_run(run_dir, other, int8=not int8, checkpoint_dir=checkpoint_dir)
    cfg = from_dict(load_checkpoint(find_checkpoint(run_dir, checkpoint_dir)).config)
    ds = load_dataset(cfg.data, seed=cfg.run.seed)
    fp32, q8 = (other, path) if int8 else (path, other)
    return compare(fp32, q8, ds.x_test, ds.y_test, batch_size, repeats)
