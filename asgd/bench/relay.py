"""The delay relay and the probe of the multi-host harness (asgd.bench.netns). Standard
library only: each runs as a script of its own in a host's namespace.

    python asgd/bench/relay.py relay --to ADDRESS --port P [--delay-ms MS]   # a TCP relay
    python asgd/bench/relay.py delay --dev TUN [--delay-ms MS]               # packets held
    python asgd/bench/relay.py echo --port P                                 # echo and sink
    python asgd/bench/relay.py probe --to HOST --port P [--pings N] [--bytes B]
"""
from __future__ import annotations

import os
import sys
import time


# ----------------------------------------------------------------------------------------------
# the delay relay (standard library only: it runs as its own process in the relay's namespace)

CHUNK = 64 * 1024                  # read at most this much at a time
MAX_BUFFERED = 4 * 1024 * 1024     # bytes held per direction of a connection (>> 100 Mbit/s
                                   # x 50 ms = 625 KB): beyond it the relay stops reading
MAX_CONNECTIONS = 256
CONNECT_TIMEOUT_S = 5.0


class Relay:
    """A TCP relay that holds every chunk ``delay_s`` before passing it on, in each
    direction, in order. Each accepted connection is forwarded to (``target``, its port)."""

    def __init__(self, target: str, delay_s: float):
        self.target, self.delay_s = target, delay_s
        self.connections = 0
        self.active = 0
        self.bytes = {"up": 0, "down": 0}
        self.chunks = {"up": 0, "down": 0}

    async def _pipe(self, reader, writer, direction: str, counts: dict) -> None:
        """Read chunks, stamp them, and write each once it has been held ``delay_s``."""
        import asyncio
        import collections

        q: collections.deque = collections.deque()
        held = 0
        more = asyncio.Event()       # something queued (or the end)
        room = asyncio.Event()       # fewer than MAX_BUFFERED bytes held
        room.set()
        loop = asyncio.get_running_loop()

        async def read():
            nonlocal held
            try:
                while True:
                    await room.wait()
                    data = await reader.read(CHUNK)
                    q.append((loop.time() + self.delay_s, data))
                    more.set()
                    if not data:
                        return
                    held += len(data)
                    if held >= MAX_BUFFERED:
                        room.clear()
            except (ConnectionError, OSError):
                q.append((loop.time(), b""))
                more.set()

        async def write():
            nonlocal held
            while True:
                while not q:
                    more.clear()
                    await more.wait()
                due, data = q.popleft()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    await writer.drain()
                    return
                writer.write(data)
                await writer.drain()
                held -= len(data)
                self.bytes[direction] += len(data)
                self.chunks[direction] += 1
                counts[direction] += len(data)
                if held < MAX_BUFFERED:
                    room.set()

        reading = asyncio.ensure_future(read())
        try:
            await write()
        finally:
            reading.cancel()

    async def handle(self, reader, writer) -> None:
        import asyncio
        import socket

        port = writer.get_extra_info("sockname")[1]
        if self.active >= MAX_CONNECTIONS:
            writer.close()
            return
        self.connections += 1
        self.active += 1
        number, opened = self.connections, time.monotonic()
        counts = {"up": 0, "down": 0}
        peer = (writer.get_extra_info("peername") or ("?", 0))[0]
        try:
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(self.target, port), CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError) as e:
                # a client that connects before the service listens (ZeroMQ retries)
                print(f"relay: connection {number} from {peer} to port {port}: the service "
                      f"did not take it ({e.__class__.__name__})", flush=True)
                writer.close()
                counts = None
                return
            for w in (writer, up_w):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipes = [asyncio.ensure_future(self._pipe(reader, up_w, "up", counts)),
                     asyncio.ensure_future(self._pipe(up_r, writer, "down", counts))]
            try:
                # a connection ends when either direction fails, or both have ended
                done, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for p in pipes:
                    p.cancel()
                for w in (writer, up_w):
                    w.close()
        except (ConnectionError, OSError):
            pass
        finally:
            self.active -= 1
            if counts is not None:
                print(f"relay: connection {number} from {peer} to port {port} closed after "
                      f"{time.monotonic() - opened:.1f} s: up {counts['up']} bytes, down "
                      f"{counts['down']} bytes", flush=True)

    def summary(self) -> str:
        return (f"relay: {self.connections} connections; up {self.bytes['up']} bytes in "
                f"{self.chunks['up']} chunks, down {self.bytes['down']} bytes in "
                f"{self.chunks['down']} chunks")


# ----------------------------------------------------------------------------------------------
# a probe of the shaped network (standard library only): what a test measures the links with
#
# The probe's requests: a kind byte and a length (8 bytes, big-endian), then that many bytes.
# "P" (ping): the echo sends the bytes back. "S" (sink): the echo reads them and answers b"done".

PROBE_TIMEOUT_S = 60.0             # any one receive of the probe or the echo


def _recv_exactly(sock, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(n - len(out), 1 << 20))
        if not data:
            raise ConnectionError("closed early")
        out += data
    return bytes(out)


