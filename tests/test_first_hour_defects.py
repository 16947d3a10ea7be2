"""The first hour's defects (issue 23), each on what a new user runs: misspelt keys, data
sets the built-in loop cannot train, CUDA asked for where there is none, a worker that cannot
train, the live display, the help texts, the experiments' summary, the export's file names
and a server's spent budget."""
from __future__ import annotations

import pytest
import torch

from asgd.config import ConfigError, load_config


# ----------------------------------------------------------------------------------------------
# a misspelt key

# a misspelt override, and the key it means
MEANT = {"optimizr.lr=1": "optimizer.lr", "optimizer.lrr=1": "optimizer.lr",
         "run.max_update=10": "run.max_updates", "data.augmnt.shift=1": "data.augment.shift"}


@pytest.mark.parametrize("override", MEANT)
def test_a_misspelt_override_gets_a_did_you_mean(override):
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(None, [override])
    assert f"did you mean {MEANT[override]}?" in str(e.value)


def test_a_misspelt_yaml_key_gets_a_did_you_mean(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean optimizer.lr[?]"):
        load_config(path)
    path.write_text("optimizr:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean optimizer[?]"):
        load_config(path)
    path.write_text("optimizer:\n  zzzzzz: 0.1\n")
    with pytest.raises(ConfigError) as e:     # nothing close: no guess
        load_config(path)
    assert "did you mean" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# help texts, the experiments' summary, the export's file names

def test_the_help_names_every_experiment(processes):
    from asgd.experiments.cli import experiment

    top = processes.run(["-m", "asgd.cli", "--help"], timeout=60)
    sub = processes.run(["-m", "asgd.cli", "experiment", "--help"], timeout=60)
    assert top.returncode == 0 and sub.returncode == 0
    line = next(x for x in top.stdout.splitlines() if x.strip().startswith("experiment "))
    intro = sub.stdout.split("Options:")[0]
    assert set(experiment.commands) >= {"staleness", "straggler", "throughput", "local-steps",
                                        "report"}
    for name in experiment.commands:
        assert name in line, top.stdout
        assert name in " ".join(intro.split()), sub.stdout
    assert "..." not in line                     # whole, not cut to the column


def test_the_summary_prints_staleness_maxima_as_integers(tmp_path):
    from asgd.config import Config
    from asgd.experiments.report import summary_table
    from asgd.experiments.spec import Experiment

    records = [{"policy": "none", "workers": 2, "local_steps": 1, "slow_factor": 1.0,
                "delay_s": 0.0, "status": "ok", "test_accuracy": acc, "samples_per_s": 9000.0,
                "updates_per_s": 90.0, "staleness_mean": 1.25, "staleness_max": m,
                "bytes_moved": 2_000_000} for acc, m in ((0.9, 5), (0.91, 7), (0.92, 6))]
    table = summary_table(Experiment("staleness", Config(), [], tmp_path, 1000, 0.9, 60),
                          records)
    row = next(x for x in table.splitlines() if x.startswith("| none"))
    assert "| 6 (5–7) |" in row and "5.000" not in row, row
    assert "| 1.250 (1.250–1.250) |" in row              # means keep their decimals


@pytest.mark.slow
def test_export_report_writes_the_other_precision_under_its_own_name(processes, tmp_path,
                                                                     mnist1d_cached):
    from asgd.config import from_dict
    from tests import conftest

    run = conftest.train_run(tmp_path / "run", from_dict(
        {"model": {"name": "mlp", "args": {"hidden": [16]}},
         "run": {"max_updates": 20, "workers": 1}}), 20)
    r = processes.run(["-m", "asgd.cli", "export", str(run), "--int8", "--report",
                       "--repeats", "1"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in run.glob("*.asgd")) == ["model-fp32.asgd", "model-int8.asgd"]
    r = processes.run(["-m", "asgd.cli", "export", str(run), "--out", str(tmp_path / "m.asgd"),
                       "--report", "--repeats", "1"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m-int8.asgd").exists()


# ----------------------------------------------------------------------------------------------
# a server started by hand says when its budget is spent

@pytest.mark.slow
def test_a_server_started_by_hand_says_once_that_its_budget_is_spent(start_server, make_config,
                                                                      processes):
    import time

    config = make_config(run={"workers": 1, "max_updates": 30})
    server = start_server(config)
    worker = processes.run(["-m", "worker", "--config", str(config), "--server",
                            server.endpoint, "--quiet"], timeout=120)
    assert worker.returncode == 0, worker.stderr
    deadline = time.monotonic() + 30          # its status comes every few seconds
    while "budget spent" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    assert server.stop() == 0
    (line,) = [x for x in server.log().splitlines() if "budget spent" in x]
    assert "reached run.max_updates 30" in line


# ----------------------------------------------------------------------------------------------
# the live display

def test_the_progress_bar_is_text_not_markup():
    import io
    import time

    from rich.console import Console

    from asgd.config import Config
    from asgd.launch.display import Display, Monitor

    display = Display(Config(), quiet=True)
    display.console = Console(file=io.StringIO(), width=100, force_terminal=True,
                              color_system=None)
    mon = Monitor(Config(), time.time())
    mon.updates = 1500
    display.console.print(display.render(mon))
    out = display.console.file.getvalue()
    assert "[###############---------------]  updates 1500/3000" in out, out


def test_samples_per_s_counts_local_steps_and_updates_stop_at_the_budget():
    import time

    from asgd.config import Config
    from asgd.launch.display import Monitor

    cfg = Config().replace(**{"worker.exchange.local_steps": 4, "worker.batch_size": 50,
                              "run.max_updates": 3000})
    mon = Monitor(cfg, time.time())
    for pushes in (10, 30):
        mon.update_stats({"version": 3001, "staleness_mean": 0.0,
                          "workers": {"w0": {"pushes": pushes}}})
        time.sleep(0.05)
    (t0, p0), (t1, p1) = mon._first, mon._last
    assert mon.samples_per_s == pytest.approx((p1 - p0) * 200 / (t1 - t0))
    mon.finish_training()
    assert mon.samples_per_s == pytest.approx(20 * 50 * 4 / (t1 - t0))
    assert mon.line().startswith("updates 3000/3000")


def run_on_a_terminal(args, env, cwd, timeout_s: float) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal (as a user's shell would);
    its exit code and everything it wrote. Bounded by ``timeout_s``."""
    import os
    import pty
    import select
    import subprocess
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env=dict(env, TERM="xterm", COLUMNS="120", LINES="40"), cwd=cwd,
                            start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:          # the terminal closed: every writer is gone
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.poll() is not None or proc.wait(timeout=10) is not None, \
            out.decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        os.close(master)
    return proc.returncode, out.decode(errors="replace")


def test_a_launch_on_a_terminal_keeps_its_bar_and_counts_local_steps(child_env, tmp_path,
                                                                      mnist1d_cached):
    import json
    import re
    import sys

    code, out = run_on_a_terminal(
        [sys.executable, "-m", "asgd.cli", "launch", "--set", f"run.out_dir={tmp_path}",
         "--set", "model.args={channels: 8}", "--set", "worker.batch_size=50",
         "--set", "worker.exchange.local_steps=8", "--set", "run.max_updates=100",
         "--set", "worker.batch_split=false",        # the budget as given: 100 pushes
         "--set", "run.eval_every_s=0"], child_env, tmp_path, timeout_s=240)
    assert code == 0, out[-3000:]
    assert re.search(r"\[#+-*\]  updates \d+/100", out), out[-3000:]     # the bar, drawn
    shown = [int(n) for n in re.findall(r"updates (\d+)/100", out)]
    assert shown and max(shown) == 100, shown                             # never 101/100
    summary = json.loads(out[out.index("{"):out.index("}") + 1])
    live = int(re.findall(r"([\d,]+) samples/s", out)[-1].replace(",", ""))
    # the display's rate and the summary's measure the same training over slightly
    # different windows; without the local steps the display was 8x lower
    assert 1 / 3 < live / summary["samples_per_s"] < 3, (live, summary, out[-2000:])


# ----------------------------------------------------------------------------------------------
# data sets and models the built-in loop cannot train: refused before anything starts

USER_DATA = '''
import numpy as np
import torch.nn as nn

rng = np.random.default_rng(0)
X, XT = rng.normal(size=(200, 8)), rng.normal(size=(50, 8))


def classes():
    return {"x_train": X, "y_train": rng.integers(0, 3, 200), "x_test": XT,
            "y_test": rng.integers(0, 3, 50)}


def regression():          # targets in [0, 1): trained as classes before, "accuracy 1.0"
    return {"x_train": X, "y_train": rng.random(200), "x_test": XT, "y_test": rng.random(50)}


def negative():
    return {"x_train": X, "y_train": rng.integers(-1, 3, 200), "x_test": XT,
            "y_test": rng.integers(0, 3, 50)}


def too_many():            # a label past num_classes
    return dict(classes(), num_classes=2)


def mse():
    return dict(classes(), loss="mse")


def unknown_key():
    return dict(classes(), task="regression")


def one_output(input_shape, num_classes):   # a regression head: one output, not one per class
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 1))
'''

CANNOT = [
    ("userdata:regression", [], "y_train holds 200 values that are not whole numbers"),
    ("userdata:negative", [], "y_train holds negative labels (e.g. -1)"),
    ("userdata:too_many", [], "holds label 2 but num_classes is 2"),
    ("userdata:mse", [], "asks for loss 'mse'"),
    ("userdata:classes", ["--set", "model.name=userdata:one_output"],
     "gives (2, 1) for a batch of 2 inputs, not (2, 3)"),
]


@pytest.mark.parametrize("data, extra, message", CANNOT, ids=[c[0] for c in CANNOT])
def test_what_the_builtin_loop_cannot_train_is_refused_before_the_start(processes, tmp_path,
                                                                       data, extra, message):
    (tmp_path / "userdata.py").write_text(USER_DATA)
    result = processes.run(["-m", "asgd.cli", "launch", "--quiet", "--set",
                            f"run.out_dir={tmp_path / 'runs'}", "--set", f"data.name={data}",
                            "--set", "model.name=mlp", *extra], timeout=120)
    assert result.returncode != 0
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error:"), err
    assert message in err, err
    assert "asgd.Optimizer" in err and "asgd launch --workers 2 train.py" in err, err
    assert "docs/library.md" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_dict_with_a_key_asgd_does_not_know_is_refused(processes, tmp_path):
    (tmp_path / "userdata.py").write_text(USER_DATA)
    result = processes.run(["-m", "asgd.cli", "launch", "--quiet", "--set",
                            f"run.out_dir={tmp_path / 'runs'}", "--set",
                            "data.name=userdata:unknown_key", "--set", "model.name=mlp"],
                           timeout=120)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "with keys asgd does not know: task" in result.stderr, result.stderr
    assert "docs/data.md" in result.stderr


@pytest.mark.slow
def test_a_worker_and_a_server_refuse_it_at_their_start(processes, tmp_path, make_config):
    (tmp_path / "userdata.py").write_text(USER_DATA)
    config = make_config(data={"name": "userdata:regression"}, model={"name": "mlp",
                                                                      "args": {}})
    worker = processes.run(["-m", "asgd.cli", "worker", "--config", str(config), "--server",
                            "tcp://127.0.0.1:9", "--rank", "0"], timeout=120)
    assert worker.returncode == 2
    assert "not whole numbers" in worker.stderr and "asgd.Optimizer" in worker.stderr
    assert "Traceback" not in worker.stderr and "waiting for the server" not in worker.stderr
    server = processes.run(["-m", "asgd.cli", "server", "--config", str(config), "--bind",
                            "tcp://127.0.0.1:0"], timeout=120)
    assert server.returncode == 1
    assert "not whole numbers" in server.stderr and "Traceback" not in server.stderr


def test_the_contract_takes_what_it_can_train():
    import numpy as np
    import torch

    from asgd.tasks.contract import check_arrays

    x = np.zeros((4, 3), dtype=np.float64)
    for y in (np.array([0, 1, 2, 1]), np.array([0.0, 1.0, 2.0, 1.0]),   # whole floats: labels
              torch.tensor([0, 1, 2, 1]), [0, 1, 2, 1], np.array([0, 1, 1, 0], dtype=np.uint8)):
        xs, ys, xt, yt, k = check_arrays("d", x, y, x, y)
        assert ys.dtype == torch.int64 and xs.dtype == torch.float32 and k == int(ys.max()) + 1
    assert check_arrays("d", x, [0, 1, 0, 1], x, [0, 1, 0, 1], num_classes=10)[4] == 10
    for bad, message in (([0, 1, 2], "not one label per sample"),
                         ([["a"]] * 4, "not one label per sample"),
                         (["a", "b", "c", "d"], "not integer class labels"),
                         ([0.0, float("nan"), 1.0, 1.0], "not whole numbers"),
                         ([0, 0, 0, 0], "a classifier needs 2")):
        with pytest.raises(ValueError, match=message):
            check_arrays("d", x, bad, x, bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_arrays("d", x + np.nan, [0, 1, 0, 1], x, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="x_test's"):
        check_arrays("d", x, [0, 1, 0, 1], np.zeros((4, 2)), [0, 1, 0, 1])


# ----------------------------------------------------------------------------------------------
# CUDA asked for where there is none

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@no_cuda
@pytest.mark.parametrize("setting", ["worker.device=cuda", "worker.device=cuda:1",
                                     "worker.stages.devices=[cpu, cuda:0]"])
def test_cuda_where_there_is_none_is_one_line_and_no_run_directory(processes, tmp_path,
                                                                   setting):
    result = processes.run(["-m", "asgd.cli", "launch", "--quiet", "--set",
                            f"run.out_dir={tmp_path / 'runs'}", "--set", setting], timeout=120)
    assert result.returncode != 0
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err, err
    assert setting.split("=")[0] in err and "worker.device=cpu" in err
    assert not (tmp_path / "runs").exists()


@no_cuda
def test_the_launchers_checks_leave_cuda_uninitialised():
    from asgd.config import Config
    from asgd.launch.launcher import LaunchError, check_before_start

    check_before_start(Config())
    with pytest.raises(LaunchError, match="CUDA is not available"):
        check_before_start(Config().replace(**{"worker.device": "cuda:{local_rank}"}))
    assert not torch.cuda.is_initialized()      # forked children could not use it otherwise


# ----------------------------------------------------------------------------------------------
# a worker that cannot train is not restarted

@pytest.mark.slow
def test_a_worker_that_exits_2_ends_the_launch_failed_with_its_message(processes, tmp_path,
                                                                       mnist1d_cached):
    import json

    processes.env = dict(processes.env, ASGD_FAULT="bogus")   # the worker refuses it: exit 2
    result = processes.run(["-m", "asgd.cli", "launch", "--quiet", "--set",
                            f"run.out_dir={tmp_path / 'runs'}", "--set", "run.name=r",
                            "--set", "model.args={channels: 8}"], timeout=180)
    assert result.returncode == 1, result.stderr
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["restarts"] == [], summary
    assert summary["diverged"] == [], summary               # untrained, not "at chance"
    assert summary["failures"], summary
    for failure in summary["failures"]:
        assert "cannot train (exit 2, not restarted)" in failure, failure
        assert "ASGD_FAULT='bogus': expected exit:STEP" in failure, failure
    assert "ASGD_FAULT='bogus'" in result.stderr and "restarting" not in result.stderr


def test_the_data_factory_in_docs_data_md_holds_the_contract(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from asgd.tasks.task import check_task

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    (tmp_path / "mydata.py").write_text(re.findall(r"```python\n(.*?)```", text, re.S)[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = check_task(load_config(None, ["data.name=mydata:make", "data.args={n: 2000}",
                                         "model.name=mlp"]))
    assert task.num_classes == 4 and tuple(task.dataset.x_train.shape) == (1600, 20)
    assert "asgd launch --workers 2 train.py" in text and "(library.md)" in text
