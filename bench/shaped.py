"""The compose topology over a shaped network: what a slow, lossy, distant link costs the
default run, and what the encodings, local steps and overlap win back.

    sudo python bench/shaped.py --repeats 3
    sudo python bench/shaped.py --repeats 3 --only shaped,h16,h32-overlap-fp16
    sudo python bench/shaped.py --delay-ms 50 --loss 0.02 --rate-mbit 100 --uncapped
    sudo python bench/shaped.py --delay-in packets --only shaped,h32-overlap-fp16

Each run is docker-compose.yml's services (a server and two workers) in network namespaces of
their own (asgd.bench.compose, ``run_compose``), then ``asgd eval`` of the server's
checkpoint. ``unshaped`` is the reference: the default run across the namespaces' bridge. The
others run over the shaped network (by default 50 ms each way through the harness's delay
relay, 2% of the packets arriving at each host dropped, 100 Mbit/s on both ends of every
host's link), with the overrides of their setting given to every service. ``--delay-in
packets`` holds every packet instead of the byte stream (asgd.bench.netns: TCP's own round
trip, and with it its loss recovery, then includes the delay). Every repeat runs
every setting once, the reference first, so each shaped run's time is compared with the
reference measured in the same repeat (``ratio``: its time over the reference's).

The time is ``train_s``: from the server's start to the last worker's exit (start-up
included, as a user waits for it). The default run stops at 3,000 updates or 75 s
(run.max_seconds), whichever comes first: over the shaped link it stops at 75 s, short of its
updates; ``--uncapped`` adds the same run without the 75 s (run.max_seconds=0: about 210 s
more every repeat). A repeat of every setting takes about 6 minutes.

Needs root, iproute2's ip and tc, and iptables. Progress on stderr; the last line on stdout
is one JSON object: every run, and per setting the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asgd.bench.compose import run_compose  # noqa: E402
from asgd.bench.netns import Shaping, shaping_available  # noqa: E402

H8 = ["worker.exchange.local_steps=8", "run.max_updates=375"]        # the same 300,000 samples
H16 = ["worker.exchange.local_steps=16", "run.max_updates=188"]
H32 = ["worker.exchange.local_steps=32", "run.max_updates=94"]
H64 = ["worker.exchange.local_steps=64", "run.max_updates=47"]
FP16 = ["worker.exchange.encoding=fp16", "worker.exchange.weights_encoding=bf16"]
TOPK = ["worker.exchange.encoding=topk", "worker.exchange.weights_encoding=bf16"]
OVERLAP = ["worker.exchange.overlap=true"]

# (name, over the shaped network, overrides)
SETTINGS = [
    ("unshaped", False, []),
    ("unshaped-h16-overlap", False, H16 + OVERLAP),
    ("shaped", True, []),
    ("topk", True, TOPK),
    ("h8", True, H8),
    ("h16", True, H16),
    ("h16-fp16", True, H16 + FP16),
    ("h32", True, H32),
    ("h32-fp16", True, H32 + FP16),
    ("h16-overlap", True, H16 + OVERLAP),
    ("h16-overlap-fp16", True, H16 + OVERLAP + FP16),
    ("h32-overlap", True, H32 + OVERLAP),
    ("h32-overlap-fp16", True, H32 + OVERLAP + FP16),
    ("h64-overlap-fp16", True, H64 + OVERLAP + FP16),
]
UNCAPPED = ("shaped-uncapped", True, ["run.max_seconds=0"])
RUN_TIMEOUT_S = 420.0


def one_run(work: Path, env: dict, shaping, overrides: list[str]) -> dict:
    t = time.monotonic()
    run = run_compose(work, env, shaping=shaping, overrides=overrides,
                                timeout_s=RUN_TIMEOUT_S)
    server = run.server or {}
    out = {"test_accuracy": run.test_accuracy, "train_s": round(run.train_s, 2),
           "version": run.result.get("version"),
           "updates_dropped": server.get("updates_dropped"),
           "staleness_mean": server.get("staleness_mean"),
           "mb_in": round(server.get("bytes_in", 0) / 1e6, 2),
           "mb_out": round(server.get("bytes_out", 0) / 1e6, 2),
           "samples": sum(w.get("samples", 0) for w in run.workers or []),
           "stop": sorted({w.get("reason", "") for w in run.workers or []}),
           "total_s": round(time.monotonic() - t, 2)}
    if run.loss:
        seen = sum(s for s, _ in run.loss.values())
        out["loss_share"] = round(sum(d for _, d in run.loss.values()) / max(seen, 1), 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--delay-ms", type=float, default=50.0, help="each way")
    ap.add_argument("--loss", type=float, default=0.02, help="share dropped at each host")
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--delay-in", choices=("stream", "packets"), default="stream",
                    help="stream: the harness's TCP relay holds the byte stream; packets: "
                    "every packet is routed through the relay host and held there, so that "
                    "TCP's own round trip includes the delay")
    ap.add_argument("--only", default="", help="comma-separated names of settings (the "
                    "reference, unshaped, is always run)")
    ap.add_argument("--uncapped", action="store_true",
                    help="also the default run over the shaped network without run.max_seconds")
    args = ap.parse_args()
    why = shaping_available(packets=args.delay_in == "packets")
    if why:
        print(json.dumps({"error": why}))
        return 1
    settings = list(SETTINGS) + ([UNCAPPED] if args.uncapped else [])
    if args.only:
        names = {"unshaped", *args.only.split(",")}
        unknown = names - {s[0] for s in settings}
        if unknown:
            ap.error(f"unknown settings {sorted(unknown)}; known: "
                     f"{', '.join(s[0] for s in settings)}")
        settings = [s for s in settings if s[0] in names]
    shaping = Shaping(rate_mbit=args.rate_mbit, loss=args.loss,
                                delay_ms=args.delay_ms, delay_in=args.delay_in)
    cache = os.environ.get("ASGD_CACHE") or str(Path.home() / ".cache" / "asgd")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               ASGD_CACHE=cache)
    from asgd.tasks.data import mnist1d

    os.environ["ASGD_CACHE"] = cache
    mnist1d()                             # generated once, before any run needs it
    runs = []
    with tempfile.TemporaryDirectory(prefix="asgd-shaped-") as tmp:
        for rep in range(args.repeats):
            reference = None
            for name, shaped, overrides in settings:
                print(f"repeat {rep + 1}/{args.repeats}: {name} "
                      f"({shaping.describe() if shaped else 'unshaped'}) "
                      f"{' '.join(overrides)}", file=sys.stderr, flush=True)
                row = {"setting": name, "repeat": rep, "shaped": shaped,
                       "overrides": overrides}
                try:
                    row.update(one_run(Path(tmp) / "app", env,
                                       shaping if shaped else None, overrides))
                except Exception as e:       # recorded; the other runs go on
                    row["error"] = str(e)[-2000:]
                if name == "unshaped" and "train_s" in row:
                    reference = row["train_s"]
                if reference and "train_s" in row:
                    row["ratio"] = round(row["train_s"] / reference, 3)
                runs.append(row)
                print(f"  {json.dumps({k: v for k, v in row.items() if k != 'overrides'})}",
                      file=sys.stderr, flush=True)
    summary = {}
    for name, shaped, overrides in settings:
        rows = [r for r in runs if r["setting"] == name and "train_s" in r]
        med = {k: statistics.median(r[k] for r in rows) if rows else None
               for k in ("test_accuracy", "train_s", "mb_in", "mb_out")}
        ratios = [r["ratio"] for r in rows if "ratio" in r]
        summary[name] = {"overrides": overrides, "shaped": shaped, "runs": len(rows),
                         "failed": sum(1 for r in runs if r["setting"] == name and "error" in r),
                         **{f"median_{k}": v for k, v in med.items()},
                         "median_ratio": statistics.median(ratios) if ratios else None,
                         "test_accuracy": [r["test_accuracy"] for r in rows],
                         "train_s": [r["train_s"] for r in rows]}
    print(json.dumps({"shaping": shaping.describe(), "repeats": args.repeats,
                      "summary": summary, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