def _echo_main(argv: list[str]) -> int:
    import argparse
    import socket
    import threading

    ap = argparse.ArgumentParser(prog="relay.py echo")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="then exit, whatever")
    args = ap.parse_args(argv)

    def serve(conn):
        conn.settimeout(PROBE_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                while True:
                    head = conn.recv(9, socket.MSG_WAITALL)
                    if len(head) < 9:
                        return
                    kind, n = head[:1], int.from_bytes(head[1:], "big")
                    if kind == b"P":
                        conn.sendall(_recv_exactly(conn, n))
                    else:
                        left = n
                        while left:
                            data = conn.recv(min(left, 1 << 20))
                            if not data:
                                return
                            left -= len(data)
                        conn.sendall(b"done")
            except OSError:
                return

    srv = socket.create_server(("0.0.0.0", args.port), reuse_port=False)
    srv.settimeout(0.5)
    print(f"echo: listening on {args.port}", flush=True)
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    return 0


def _probe_main(argv: list[str]) -> int:
    """Round trips of a small message, then one bulk transfer, to an echo; JSON on stdout."""
    import argparse
    import json
    import socket
    import statistics

    ap = argparse.ArgumentParser(prog="relay.py probe")
    ap.add_argument("--to", required=True, help="the echo's host name or address")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pings", type=int, default=10)
    ap.add_argument("--bytes", type=int, default=8 << 20, help="of the bulk transfer")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    sock = socket.create_connection((args.to, args.port), timeout=PROBE_TIMEOUT_S)
    connect_ms = 1e3 * (time.perf_counter() - t)       # TCP's handshake: its own round trip
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(args.pings):
        t = time.perf_counter()
        sock.sendall(b"P" + (4).to_bytes(8, "big") + b"ping")
        _recv_exactly(sock, 4)
        rtts.append(1e3 * (time.perf_counter() - t))
    block = bytes(1 << 20)
    t = time.perf_counter()
    sock.sendall(b"S" + args.bytes.to_bytes(8, "big"))
    left = args.bytes
    while left:
        k = min(left, len(block))
        sock.sendall(block[:k])
        left -= k
    _recv_exactly(sock, 4)
    bulk_s = time.perf_counter() - t
    sock.close()
    print(json.dumps({"connect_ms": connect_ms, "rtt_ms": rtts, "rtt_median_ms": statistics.median(rtts),
                      "bulk_bytes": args.bytes, "bulk_s": bulk_s,
                      "bulk_mbit_s": 8 * args.bytes / bulk_s / 1e6}), flush=True)
    return 0


def _delay_main(argv: list[str]) -> int:
    """The packet delay: every packet read from the TUN device is written back to it
    ``--delay-ms`` later, in order."""
    import argparse
    import asyncio
    import fcntl
    import signal
    import struct

    ap = argparse.ArgumentParser(prog="relay.py delay")
    ap.add_argument("--dev", default="tun0", help="an existing TUN device, up")
    ap.add_argument("--delay-ms", type=float, default=50.0)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="then exit, whatever")
    args = ap.parse_args(argv)
    tunsetiff, iff_tun, iff_no_pi = 0x400454CA, 0x0001, 0x1000
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", args.dev.encode(), iff_tun | iff_no_pi))
    delay = args.delay_ms / 1e3
    count = {"packets": 0, "bytes": 0, "lost": 0}

    def send(packet: bytes) -> None:
        try:
            os.write(fd, packet)
        except OSError:                      # the device's queue is full: a drop, as a
            count["lost"] += 1               # router's would be

    async def main():
        loop = asyncio.get_running_loop()

        def arrived():
            due = loop.time() + delay
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    return
                count["packets"] += 1
                count["bytes"] += len(packet)
                loop.call_at(due, send, packet)

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_reader(fd, arrived)
        print(f"delay: holding every packet through {args.dev} {args.delay_ms:g} ms",
              flush=True)
        try:
            await asyncio.wait_for(stop.wait(), args.max_seconds)
        except asyncio.TimeoutError:
            print(f"delay: {args.max_seconds:g} s are up", flush=True)

    asyncio.run(main())
    print(f"delay: {count['packets']} packets, {count['bytes']} bytes held, "
          f"{count['lost']} not written back", flush=True)
    return 0


def _relay_main(argv: list[str]) -> int:
    import argparse
    import asyncio
    import signal

    ap = argparse.ArgumentParser(prog="relay.py relay")
    ap.add_argument("--to", required=True, help="the service's address")
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--delay-ms", type=float, default=50.0)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="then exit, whatever")
    args = ap.parse_args(argv)
    relay = Relay(args.to, args.delay_ms / 1e3)

    async def main():
        servers = [await asyncio.start_server(relay.handle, "0.0.0.0", p, backlog=64)
                   for p in args.port]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"relay: listening on {args.port}, to {args.to}, holding {args.delay_ms:g} ms "
              "each way", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), args.max_seconds)
        except asyncio.TimeoutError:
            print(f"relay: {args.max_seconds:g} s are up", flush=True)
        for s in servers:
            s.close()

    asyncio.run(main())
    print(relay.summary(), flush=True)
    return 0


if __name__ == "__main__":
    commands = {"relay": _relay_main, "delay": _delay_main, "echo": _echo_main,
                "probe": _probe_main}
    if sys.argv[1:2] and sys.argv[1] in commands:
        sys.exit(commands[sys.argv[1]](sys.argv[2:]))
    sys.exit("usage: relay.py relay --to ADDRESS --port P [--delay-ms MS]\n"
             "       relay.py delay --dev TUN [--delay-ms MS]\n"
             "       relay.py echo --port P\n"
             "       relay.py probe --to HOST --port P [--pings N] [--bytes B]")
