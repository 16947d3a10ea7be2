"""Fault runs: the default `asgd launch` run, with a worker (or the server) killed by SIGKILL
at a random moment of training, N times over.

    python bench/faults.py workers --runs 10          # a random worker killed in each run
    python bench/faults.py server --runs 10           # the server killed in each run
    python bench/faults.py server --runs 3 --seed 7 --set worker.request_timeout_s=5

Each run is `asgd launch` of configs/default.yaml (3,000 updates, two workers) in its own run
directory under ``--out``. Once training has started, the run is killed at a version drawn
uniformly from [10%, 90%] of run.max_updates with a seeded generator (run i uses seed + i),
watched through the workers' ``worker_step`` records; the victim is the launcher's child
``python -m worker --rank R`` (R drawn too) or ``python -m server``. The server runs add
``server.checkpoint_every`` (100 unless ``--set`` says otherwise) so there is a checkpoint to
resume from.

Per run it prints the status, the test accuracy, the deaths and restarts from summary.json,
and for the server runs, from metrics.jsonl: the last version recorded before the kill (by
the server's ``server`` records, the workers' ``worker_step`` and the launcher's
``server_died``), the checkpoint version it resumed from, the lowest version recorded after the restart
(by the server's ``server`` records and the workers' ``worker_rejoined``), whether that ever
went back past the checkpoint, and whether every checkpoint was readable (at the restart,
and the final one). Then one JSON line with the totals.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_ACCURACY = 0.93
RUN_TIMEOUT_S = 600.0


def children(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the processes whose parent is ``pid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{d}/cmdline").read_bytes().decode().split("\0")
        except (OSError, IndexError):
            continue
        if int(stat[1]) == pid:
            out.append((int(d), argv))
    return out


def find_victim(launcher: int, mode: str, rank: int) -> int | None:
    for pid, argv in children(launcher):
        if "-m" not in argv or argv.index("-m") + 1 >= len(argv):
            continue
        module = argv[argv.index("-m") + 1]
        if mode == "server" and module == "server":
            return pid
        if mode == "workers" and module == "worker" and "--rank" in argv and \
                argv[argv.index("--rank") + 1] == str(rank):
            return pid
    return None


def records(path: Path) -> list[dict]:
    out = []
    try:
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    except OSError:
        pass
    return out


def latest_version(path: Path, pos: int) -> tuple[int, int]:
    """The highest version in ``worker_step`` records from byte ``pos`` on, and the new pos."""
    best = -1
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            chunk = f.read()
    except OSError:
        return best, pos
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") == "worker_step":
            best = max(best, r.get("version", -1))
    return best, pos + end


def one_run(mode: str, i: int, seed: int, out: Path, overrides: list[str]) -> dict:
    rng = random.Random(seed + i)
    name = f"{mode}-{seed}-{i}"
    run_dir = out / name
    budget = 3000
    for o in overrides:
        if o.startswith("run.max_updates="):
            budget = int(o.split("=", 1)[1])
    kill_at = rng.randint(int(0.1 * budget), int(0.9 * budget))
    rank = rng.randrange(2)
    args = [sys.executable, "-m", "asgd.cli", "launch", "--quiet",
            "--config", str(REPO / "configs" / "default.yaml"),
            "--set", f"run.out_dir={out}", "--set", f"run.name={name}"]
    if mode == "server" and not any(o.startswith("server.checkpoint_every=") for o in overrides):
        args += ["--set", "server.checkpoint_every=100"]
    for o in overrides:
        args += ["--set", o]
    started = time.monotonic()
    launcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO)
    metrics, pos, killed, seen = run_dir / "metrics.jsonl", 0, None, -1
    try:
        while launcher.poll() is None and killed is None:
            if time.monotonic() - started > RUN_TIMEOUT_S:
                break
            v, pos = latest_version(metrics, pos)
            seen = max(seen, v)
            if seen >= kill_at:
                victim = find_victim(launcher.pid, mode, rank)
                if victim is not None:
                    os.kill(victim, signal.SIGKILL)
                    killed = {"pid": victim, "version_seen": seen}
            time.sleep(0.02)
        out_text, err_text = launcher.communicate(
            timeout=max(1.0, RUN_TIMEOUT_S - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        launcher.send_signal(signal.SIGINT)
        out_text, err_text = launcher.communicate(timeout=120)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    recs = records(metrics)
    row = {
        "run": name, "kill_at": kill_at, "killed": killed is not None,
        "victim": "server" if mode == "server" else f"worker {rank}",
        "status": summary.get("status", f"no summary (exit {launcher.returncode})"),
        "exit": launcher.returncode,
        "test_accuracy": summary.get("test_accuracy"),
        "deaths": len(summary.get("deaths", [])),
        "restarts": len(summary.get("restarts", [])),
        "wall_s": summary.get("wall_s"),
        "version": summary.get("version"),
        "reported": "died" in err_text and "restarting" in err_text,
    }
    if mode == "server":
        died = [r for r in recs if r["kind"] == "server_died"]
        restarted = [r for r in recs if r["kind"] == "server_restarted"]
        if died and restarted:
            t_died, t_back = died[0]["t"], restarted[0]["t"]
            # the last version recorded before the kill: the server's own records (every
            # server.stats_every_s), the workers' steps and the launcher's last stats
            before = [r["version"] for r in recs if r["t"] <= t_died and
                      r["kind"] in ("server", "worker_step", "server_died")]
            resumed = restarted[0].get("resumed_version")
            after = [r["version"] for r in recs if r["t"] >= t_back and
                     r["kind"] in ("server", "worker_rejoined")]
            row.update(version_before_kill=max(before) if before else None,
                       checkpoint_version=resumed,
                       lowest_after=min(after) if after else None,
                       went_back=bool(after and resumed is not None and min(after) < resumed),
                       checkpoint_readable="checkpoint_error" not in restarted[0]
                       and summary.get("test_accuracy") is not None)
        else:
            row.update(version_before_kill=None, checkpoint_version=None, lowest_after=None,
                       went_back=None, checkpoint_readable=None)
    row["ok"] = bool(row["killed"] and row["status"] == "ok" and row["test_accuracy"] is not None
                     and row["test_accuracy"] >= TARGET_ACCURACY and row["deaths"] >= 1
                     and row["restarts"] >= 1 and row["reported"]
                     and (mode != "server" or (row["went_back"] is False
                                               and row["checkpoint_readable"])))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["workers", "server"])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    if a.out:
        out = Path(a.out).resolve()
    else:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix=f"asgd-faults-{a.mode}-"))
    out.mkdir(parents=True, exist_ok=True)
    cols = ["run", "victim", "kill_at", "status", "test_accuracy", "deaths", "restarts", "wall_s"]
    if a.mode == "server":
        cols += ["version_before_kill", "checkpoint_version", "lowest_after", "went_back",
                 "checkpoint_readable"]
    print("| " + " | ".join(cols) + " |", flush=True)
    print("|" + "---|" * len(cols), flush=True)
    rows = []
    for i in range(a.runs):
        row = one_run(a.mode, i, a.seed, out, a.overrides)
        rows.append(row)
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) and c == "test_accuracy" else
                 f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        print("| " + " | ".join(cells) + " |", flush=True)
    accs = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    total = {
        "mode": a.mode, "runs": len(rows), "seed": a.seed, "out": str(out),
        "ok": sum(r["status"] == "ok" for r in rows),
        "reached_target": sum(r["test_accuracy"] is not None and
                              r["test_accuracy"] >= TARGET_ACCURACY for r in rows),
        "target": TARGET_ACCURACY,
        "accuracy_min": min(accs) if accs else None,
        "accuracy_median": statistics.median(accs) if accs else None,
        "deaths": sum(r["deaths"] for r in rows), "restarts": sum(r["restarts"] for r in rows),
        "all_pass": all(r["ok"] for r in rows),
    }
    if a.mode == "server":
        total["went_back"] = sum(bool(r["went_back"]) for r in rows)
        total["unreadable_checkpoints"] = sum(r["checkpoint_readable"] is False for r in rows)
    print(json.dumps(total), flush=True)
    return 0 if total["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
