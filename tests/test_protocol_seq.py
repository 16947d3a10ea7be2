"""What docs/protocol.md promises an independent client, on a real server process: a push's
``seq`` is answered exactly once (``repeat: true``) for a worker that said hello and refused
before one; requests refused as ``unauthorized`` under CURVE are counted in ``stats`` like
every other refused request; and the document's own client runs as printed."""
from __future__ import annotations

import re

import pytest
import zmq

from conftest import REPO, flat, gradients


@pytest.mark.slow
def test_a_push_with_seq_needs_a_hello_and_is_then_applied_exactly_once(start_server,
                                                                        make_config, clients):
    server = start_server(make_config(optimizer={"name": "sgd", "lr": 0.1}))
    from asgd.client import ServerError

    observer = clients(server.endpoint, "observer")
    specs = observer.hello()[0]["tensors"]
    before = flat(observer.pull()[1])
    stranger = clients(server.endpoint, "x7")
    g = gradients(specs, 1)
    for _ in range(2):                    # the same seq twice, never a hello: never applied
        with pytest.raises(ServerError) as e:
            stranger.request("push", g, version=0, seq=7)
        assert e.value.code == "bad_request" and "say hello first" in e.value.message
    stats = observer.stats()
    assert stats["version"] == 0 and stats["errors"] == {"bad_request": 2}
    assert "x7" not in stats["workers"] and flat(observer.pull()[1]) == before

    # without seq a push needs no hello (the protocol's simplest client)
    assert stranger.push(0, g)["version"] == 1
    # after hello, seq 7 sent twice is applied once and answered twice
    stranger.hello()
    first, _ = stranger.request("push", g, version=1, seq=7)
    again, _ = stranger.request("push", g, version=1, seq=7)
    assert (first["version"], first["applied"]) == (2, True) and "repeat" not in first
    assert (again["version"], again["applied"], again["repeat"]) == (2, True, True)
    stats = observer.stats()
    assert stats["version"] == 2 and stats["repeats"] == 1
    assert stats["workers"]["x7"]["pushes"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_requests_refused_as_unauthorized_are_counted_in_stats(tmp_path, start_server,
                                                               make_config):
    from asgd.client import Client, ServerError
    from test_auth import curve_server, keys_of, make_keys

    root = make_keys(tmp_path / "keys")
    server = start_server(make_config(server=curve_server(root)))
    with Client(server.endpoint, "w0", timeout_s=10, curve=keys_of(root, "w0")) as w0, \
            Client(server.endpoint, "w1", timeout_s=10, curve=keys_of(root, "w0")) as fake:
        specs = w0.hello()[0]["tensors"]
        sent, received = w0.bytes_sent, w0.bytes_received
        s1 = w0.stats()
        s1_in, s1_out = w0.bytes_sent - sent, w0.bytes_received - received
        for call in (fake.stats, lambda: fake.push(0, gradients(specs, 2)), fake.hello):
            with pytest.raises(ServerError) as e:    # w0's key speaking as w1
                call()
            assert e.value.code == "unauthorized"
        sent = w0.bytes_sent
        s2 = w0.stats()
        s2_in = w0.bytes_sent - sent
    assert s2["errors"].get("unauthorized", 0) == s1["errors"].get("unauthorized", 0) + 3
    # every byte of the refused requests is in bytes_in, of their error replies in bytes_out
    assert s2["bytes_in"] == s1["bytes_in"] + fake.bytes_sent + s2_in
    assert s2["bytes_out"] == s1["bytes_out"] + s1_out + fake.bytes_received
    assert s1_in > 0 and fake.bytes_sent > 0 and fake.bytes_received > 0
    assert s2["version"] == 0 and "w1" not in s2["workers"]


def test_the_protocol_documents_client_runs_as_printed(start_server, make_config, processes,
                                                       tmp_path):
    text = (REPO / "docs" / "protocol.md").read_text()
    section = text[text.index("## 12. A client in 60 lines"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "client.py"
    script.write_text(code)
    server = start_server(make_config(optimizer={"name": "sgd", "lr": 0.1},
                                      server={"policy": "none", "max_staleness": None}))
    res = processes.run([str(script), server.endpoint], timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("hello: version 0 shard {'index': 0, 'count': 1")
    assert lines[1] == "push: {'version': 1, 'staleness': 0, 'applied': True}"
    assert lines[2].startswith("push_pull: version 2 staleness 1 first weight ")
    assert lines[3] == ("rejected: bad_version: version 7 is not one this shard has had "
                        "(current version 2)")
    assert lines[4] == "stats: applied 2 histogram {'0': 1, '1': 1} errors {'bad_version': 1}"
