"""The language model (examples/lm.py) side by side, in one run: one plain process with one
thread (one core, as each worker has: the analogue of one GPU) and with every core; asgd with
2 workers (A-SGD: the server steps AdamW on each gradient, and each worker gets the weights
looked ahead to where its gradient will land: the example's ``lookahead=True``); asgd with 2
workers and local steps; torch DDP (gloo, 2 processes of one thread) of the same model, data
and schedule. ``--systems`` can add asgd-no-lookahead (the example's ``--lookahead 0``).

    python bench/lm.py [--steps 300] [--repeats 2] [--local-steps 10] [--out docs/performance/lm]
    python bench/lm.py --steps 40 --eval-every 10 --local-steps 5 --out /tmp/lm   # does it work

The settings are the example's defaults but for the validation (every 20 batches, on 4
batches of windows: about 5% of a run). Each worker and DDP process has one thread, as the
plain-1 process: on this 2-core machine 2 workers and the server share the 2 cores. asgd-local
pushes every ``--local-steps`` steps to an outer rule that adds each worker's progress (SGD
at rate 1, no momentum, through ``asgd launch --set``; the server's default outer rule,
Nesterov at 0.05, suits many more local steps than a run this short has); ``--set`` replaces
it.

Every system trains on the same number of tokens, ``--steps`` batches of the example's
``--batch-size`` x ``--seq-len``, and all but asgd-local in the same updates: ``--steps`` of
one batch each. The plain processes take ``--steps`` steps; asgd's server stops at
``--steps`` updates (``max_updates``), whichever worker pushed them, each one worker's batch;
DDP is strongly scaled, as it is usually compared: each of its 2 ranks computes half of each
batch, so its ``--steps`` steps are the plain process's updates, synchronous; with local
steps each worker runs ``--steps`` / 2 steps (its schedule over those). Each
validation loss is logged with its time since the system was started and the tokens behind
the weights: the example's ``opt.log`` (in the run's metrics.jsonl; the plain runs are the
example alone with ``$ASGD_RUN_DIR`` set, so the same file) and bench/lm_ddp.py's lines.

For each system: tokens/s, validation loss against time and against tokens (the plot), the
time and tokens each takes to reach the one-thread plain process's final validation loss
(the target), that time over the plain process's, and the validation loss at the plain
process's tokens, relative to it. The systems alternate within each repeat (in a rotating
order); figures are medians over repeats. Every run is bounded by ``--timeout``; a failure is
named with its log and the others go on. Writes ``lm.png`` and ``lm.json`` (every curve) to
``--out``; prints one JSON object, the last line; exits 1 when a system failed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "lm.py"
SYSTEMS = ("plain-1", "plain-all", "asgd", "asgd-local", "ddp", "asgd-no-lookahead")
DEFAULT_SYSTEMS = SYSTEMS[:5]
# the example's settings every system gets (its flags), and bench/lm_ddp.py as JSON
SETTINGS = {"steps": 300, "batch_size": 16, "seq_len": 128, "layers": 4, "width": 256,
            "lr": 1e-3, "min_lr": 1e-4, "warmup": 30, "weight_decay": 0.1, "data_mb": 4.0,
            "eval_every": 20, "eval_batches": 4, "seed": 0}
WORKERS = 2
STOP_GRACE_S = 20.0      # after SIGINT, before SIGKILL
TOLERANCE = 1e-4         # relative: a validation loss this close to the target has reached it


def log(msg: str) -> None:
    print(f"[bench/lm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# processes


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (a launcher's server and workers run in sessions of their
    own, so its process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGINT (a launcher stops its own processes on it), then SIGKILL to what is left, by
    pid: the processes started here and their descendants."""
    pids = [p.pid for p in procs if p.poll() is None]
    for p in procs:
        pids += descendants(p.pid)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.time() + STOP_GRACE_S
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=STOP_GRACE_S)


def run_all(cmds: list[tuple[list[str], dict, Path]], timeout: float) -> tuple[list[int], float]:
    """Start every (command, environment, log) at once and wait for all, at most ``timeout``
    seconds: (exit codes, None for one stopped at the timeout; the start time)."""
    t0 = time.time()
    procs = []
    try:
        for cmd, env, path in cmds:
            with open(path, "ab") as out:
                procs.append(subprocess.Popen(cmd, env={**env, "ASGD_T0": repr(t0)}, cwd=ROOT,
                                              stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL,
                                              start_new_session=True))
        while time.time() < t0 + timeout and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break                       # one failed: DDP's others would wait for it
            time.sleep(0.5)
    finally:
        codes = [p.poll() for p in procs]
        stop(procs)
    return codes, t0


