"""The references of `asgd bench transport`: a raw ZeroMQ echo and a torch.distributed.rpc
parameter server, each with real processes on loopback, return a consistent measurement."""
from __future__ import annotations

import pytest

from asgd.bench.reference import raw_echo, torch_rpc

NUMEL = 20_000
SECONDS = 1.0


def check_result(r: dict, workers: int) -> None:
    assert set(r) == {"round_trips_per_s", "gb_per_s", "latency_ms", "peak_rss_mb", "workers",
                      "numel"}, r
    assert set(r["latency_ms"]) == {"p50", "p90", "p99"}, r
    assert set(r["peak_rss_mb"]) == {"server", "clients"}, r
    assert r["workers"] == workers and r["numel"] == NUMEL
    assert r["round_trips_per_s"] > 0
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"], lat
    # payload both ways: 2 x 4 bytes a value a round trip; both numbers rounded
    expected = r["round_trips_per_s"] * 8 * NUMEL / 1e9
    assert r["gb_per_s"] == pytest.approx(expected, rel=1e-3, abs=1e-4), r
    assert r["peak_rss_mb"]["server"] > 0 and r["peak_rss_mb"]["clients"] > 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["tcp", "ipc"])
@pytest.mark.parametrize("workers", [1, 2])
def test_raw_echo(tmp_path, workers, transport):
    check_result(raw_echo(NUMEL, workers=workers, seconds=SECONDS, transport=transport,
                          chunk_bytes=32 << 10, tmp=tmp_path), workers)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_torch_rpc(tmp_path, workers):
    check_result(torch_rpc(NUMEL, workers=workers, seconds=SECONDS, tmp=tmp_path), workers)


def test_a_client_that_fails_is_named_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"echo client-0[\s\S]*negative"):
        raw_echo(-1, seconds=SECONDS, tmp=tmp_path)   # np.full(-1) fails in the client


def test_a_process_that_hangs_is_stopped_and_named(tmp_path, monkeypatch):
    from asgd.bench import reference

    # no trainer imports torch and joins the ps within half a second: each counts as hung
    monkeypatch.setattr(reference, "STARTUP_TIMEOUT_S", 0.5)
    with pytest.raises(RuntimeError, match=r"rpc trainer1 was not ready within 0.5 s"):
        torch_rpc(NUMEL, seconds=SECONDS, tmp=tmp_path)
