"""``asgd eval``, ``asgd export`` and ``asgd predict``: what is done with a run's trained model.

    asgd eval runs/<name>                          # its checkpoint on the held-out split
    asgd export runs/<name> --int8 --report        # INT8 model file, size/latency/accuracy
    asgd predict runs/<name>/model-int8.asgd inputs.npy

Registered by ``asgd.cli`` when it loads: nothing here imports torch until a command runs
(the work is asgd.tasks.evaluate's and asgd.tasks.export's).
"""
from __future__ import annotations

import json

import click


def echo(text: str, err: bool = False) -> None:
    from asgd.commandline import echo as cli_echo      # survives a closed pipe

    cli_echo(text, err)


@click.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="A checkpoint folder other than <run_dir>/checkpoint.")
def eval_cmd(run_dir, checkpoint):
    """Evaluate a run's checkpoint on the held-out split."""
    from asgd.tasks.evaluate import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(run_dir, checkpoint)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e))
    click.echo(json.dumps(result, indent=2, allow_nan=False))


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--int8", is_flag=True, help="Dynamically quantize nn.Linear and nn.LSTM to int8 "
              "(convolutions stay fp32).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The model file (default: <run_dir>/model-fp32.asgd or model-int8.asgd).")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="A checkpoint folder other than <run_dir>/checkpoint.")
@click.option("--report", is_flag=True, help="Also export the other precision and print the "
              "size, per-batch latency and test accuracy of fp32 against int8 as JSON.")
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True,
              help="--report: the batch whose latency is measured.")
@click.option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True,
              help="--report: latency is the median of this many passes over the test split.")
def export_cmd(run_dir, int8, out, checkpoint, report, batch_size, repeats):
    """Write a run's trained model to one file (fp32, or INT8 with --int8), for asgd predict.

    Not a pickle: the checkpoint's container of named raw tensors with a msgpack header."""
    from asgd.tasks.export import export_run, report_both

    try:
        path = export_run(run_dir, out, int8=int8, checkpoint_dir=checkpoint)
        if not report:
            echo(json.dumps({"file": str(path), "bytes": path.stat().st_size,
                             "precision": "int8" if int8 else "fp32"}))
            return
        result = report_both(run_dir, path, int8, checkpoint, batch_size, repeats)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e))
    echo(json.dumps(result, indent=2, allow_nan=False))


@click.command("predict")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the classes here (.npy, or one a line for any other name) instead "
                   "of printing them.")
@click.option("--batch-size", type=click.IntRange(1), default=1000, show_default=True)
def predict_cmd(model_file, inputs, out, batch_size):
    """Run an exported model (asgd export) on INPUTS (.npy, or .csv / .txt of one flattened
    sample a row) and print the predicted class of each, one a line."""
    from pathlib import Path

    from asgd.tasks.export import load_model, predict, read_inputs

    try:
        import numpy as np
        import torch

        torch.set_num_threads(1)
        model, header = load_model(model_file)
        x = read_inputs(inputs, header["input_shape"])
        classes = predict(model, x, batch_size).numpy()
        if out is None:
            echo("\n".join(str(int(c)) for c in classes))
        elif Path(out).suffix == ".npy":
            np.save(out, classes, allow_pickle=False)
        else:
            Path(out).write_text("".join(f"{int(c)}\n" for c in classes))
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e))
    if out is not None:
        echo(f"{len(classes)} predictions ({header['precision']}) written to {out}", err=True)
