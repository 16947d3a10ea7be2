"""`asgd launch [options] SCRIPT [ARGS...]`: a user's script as each worker, on real processes.

Each test writes a small script into its temporary folder and launches it with the real
launcher and server on loopback: the variables the script sees, its output prefixed with its
rank and kept one file per worker, a failing script's traceback and the summary's account of
how each worker ended, a killed script started again, the run ending when every script has
exited, and a script that is not there refused before anything starts. The scripts here need
no model from the server (the launch's config names one), so they test the launch alone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from asgd.core.checkpoint import load_checkpoint
from asgd.launch.processes import run_to_end
from tests.test_deploy import SRUN

RUN_TIMEOUT_S = 120.0

pytestmark = pytest.mark.timeout(180)

# a server with a small model of its own: the scripts below never connect to it
CONFIG = {"model": {"name": "mlp"}, "data": {"name": "synthetic"},
          "run": {"name": "s", "max_updates": 100000, "max_seconds": 0, "eval_every_s": 0,
                  "max_restarts": 1}}

ENV_SCRIPT = """
import json, os, sys
names = ["ASGD_SERVER", "ASGD_RANK", "ASGD_WORKERS", "ASGD_LOCAL_RANK", "ASGD_RUN_DIR",
         "ASGD_CONFIG", "ASGD_SERVER_FILE", "OMP_NUM_THREADS"]
print("seen " + json.dumps({"env": {n: os.environ.get(n) for n in names},
                            "argv": sys.argv[1:]}))
print("no newline at the end", end="")
"""


def setup(tmp_path: Path, script: str, name: str = "train.py", **run) -> Path:
    cfg = {**CONFIG, "run": {**CONFIG["run"], **run}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / name).write_text(script)
    return tmp_path / "runs" / "s"


def launch(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return run_to_end(["-m", "asgd.cli", "launch", "--config", "c.yaml", "--quiet", *args],
                      RUN_TIMEOUT_S, env=env, cwd=tmp_path)


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def seen_lines(text: str) -> dict[int, dict]:
    """The ``seen`` line of each rank in the launcher's output, by rank."""
    out = {}
    for line in text.splitlines():
        if line.startswith("[rank ") and "] seen " in line:
            rank = int(line[len("[rank "):line.index("]")])
            out[rank] = json.loads(line.split("] seen ", 1)[1])
    return out