def base_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ASGD_") or k == "ASGD_CACHE"}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def example_flags(s: dict, **over) -> list[str]:
    s = {**s, **over}
    return [a for k in (*SETTINGS, "threads", "local_steps", "lookahead")
            if s.get(k) is not None
            for a in (f"--{k.replace('_', '-')}", str(s[k]))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# one system, one repeat: its curve [(t, tokens, val_loss)] from the start of its processes


class Failed(Exception):
    pass


def records(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue                   # a line torn by a killed process
    return out


def curve(recs: list[dict], offset: float = 0.0) -> list[tuple[float, int, float]]:
    return sorted((r["t"] + offset, int(r["tokens"]), r["val_loss"]) for r in recs
                  if r.get("val_loss") is not None and "tokens" in r)


def tail(where: Path, system: str, lines: int = 15) -> str:
    """The last lines of a failed system's logs, for the bench's own output."""
    out = []
    for path in [where / f"{system}.log", *sorted(where.glob(f"{system}-[0-9]*.log")),
                 *sorted(where.glob(f"{system}/logs/*.log"))]:
        if not path.exists():
            continue
        text = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(out)


def check(codes, name: str, logs: list[Path]) -> None:
    if all(c == 0 for c in codes):
        return
    stopped = "stopped (another failed)" if any(c for c in codes) else "timed out"
    what = ", ".join(stopped if c is None else f"exit {c}" for c in codes)
    raise Failed(f"{name}: {what}; see {', '.join(map(str, logs))}")


def run_plain(name: str, s: dict, threads: int, where: Path, timeout: float):
    run_dir, out = where / name, where / f"{name}.log"
    env = {**base_env(threads), "ASGD_RUN_DIR": str(run_dir)}
    codes, _ = run_all([([sys.executable, str(EXAMPLE), *example_flags(s, threads=threads)],
                         env, out)], timeout)
    check(codes, name, [out])
    return curve(records(run_dir / "metrics.jsonl")), [out]


def run_asgd(name: str, s: dict, local_steps: int, server: list[str], where: Path,
             timeout: float, **flags):
    out = where / f"{name}.log"
    steps = s["steps"] // WORKERS if local_steps else s["steps"]
    cmd = [sys.executable, "-m", "asgd.cli", "launch", "--workers", str(WORKERS), "--quiet",
           "--set", f"run.out_dir={where}", "--set", f"run.name={name}",
           "--set", "run.max_restarts=0", *server, str(EXAMPLE),
           *example_flags(s, steps=steps, threads=1, local_steps=local_steps or None, **flags)]
    env = base_env(1)
    codes, t0 = run_all([(cmd, env, out)], timeout)
    run_dir = where / name
    logs = [out, run_dir / "logs"]
    check(codes, name, logs)
    summary = json.loads((run_dir / "summary.json").read_text())
    exits = [e.get("exit_code") for e in summary.get("worker_exits", [])]
    if summary.get("status") != "ok" or exits != [0] * WORKERS:
        raise Failed(f"{name}: status {summary.get('status')}, worker exits {exits}; see "
                     f"{', '.join(map(str, logs))}")
    # t in metrics.jsonl counts from the launcher's start, when it wrote config.yaml
    offset = (run_dir / "config.yaml").stat().st_mtime - t0
    return curve(records(run_dir / "metrics.jsonl"), offset), logs


def run_ddp(name: str, s: dict, where: Path, timeout: float):
    out = where / f"{name}.jsonl"
    settings = json.dumps({**s, "threads": 1, "collective_timeout_s": timeout})
    port = str(free_port())
    cmds = []
    for rank in range(WORKERS):
        env = {**base_env(1), "RANK": str(rank), "WORLD_SIZE": str(WORKERS),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmds.append(([sys.executable, str(ROOT / "bench" / "lm_ddp.py"), settings, str(out)],
                     env, where / f"{name}-{rank}.log"))
    codes, _ = run_all(cmds, timeout)
    logs = [c[2] for c in cmds]
    check(codes, name, logs)
    return curve(records(out)), logs


# ----------------------------------------------------------------------------------------------
# figures


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """The first x at which y comes down to ``target`` (linear between points), or None.
    Within TOLERANCE counts as reached: the same weights evaluated with another number of
    threads differ in the last digits."""
    for i, (x, y) in enumerate(points):
        if y <= target * (1 + TOLERANCE):
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (x - x0) * max(0.0, min(1.0, (y0 - target) / (y0 - y)))
    return None


def at(points: list[tuple[float, float]], x: float) -> float | None:
    """y at ``x``, linear between points (None outside them)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1] if points and points[-1][0] == x else None


def figures(c: list[tuple[float, int, float]], ref: list[tuple[float, int, float]]) -> dict:
    """One system's figures against ``ref``, the one-thread plain process's curve."""
    final = max(c, key=lambda r: (r[1], r[0]))          # the most tokens, the latest of them
    ref_final = max(ref, key=lambda r: (r[1], r[0]))
    target = ref_final[2]
    by_time = [(t, v) for t, _, v in c]
    by_tokens = sorted({k: v for _, k, v in c}.items())   # one point a token count: the latest
    first, last = min(c), max(c)
    to_target = crossing(by_time, target)
    at_ref = [(k, at(by_tokens, k), v) for _, k, v in ref if k >= ref_final[1] / 2]
    gaps = [(mine - v) / v for _, mine, v in at_ref if mine is not None]
    return {
        "tokens": final[1], "final_val_loss": final[2], "wall_s": final[0],
        "tokens_per_s": final[1] / final[0],
        "train_tokens_per_s": ((last[1] - first[1]) / (last[0] - first[0])
                               if last[0] > first[0] else None),
        "time_to_target_s": to_target,
        "tokens_to_target": crossing([(k, v) for k, v in by_tokens], target),
        "time_to_target_over_plain_1": (to_target / ref_final[0]
                                        if to_target is not None else None),
        "loss_gap_at_final_tokens": (at(by_tokens, ref_final[1]) / target - 1
                                     if at(by_tokens, ref_final[1]) is not None else None),
        "loss_gap_max_second_half": max(gaps, key=abs) if gaps else None,
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def checks(med: dict) -> dict:
    """Issue 24's targets on the medians."""
    a, d = med.get("asgd") or {}, med.get("ddp") or {}
    ratio, gap = a.get("time_to_target_over_plain_1"), a.get("loss_gap_at_final_tokens")
    ta, td = a.get("time_to_target_s"), d.get("time_to_target_s")
    return {"asgd_time_to_target_at_most_0.6x_plain_1": ratio is not None and ratio <= 0.6,
            "asgd_no_later_than_ddp": (None if not d else      # None: DDP did not run
                                       ta is not None and (td is None or ta <= td)),
            "asgd_loss_within_2pct_at_same_tokens": gap is not None and abs(gap) <= 0.02}


def plot(curves: dict, target: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_k) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, (system, runs) in enumerate(curves.items()):
        for j, c in enumerate(runs):
            kw = dict(color=f"C{i}", lw=1.2, alpha=1.0 if j == 0 else 0.4,
                      label=system if j == 0 else None)
            ax_t.plot([t for t, _, _ in c], [v for *_, v in c], **kw)
            by_tokens = sorted({k: v for _, k, v in c}.items())
            ax_k.plot([k / 1e6 for k, _ in by_tokens], [v for _, v in by_tokens], **kw)
    for ax, xlabel in ((ax_t, "wall time (s, from the start of the system's processes)"),
                       (ax_k, "tokens trained (millions)")):
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    ax_t.set_ylabel("validation loss (nats a byte)")
    ax_t.legend()
    fig.suptitle("examples/lm.py: validation loss (dashed: plain-1's final)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, v in SETTINGS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v,
                        help=f"the example's --{k.replace('_', '-')} (default {v})")
    ap.add_argument("--local-steps", type=int, default=10,
                    help="asgd-local's H: it must divide --steps / 2 (the steps after a "
                         "worker's last push never reach the server) and --eval-every (each "
                         "validation right after a push, so that its tokens are exact)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="asgd-local's server settings (default: its outer rule adds each "
                         "worker's progress: server.outer.optimizer=sgd, outer.lr=1, no "
                         "momentum)")
    ap.add_argument("--asgd-set", action="append", default=[], metavar="KEY=VALUE",
                    help="asgd's (and asgd-no-lookahead's) server settings (default: none)")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help=f"some of {', '.join(SYSTEMS)}")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds a run may take")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "performance" / "lm")
    ap.add_argument("--work", type=Path, default=None,
                    help="logs and run directories (default: runs/bench-lm-<time>)")
    args = ap.parse_args()
    systems = [x for x in args.systems.split(",") if x]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or "plain-1" not in systems:
        ap.error(f"--systems: {', '.join(unknown) or 'plain-1 is the reference'}: choose "
                 f"from {', '.join(SYSTEMS)}, plain-1 among them")
    if args.steps < 2 * WORKERS or args.eval_every < WORKERS or args.repeats < 1:
        ap.error("--steps >= 4, --eval-every >= 2 and --repeats >= 1")
    h = args.local_steps
    if "asgd-local" in systems and (h < 1 or (args.steps // WORKERS) % h or args.eval_every % h):
        ap.error(f"--local-steps {h} must divide --steps / {WORKERS} ({args.steps // WORKERS}) "
                 f"and --eval-every ({args.eval_every})")
    s = {k: getattr(args, k) for k in SETTINGS}
    outer = [a for kv in (args.set or ["server.outer.optimizer=sgd", "server.outer.lr=1.0",
                                       "server.outer.momentum=0",
                                       "server.outer.nesterov=false"]) for a in ("--set", kv)]
    asgd_server = [a for kv in args.asgd_set for a in ("--set", kv)]
    cores = len(os.sched_getaffinity(0))
    work = (args.work or ROOT / "runs" / f"bench-lm-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {"plain-1": lambda w: run_plain("plain-1", s, 1, w, args.timeout),
            "plain-all": lambda w: run_plain("plain-all", s, cores, w, args.timeout),
            "asgd": lambda w: run_asgd("asgd", s, 0, asgd_server, w, args.timeout),
            "asgd-no-lookahead": lambda w: run_asgd("asgd-no-lookahead", s, 0, asgd_server,
                                                    w, args.timeout, lookahead=0),
            "asgd-local": lambda w: run_asgd("asgd-local", s, args.local_steps, outer, w,
                                             args.timeout),
            "ddp": lambda w: run_ddp("ddp", s, w, args.timeout)}
    curves = {x: [] for x in systems}
    per_repeat: list[dict] = []
    failures = []
    for r in range(args.repeats):
        where = work / f"repeat-{r}"
        where.mkdir(parents=True, exist_ok=True)
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        got = {}
        for system in order:
            log(f"repeat {r + 1}/{args.repeats}: {system} (logs in {where})")
            started = time.time()
            try:
                got[system], _ = jobs[system](where)
                if not got[system]:
                    raise Failed(f"{system}: no validation loss was logged; see {where}")
                log(f"  {system}: {time.time() - started:.0f} s, final validation loss "
                    f"{got[system][-1][2]:.4f}")
            except Failed as e:
                got.pop(system, None)
                failures.append({"repeat": r, "system": system, "error": str(e)})
                log(f"FAILED {e}\n{tail(where, system)}")
        for system, c in got.items():
            curves[system].append(c)
        if "plain-1" in got:
            per_repeat.append({x: figures(c, got["plain-1"]) for x, c in got.items()})
    med = {x: {k: median([rep[x][k] for rep in per_repeat if x in rep])
               for k in next((rep[x] for rep in per_repeat if x in rep), {})}
           for x in systems}
    for x, m in med.items():        # the time medians are over the repeats that reached it
        if m:
            m["repeats"] = sum(x in rep for rep in per_repeat)
            m["repeats_reaching_target"] = sum(
                rep[x]["time_to_target_s"] is not None for rep in per_repeat if x in rep)
    target = med.get("plain-1", {}).get("final_val_loss")
    result = {"bench": "lm", "settings": s, "workers": WORKERS, "cores": cores,
              "local_steps": args.local_steps, "asgd_local_server": outer[1::2],
              "asgd_server": asgd_server[1::2],
              "repeats": args.repeats, "target_val_loss": target, "systems": med,
              "checks": checks(med), "failures": failures, "work": str(work)}
    if any(curves.values()):
        plot({x: c for x, c in curves.items() if c}, target, args.out / "lm.png")
        result["plot"] = str(args.out / "lm.png")
    (args.out / "lm.json").write_text(json.dumps(
        {**result, "per_repeat": per_repeat, "curves": curves}, indent=1) + "\n")
    print(json.dumps(result))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
