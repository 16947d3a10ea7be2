"""asgd bench end to end: real server, client and reference processes, tiny and short; the
JSON it prints is what the docs quote (figures are not asserted: the machines are shared)."""
from __future__ import annotations

import json

import pytest

from asgd.bench.cli import parse_count


def test_counts_take_suffixes_and_refuse_nonsense():
    assert parse_count("18000") == 18000 and parse_count("80K") == 80_000
    assert parse_count("1M") == 1_000_000 and parse_count("2.5m") == 2_500_000
    import click
    for bad in ("abc", "0", "1.5", "-3K"):
        with pytest.raises(click.BadParameter):
            parse_count(bad)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_transport_reports_asgd_against_the_raw_echo(processes, transport):
    result = processes.run(["-m", "asgd.cli", "bench", "transport", "--params", "20K",
                            "--transport", transport, "--seconds", "0.3", "--repeats", "2"],
                           timeout=180)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["params"] == 20_000 and out["transport"] == transport and out["repeats"] == 2
    for system in ("asgd", "raw_echo"):
        s = out[system]
        assert len(s["all_round_trips_per_s"]) == 2 and s["round_trips_per_s"] > 0
        lat = s["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert s["peak_rss_mb"]["clients"] > 0
    assert out["asgd"]["peak_rss_mb"]["server"] > 0
    assert out["ratio_vs_raw"] == pytest.approx(
        out["asgd"]["round_trips_per_s"] / out["raw_echo"]["round_trips_per_s"], rel=1e-2,
        abs=6e-4)                   # both rounded to 3 decimals
    assert out["gb_per_s"] == pytest.approx(out["round_trips_per_s"] * 8 * 20_000 / 1e9,
                                            rel=1e-2, abs=6e-4)
    # bytes on the wire per round trip: a late reply's push is sent again (exactly once
    # applied), so a busy machine adds some; what does not change is where the tensors go
    wire = out["asgd"]["wire_bytes_per_round_trip"]
    if transport == "shm":          # headers each way, the tensors in shared memory
        assert wire < 8 * 20_000 / 10, wire
    else:                           # the tensors each way, at least once
        assert 8 * 20_000 <= wire < 2 * 8 * 20_000, wire
    assert "repeat 2/2" in result.stderr


@pytest.mark.slow
def test_transport_with_an_encoding_moves_fewer_bytes(processes):
    result = processes.run(["-m", "asgd.cli", "bench", "transport", "--params", "40K",
                            "--transport", "tcp", "--encoding", "topk", "--seconds", "0.3"],
                           timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # the gradient is 1% of its values (index and value each), the weights come back whole
    assert out["asgd"]["wire_bytes_per_round_trip"] < 4 * 40_000 * 1.1


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_transport_through_two_shards_and_two_clients(processes, transport):
    result = processes.run(["-m", "asgd.cli", "bench", "transport", "--params", "64K",
                            "--transport", transport, "--shards", "2", "--workers", "2",
                            "--seconds", "0.3"], timeout=180)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["shards"] == 2 and out["workers"] == 2 and out["round_trips_per_s"] > 0
    # the cores the two shards kept busy while measured (from /proc): they served, and no
    # more than the two of them can use
    cores = out["asgd"]["cpu_cores"]
    assert 0 < cores["server"] <= 2.2 and cores["clients"] >= 0, cores
    wire = out["asgd"]["wire_bytes_per_round_trip"]
    if transport == "shm":          # headers each way (one per shard), no tensor
        assert wire < 8 * 64_000 / 10, wire
    else:                           # every value each way, at least once (a late reply's
        assert 8 * 64_000 <= wire < 2 * 8 * 64_000, wire      # push is sent again)


def test_encodings_are_refused_through_shared_memory(processes):
    result = processes.run(["-m", "asgd.cli", "bench", "transport", "--params", "1K",
                            "--encoding", "fp16"], timeout=60)
    assert result.returncode == 2 and "encodings are for tcp and ipc" in result.stderr


@pytest.mark.slow
def test_step_reports_compute_communication_and_what_overlap_hides(processes, tmp_path,
                                                                    make_config,
                                                                    mnist1d_cached):
    result = processes.run(["-m", "asgd.cli", "bench", "step", "--config",
                            str(make_config()), "--steps", "60"], timeout=180)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for mode in ("no_overlap", "overlap"):
        m = out[mode]
        assert m["status"] == "ok" and m["compute_ms"] > 0 and m["exchange_ms"] >= 0
        assert m["step_ms"] == pytest.approx(m["compute_ms"] + m["exchange_ms"], abs=1e-3)
    assert out["no_overlap"]["staleness_mean"] == 0.0          # one worker: never stale
    assert out["overlap"]["staleness_mean"] > 0.5              # overlap: one step behind
    assert 0.0 <= out["hidden_fraction"] <= 1.0
    assert out["communication_ms"] == out["no_overlap"]["exchange_ms"]