@pytest.mark.slow
def test_script_sees_its_place_and_arguments_and_its_output_is_prefixed_and_kept(
        tmp_path, child_env):
    run_dir = setup(tmp_path, ENV_SCRIPT)
    env = {k: v for k, v in child_env.items() if k != "OMP_NUM_THREADS"}
    env["ASGD_RANK"] = "7"       # a shell's own must not reach the scripts
    res = launch(tmp_path, env, "--workers", "2", "train.py", "--workers", "5", "-x")
    assert res.returncode == 0, res.stderr
    summary = summary_of(run_dir)
    assert summary["status"] == "ok"
    server = (run_dir / "server.addr").read_text().strip()
    cores = len(os.sched_getaffinity(0))
    seen = seen_lines(res.stderr)
    assert sorted(seen) == [0, 1], res.stderr
    for rank, got in seen.items():
        # everything after the script is the script's, asgd's own option names included
        assert got["argv"] == ["--workers", "5", "-x"]
        assert got["env"] == {"ASGD_SERVER": server, "ASGD_RANK": str(rank),
                              "ASGD_WORKERS": "2", "ASGD_LOCAL_RANK": str(rank),
                              "ASGD_RUN_DIR": str(run_dir.resolve()),
                              "ASGD_CONFIG": str(run_dir.resolve() / "config.yaml"),
                              "ASGD_SERVER_FILE": str(run_dir.resolve() / "server.addr"),
                              "OMP_NUM_THREADS": str(max(1, cores // 2))}
        log = (run_dir / "logs" / f"worker-{rank}.log").read_text()
        assert log.startswith("seen ") and json.loads(log.splitlines()[0][5:]) == got
        # a last line without a newline still reaches the output, once
        assert res.stderr.count(f"[rank {rank}] no newline at the end") == 1
    assert [e["exit_code"] for e in summary["worker_exits"]] == [0, 0]
    assert summary["test_accuracy"] is None and "no model in the launcher" in \
        summary["evaluation"]
    assert summary["script"] == [str((tmp_path / "train.py").resolve()), "--workers", "5",
                                 "-x"]


@pytest.mark.slow
def test_user_threads_are_kept(tmp_path, child_env):
    run_dir = setup(tmp_path, ENV_SCRIPT)
    res = launch(tmp_path, dict(child_env, OMP_NUM_THREADS="3"), "--workers", "1", "train.py")
    assert res.returncode == 0, res.stderr
    assert seen_lines(res.stderr)[0]["env"]["OMP_NUM_THREADS"] == "3"
    assert summary_of(run_dir)["workers"] == 1


FAILING_SCRIPT = """
import os
print("starting", flush=True)
if os.environ["ASGD_RANK"] == "1":
    def deep():
        raise ValueError("the data file is missing")
    deep()
"""


@pytest.mark.slow
def test_failing_script_shows_its_traceback_and_the_summary_says_how_it_ended(
        tmp_path, child_env):
    run_dir = setup(tmp_path, FAILING_SCRIPT, max_restarts=1)
    res = launch(tmp_path, child_env, "--workers", "2", "train.py")
    assert res.returncode == 1
    err = res.stderr
    # the traceback, every line of it with the rank, twice: first run and its one restart
    assert err.count("[rank 1] Traceback (most recent call last):") == 2, err
    assert err.count("[rank 1] ValueError: the data file is missing") == 2
    assert "[rank 0] Traceback" not in err
    assert "worker 1 died (exit 1)" in err and "restarting worker 1" in err
    assert "error: worker 1 died (exit 1) after all 1 restarts" in err
    summary = summary_of(run_dir)
    assert summary["status"] == "failed"
    ends = {e["rank"]: e for e in summary["worker_exits"]}
    assert ends[0]["exit_code"] == 0 and ends[0]["restarts"] == 0 and ends[0]["deaths"] == []
    assert ends[1]["exit_code"] == 1 and ends[1]["restarts"] == 1
    assert ends[1]["deaths"] == [1, 1]
    # kept in the worker's own file, the restart's run appended to the first's
    log = (run_dir / "logs" / "worker-1.log").read_text()
    assert log.count("ValueError: the data file is missing") == 2
    assert "Traceback" not in (run_dir / "logs" / "worker-0.log").read_text()


KILLED_SCRIPT = """
import os, pathlib, sys, time
here = pathlib.Path(sys.argv[1])
if os.environ["ASGD_RANK"] == "0" and not (here / "started").exists():
    (here / "started").write_text("")
    (here / "pid.tmp").write_text(str(os.getpid()))
    os.replace(here / "pid.tmp", here / "pid")
    time.sleep(100)                 # killed before this ends
    sys.exit(5)
print("rank", os.environ["ASGD_RANK"], "done", flush=True)
"""


def start_launch(tmp_path, child_env) -> subprocess.Popen:
    """``asgd launch --workers 2 train.py TMP`` in ``tmp_path``, in its own session."""
    return subprocess.Popen(
        [sys.executable, "-m", "asgd.cli", "launch", "--config", "c.yaml", "--quiet",
         "--workers", "2", "train.py", str(tmp_path)], cwd=tmp_path, env=child_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_killed_script_is_restarted_and_the_run_ends_ok(tmp_path, child_env):
    run_dir = setup(tmp_path, KILLED_SCRIPT, max_restarts=1)
    launcher = start_launch(tmp_path, child_env)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (tmp_path / "pid").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, \
                launcher.communicate()[1]
            time.sleep(0.05)
        os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)
        out, err = launcher.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)
    assert launcher.returncode == 0, err
    assert "worker 0 died (exit -9, SIGKILL)" in err and "restarting worker 0" in err
    assert "[rank 0] rank 0 done" in err and "[rank 1] rank 1 done" in err
    summary = summary_of(run_dir)
    assert summary["status"] == "ok"
    ends = {e["rank"]: e for e in summary["worker_exits"]}
    assert ends[0] == {**ends[0], "exit_code": 0, "restarts": 1, "deaths": [-9]}
    assert ends[1] == {**ends[1], "exit_code": 0, "restarts": 0, "deaths": []}


ENDING_SCRIPT = """
import os, time
from asgd.metrics import MetricsWriter
rank = int(os.environ["ASGD_RANK"])
# what opt.log(loss=...) writes, without a model on the server
metrics = MetricsWriter(os.path.join(os.environ["ASGD_RUN_DIR"], "metrics.jsonl"))
for step in (1, 2):
    metrics.write("worker_step", worker=f"w{rank}", rank=rank, step=step, loss=rank + step / 10)
metrics.close()
time.sleep(0.5 * rank)              # the workers end one after the other
print("bye", flush=True)
"""


@pytest.mark.slow
def test_run_ends_when_every_script_has_exited_and_the_server_checkpoints(tmp_path,
                                                                          child_env):
    run_dir = setup(tmp_path, ENDING_SCRIPT)
    res = launch(tmp_path, child_env, "--workers", "3", "train.py")
    assert res.returncode == 0, res.stderr
    summary = summary_of(run_dir)
    assert summary["status"] == "ok" and summary["workers"] == 3
    assert [e["exit_code"] for e in summary["worker_exits"]] == [0, 0, 0]
    # far from its budget of 100,000 updates: the scripts ended the run, not the server
    assert summary["version"] == 0
    assert load_checkpoint(run_dir / "checkpoint").version == 0
    assert summary["checkpoint_version"] == 0
    assert all(f"[rank {r}] bye" in res.stderr for r in range(3))
    # each worker's last logged figures
    assert {w: (v["step"], v["loss"]) for w, v in summary["logged"].items()} == \
        {"w0": (2, 0.2), "w1": (2, 1.2), "w2": (2, 2.2)}
    kinds = [json.loads(line)["kind"] for line in
             (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "script" in kinds and "worker_died" not in kinds


def test_missing_script_is_refused_before_anything_starts(tmp_path, child_env):
    setup(tmp_path, "print('never')")
    for args in (["nope.py"], ["--workers", "2", "nope.py", "--lr", "1"]):
        res = launch(tmp_path, child_env, *args)
        assert res.returncode == 1
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert lines == [f"Error: cannot run the script nope.py: it does not exist "
                         f"(in {tmp_path})"], res.stderr
        assert res.stdout == ""
    (tmp_path / "folder").mkdir()
    res = launch(tmp_path, child_env, "folder")
    assert "it is a folder without __main__.py" in res.stderr and res.returncode == 1
    assert not (tmp_path / "runs").exists()      # no run directory, no server was started


# ----------------------------------------------------------------------------------------------
# across machines: the same script, the same variables, next to `asgd server`

REPO = Path(__file__).resolve().parents[1]


def test_script_config_file_is_the_launchs_default():
    from asgd.config import load_config
    from asgd.launch.scripts import script_config

    assert load_config(REPO / "configs" / "script.yaml") == script_config(None, [])
    cfg = script_config(None, ["run.workers=3"])
    assert cfg.model.name == "" and cfg.run.max_updates == 0 and cfg.run.workers == 3
    # a user's script trains at a constant rate unless it (or the config) gives a schedule
    assert (cfg.schedule.kind, cfg.schedule.warmup) == ("constant", 0)


def test_script_config_file_stands_over_the_script_defaults(tmp_path):
    from asgd.config import ConfigError
    from asgd.launch.scripts import script_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"server": {"policy": "none"}, "run": {"workers": 3}}))
    cfg = script_config(path, ["run.max_updates=50"])
    assert cfg.server.policy == "none" and cfg.run.workers == 3 and cfg.model.name == ""
    assert (cfg.schedule.kind, cfg.schedule.warmup, cfg.run.max_updates) == ("constant", 0, 50)
    path.write_text(yaml.safe_dump({"schedule": {"kind": "cosine"}}))
    assert (script_config(path, []).schedule.kind, script_config(path, []).schedule.warmup) \
        == ("cosine", 0)
    path.write_text(yaml.safe_dump({"schedule": {"kind": "nope"}}))
    with pytest.raises(ConfigError, match="schedule.kind"):
        script_config(path, [])


def server_of(argv: list[str], env: dict):
    """The config and bind address `asgd server ARGV` runs with in ``env``."""
    from asgd.cli import cli
    from asgd.config import load_config
    from asgd.config import env as envlib

    assert argv[:2] == ["asgd", "server"]
    params = cli.get_command(None, "server").make_context("server", argv[2:]).params
    overrides = envlib.with_workers(params["overrides"],
                                    envlib.workers(params["overrides"], env, None))
    cfg = load_config(REPO / params["config_path"], overrides)
    return cfg, envlib.bind(params["bind"], env).value


def check_script_workers(commands: list[list[str]], envs: list[dict], server_host: str,
                         bind: str) -> None:
    """Each worker runs an existing script with python, and reads from its environment the
    rank 0..N-1, N workers and the server's address, as asgd.Optimizer will."""
    from asgd import api
    from asgd.config import env as envlib

    for argv in commands:
        assert argv[0] == "python" and (REPO / argv[1]).is_file(), argv
    ranks = sorted(api.rank(e) for e in envs)
    assert ranks == list(range(len(envs)))
    assert {api.workers(e) for e in envs} == {len(envs)}
    for e in envs:
        endpoint = envlib.server_endpoints(None, e).value
        assert endpoint == f"tcp://{server_host}:{bind.rsplit(':', 1)[1]}"


def test_compose_file_runs_the_script_next_to_a_server_that_learns_the_model():
    import shlex
    import shutil

    doc = yaml.safe_load((REPO / "docker-compose.script.yml").read_text())
    services = {k: (shlex.split(v["command"]),
                    {e: str(x) for e, x in (v.get("environment") or {}).items()})
                for k, v in doc["services"].items()}
    (server_argv, server_env), = [v for k, v in services.items() if k == "server"]
    cfg, bind = server_of(server_argv, server_env)
    assert cfg.model.name == "" and bind == "tcp://0.0.0.0:5555"
    workers = [v for k, v in services.items() if k != "server"]
    check_script_workers([a for a, _ in workers], [e for _, e in workers], "server", bind)
    assert cfg.run.workers == len(workers)
    if shutil.which("docker-compose") is not None:        # the tool's own reading of it
        res = subprocess.run(["docker-compose", "-f", "docker-compose.script.yml", "config",
                              "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr


def test_k8s_statefulset_runs_the_script_against_the_server_service():
    docs = list(yaml.safe_load_all((REPO / "deploy/k8s/script/workers.yaml").read_text()))
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["metadata"]["name"] == sts["spec"]["serviceName"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= \
        sts["spec"]["template"]["metadata"]["labels"].items()
    container, = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    server = [d for d in yaml.safe_load_all((REPO / "deploy/k8s/server.yaml").read_text())
              if d and d["kind"] == "Service"]
    name = sts["metadata"]["name"]
    pods = [dict(env, HOSTNAME=f"{name}-{i}") for i in range(sts["spec"]["replicas"])]
    argv = container["command"]
    assert container["workingDir"] == "/app"          # where the image keeps examples/
    check_script_workers([argv] * len(pods), pods, server[0]["metadata"]["name"],
                         "tcp://0.0.0.0:5555")
    assert server[0]["spec"]["ports"][0]["port"] == 5555


# srun: a stub that records what it was asked to start (a script worker runs "python")


def run_sbatch(tmp_path: Path, ntasks: int, *args: str):
    """deploy/slurm/script.sbatch run by bash from the repository, srun and scontrol
    replaced by stubs that record what they were asked to start."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN.format(python=sys.executable, worker="python")),
                       ("scontrol", "#!/bin/sh\necho node1; echo node2; echo node3\n")):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o700)
    log = tmp_path / "srun.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ASGD_"))}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", STUB_LOG=str(log),
               SLURM_JOB_ID="42", SLURM_NTASKS=str(ntasks), SLURM_JOB_NODELIST="node[1-3]",
               SLURM_CPUS_PER_TASK="2", ASGD_RUN_DIR=str(tmp_path / "run"))
    res = subprocess.run(["bash", str(REPO / "deploy/slurm/script.sbatch"), *args], cwd=REPO,
                         env=env, text=True, capture_output=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return res, calls


def test_sbatch_runs_the_script_as_each_worker_next_to_the_server(tmp_path):
    res, calls = run_sbatch(tmp_path, 4, "examples/lm.py", "--steps", "600")
    assert res.returncode == 0, res.stderr
    (server,), (workers,) = ([c for c in calls if ("asgd" in c["argv"]) == s]
                             for s in (True, False))
    argv = server["argv"][server["argv"].index("asgd"):]
    cfg, bind = server_of(argv, server["env"])
    assert cfg.model.name == "" and cfg.run.workers == 3
    i = workers["argv"].index("python")
    assert workers["argv"][:i] == ["--ntasks=3", "--exact", "--label"]
    command = workers["argv"][i:]
    assert command == ["python", "examples/lm.py", "--steps", "600"]
    envs = [dict(workers["env"], SLURM_PROCID=str(r), SLURM_NTASKS="3") for r in range(3)]
    check_script_workers([command] * 3, envs, "node1", bind)


@pytest.mark.parametrize("args, message", [
    ((), "usage: sbatch deploy/slurm/script.sbatch SCRIPT"),
    (("nope.py",), "cannot run the script nope.py: it does not exist")])
def test_sbatch_refuses_a_missing_script_before_starting_anything(tmp_path, args, message):
    res, calls = run_sbatch(tmp_path, 3, *args)
    assert res.returncode == 2 and message in res.stderr and calls == []


SLEEPING_SCRIPT = """
import os, pathlib, sys, time
here = pathlib.Path(sys.argv[1])
(here / f"pid-{os.environ['ASGD_RANK']}").write_text(str(os.getpid()))
print("sleeping", flush=True)
time.sleep(100)                     # until the launcher is interrupted
"""


def test_ctrl_c_stops_the_scripts_and_the_server_and_writes_the_summary(tmp_path, child_env):
    run_dir = setup(tmp_path, SLEEPING_SCRIPT)
    launcher = start_launch(tmp_path, child_env)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not all((tmp_path / f"pid-{r}").exists() for r in (0, 1)):
            assert launcher.poll() is None and time.monotonic() < deadline, \
                launcher.communicate()[1]
            time.sleep(0.05)
        pids = [int((tmp_path / f"pid-{r}").read_text()) for r in (0, 1)]
        launcher.send_signal(signal.SIGINT)           # what Ctrl-C sends
        out, err = launcher.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)
    assert launcher.returncode == 1 and "interrupted" in err
    for pid in pids:                                   # the scripts are gone
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted" and summary["interrupted"]
    assert [e["signal"] for e in summary["worker_exits"]] == ["SIGTERM", "SIGTERM"]
    assert load_checkpoint(run_dir / "checkpoint").version == 0    # the server's, at its stop


@pytest.mark.slow
def test_scripts_on_ray(tmp_path, child_env):
    pytest.importorskip("ray")
    run_dir = setup(tmp_path, ENV_SCRIPT)
    res = run_to_end(["-m", "asgd.cli", "launch", "--config", "c.yaml", "--quiet", "--on",
                      "ray", "--num-cpus", "2", "--workers", "2", "train.py", "-x"],
                     RUN_TIMEOUT_S, env=dict(child_env, RAY_AUTH_MODE="disabled"),
                     cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = summary_of(run_dir)
    assert summary["status"] == "ok" and summary["on"] == "ray"
    assert [e["exit_code"] for e in summary["worker_exits"]] == [0, 0]
    seen = seen_lines(res.stderr)
    server = (run_dir / "server.addr").read_text().strip()
    assert {r: (s["env"]["ASGD_RANK"], s["env"]["ASGD_SERVER"], s["argv"])
            for r, s in seen.items()} == {0: ("0", server, ["-x"]), 1: ("1", server, ["-x"])}


@pytest.mark.slow
def test_resume_goes_on_with_a_script_run_in_its_run_directory(tmp_path, child_env):
    run_dir = setup(tmp_path, ENV_SCRIPT)
    first = launch(tmp_path, child_env, "--workers", "1", "train.py", "first")
    assert first.returncode == 0, first.stderr
    res = run_to_end(["-m", "asgd.cli", "launch", "--quiet", "--resume", "runs/s", "train.py",
                      "second"], RUN_TIMEOUT_S, env=child_env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = summary_of(run_dir)
    assert summary["status"] == "ok" and summary["resumed_from"] == [0]
    assert json.loads((run_dir / "summary-1.json").read_text())["script"][1:] == ["first"]
    assert summary["script"][1:] == ["second"]
    # the resumed launch shows its own script's output, not the first one's again
    assert [s["argv"] for s in seen_lines(res.stderr).values()] == [["second"]]
    assert (run_dir / "logs" / "worker-0.log").read_text().count("seen ") == 2


def test_options_before_the_script_are_asgds_and_everything_after_it_the_scripts():
    from asgd.cli import cli

    ctx = cli.commands["launch"].make_context(
        "launch", ["--workers", "2", "--set", "run.max_restarts=0", "train.py", "--help",
                   "--workers", "3", "--set", "lr=1"])
    assert ctx.params["workers"] == "2" and ctx.params["overrides"] == ("run.max_restarts=0",)
    assert ctx.params["script"] == "train.py"
    assert ctx.params["script_args"] == ("--help", "--workers", "3", "--set", "lr=1")
