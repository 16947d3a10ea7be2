"""The server against strangers and retries, through the benchmarks' own drivers at a small
scale (real server processes on loopback): a flood of requests under fresh worker names
leaves it responsive with bounded records, memory and stats; pushes sent twice with the same
sequence number are applied exactly once."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(processes, script: str, *args: str, timeout: float = 240) -> dict:
    r = processes.run([str(REPO / "bench" / script), *args], timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_flood_of_fresh_names_leaves_the_server_responsive_and_bounded(processes):
    out = run_bench(processes, "flood.py", "--names", "4000")
    assert out["requests"] == 4000
    assert out["final_pull_s"] >= 0      # a pull after the flood was answered (bounded: 10 s)
    # a quarter of the names said hello: 1,000 records, under the bound of 1,024
    assert out["workers_known"] == 1000 and out["workers_evicted"] == 0
    assert out["stats_bytes_max"] < 64 * 1024
    assert out["server_rss_growth_mb"] < 50


def test_pushes_sent_again_count_exactly_once(processes):
    # a bound on work, not on time: 6 clients x 40 pushes, a fifth of them sent again (the
    # resends follow a seeded draw, so their count does not depend on the machine's speed)
    out = run_bench(processes, "retries.py", "--clients", "6", "--pushes", "40",
                    "--seconds", "150", "--resend", "0.2")
    assert out["errors"] == []
    assert out["acknowledged"] == 240 and out["resent"] > 10
    assert out["version"] == out["acknowledged"]
    assert out["server_repeats"] == out["resent"] == out["repeats_answered"]
    assert out["exactly_once"] is True
