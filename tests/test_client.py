"""asgd.client.Client against a real server: a reply that comes after its request timed out is
discarded, and the next request on the same client gets its own reply."""
from __future__ import annotations

import numpy as np
import pytest
import zmq

from asgd.client import ServerTimeout
from tests.conftest import flat, gradients

HELD_TIMEOUT_S = 0.5      # the client gives up on the held push after this
ARRIVAL_WAIT_S = 10.0


@pytest.mark.slow
def test_a_late_reply_is_discarded_and_the_next_request_gets_its_own(
        start_server, make_config, clients):
    # Under sync, a push is held until every live participant has pushed in the round: with
    # two workers that said hello, the first push is held until the second one pushes.
    server = start_server(make_config(server={"policy": "sync", "worker_timeout_s": 30.0}))
    a = clients(server.endpoint, "a", timeout_s=HELD_TIMEOUT_S)
    b = clients(server.endpoint, "b")
    info, _ = a.hello(rank=0)                                     # request id 1
    specs = info["tensors"]
    b.hello(rank=1)

    with pytest.raises(ServerTimeout):
        a.push(0, gradients(specs, 0))                            # request id 2: held
    stats = b.stats()
    assert stats["waiting"] == ["a"], stats                       # held, not lost
    assert stats["version"] == 0

    reply = b.push(0, gradients(specs, 1))                        # completes the round
    assert (reply["version"], reply["applied"]) == (1, True), reply
    # The round's replies go out together (a's first); wait until a's late reply to id 2 is
    # queued on its socket, so it is certain to come before the reply to the next request.
    assert a.sock.poll(int(ARRIVAL_WAIT_S * 1000), zmq.POLLIN), \
        f"the held push's reply did not arrive within {ARRIVAL_WAIT_S:g} s\n{server.log()}"
    received = a.bytes_received

    head, weights = a.request("pull")                             # request id 3
    assert head["ok"] is True
    assert head["id"] == 3, head                                  # its own reply, not id 2's
    assert "applied" not in head and "staleness" not in head, head
    assert head["version"] == 1
    assert [t.name for t in weights] == [s["name"] for s in specs]
    _, b_weights = b.pull()
    assert flat(weights) == flat(b_weights)
    # both replies were read (the late one discarded) and nothing is left over for later
    assert a.bytes_received - received > sum(len(t.array.tobytes()) for t in weights)
    assert not a.sock.poll(0, zmq.POLLIN)

    # the client goes on working: another request, another matching reply
    head = a.stats()
    assert head["id"] == 4 and head["version"] == 1
    assert head["workers"]["a"]["pushes"] == 1 and head["workers"]["b"]["pushes"] == 1


def test_a_spinning_client_takes_quick_replies_and_still_waits_for_slow_ones(
        start_server, make_config, tmp_path):
    """worker.spin_us: the client polls for a reply before it sleeps; a reply later than
    that (the server stopped for 0.3 s) is still taken by the blocking receive."""
    import os
    import signal
    import threading

    import numpy as np

    from asgd.client import Client

    server = start_server(make_config(), bind=f"ipc://{tmp_path}/s.sock")
    with Client(server.endpoint, "w0", timeout_s=10, spin_us=200) as c:
        _, tensors = c.hello()
        out = np.empty(sum(t.array.size for t in tensors), np.float32)
        assert c.pull_flat(out) == 0                      # quick: within the spin
        os.kill(server.popen.pid, signal.SIGSTOP)
        timer = threading.Timer(0.3, os.kill, (server.popen.pid, signal.SIGCONT))
        timer.start()
        try:
            assert c.pull_flat(out) == 0                  # slow: after the spin, then asleep
        finally:
            timer.join()
            os.kill(server.popen.pid, signal.SIGCONT)
        assert np.array_equal(out, np.concatenate([t.array.reshape(-1) for t in tensors]))
