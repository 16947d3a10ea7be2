"""A multi-host harness: the compose topology in network namespaces on this machine.

    with Topology(["server", "worker-0", "worker-1"]) as topo:   # a host per service
        topo.address("server")                                    # 198.18.x.2
        popen = topo.spawn("worker-0", [sys.executable, ...], env, cwd, log)

Each host is a network namespace with its loopback up and one end of a veth pair; the other
ends join a bridge in a hub namespace, addresses from the benchmarking range 198.18.0.0/15.
Service names resolve in every host through ``/etc/netns/<namespace>/hosts``, which
``ip netns exec`` puts over ``/etc/hosts``. Everything made is removed on exit, and names carry
the process id so that parallel runs never meet; what a killed process left behind (its
namespaces, with their links, qdiscs and rules, and /etc/netns folders) is removed by the next
topology made (``sweep_stale``). ``available()`` says whether namespaces can be made here
(root and iproute2), and why not.

A shaped network (``Shaping``): a slow, lossy, distant link between the hosts,

    shaping = Shaping(rate_mbit=100, loss=0.02, delay_ms=50)
    with Topology(hosts, shaping=shaping, relay=("server", [5555])) as topo: ...

* bandwidth: ``tc tbf`` at ``rate_mbit`` on both ends of every host's veth pair: the egress of
  the host's ``eth0`` (what it sends) and of the hub-side end (what it receives);
* loss: iptables' ``statistic`` match drops each packet arriving on a host's ``eth0`` with
  probability ``loss`` (INPUT, in the host's own namespace: it goes with it), so each direction
  of a path between two hosts loses that share;
* delay: the kernel here has no netem, so a relay of this module's own (``Relay``, run with
  ``python tests/multihost.py relay``) does it: an extra host ``relay`` whose TCP relay
  accepts the connections for one service's ports and forwards each to the service, holding
  every chunk ``delay_ms`` in each direction, in order. From every other host the service's
  name resolves to the relay, so the clients (the workers) reach the service through it under
  its usual name and port. The relay's own link is neither limited nor lossy (a router's);
  the clients' and the service's are, so on a worker's path to the server each direction
  loses ``loss`` of its packets (at the receiving host), passes two links of ``rate_mbit``
  and is held ``delay_ms``.

This delay is applied to the byte stream, not to packets: each TCP connection ends at the
relay, so TCP's own round trip (and with it its loss recovery and its window) does not
include the delay, only the application's does. ``Shaping(delay_in="packets")`` holds the
packets instead: the relay host becomes a router through which every host reaches every
other (a /32 route each), and what arrives on its eth0 is routed into a TUN device whose
process (``python tests/multihost.py delay``) writes each packet back ``delay_ms`` later, to
be routed on to its destination. Then TCP's handshake, its acknowledgements and its loss
recovery all wait for the delay, as on a real distant link. See docs/performance.md,
"Across hosts: a shaped network".

What the shaping does can be read back: ``loss_counters(host)`` (packets that arrived at a
host, and those of them dropped: a counting rule sits before the drop rule),
``tbf_counters(host)`` (``tc -s``: bytes sent, overlimits), the relay's log (a line per
connection with its bytes each way, then the totals), and a probe of this module's own:

    python tests/multihost.py echo --port 5555                   # in one host: echo and sink
    python tests/multihost.py probe --to server --port 5555      # in another: JSON, round
                                                                 # trips and a bulk transfer
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ETC_NETNS = Path("/etc/netns")
RELAY = "relay"                    # the relay's host name
RELAY_READY_S = 20.0               # the relay listens within this (it imports asyncio only)
_TOPOLOGIES = itertools.count()


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=20)


def _in(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """``argv`` run inside namespace ``ns`` (tc, iptables)."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=check, timeout=20)


def available() -> str:
    """"" when namespaces can be made here, else the reason."""
    if shutil.which("ip") is None:
        return "no iproute2 (ip) on this machine"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"asgd-probe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"cannot make a network namespace: {getattr(e, 'stderr', e)}".strip()
    _ip("netns", "del", name, check=False)
    return ""


def shaping_available(packets: bool = False) -> str:
    """"" when a shaped network can be made here (namespaces, tc's tbf, iptables' statistic
    match; with ``packets``, a TUN device and sysctl for the packet delay), else the
    reason."""
    why = available()
    if why:
        return why
    if packets and not Path("/dev/net/tun").exists():
        return "no /dev/net/tun on this machine (the packet delay needs a TUN device)"
    if packets and shutil.which("sysctl") is None:
        return "no sysctl on this machine (Debian package procps)"
    for tool, pkg in (("tc", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"no {tool} on this machine (Debian package {pkg})"
    name = f"asgd-probe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"cannot make a network namespace: {getattr(e, 'stderr', e)}".strip()
    try:
        _ip("link", "add", "p0", "type", "veth", "peer", "name", "p1", ns=name)
        _in(name, "tc", "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "100mbit",
            "burst", "64kb", "limit", "1mb")
        _in(name, "iptables", "-A", "INPUT", "-i", "p0", "-m", "statistic", "--mode", "random",
            "--probability", "0.02", "-j", "DROP")
    except subprocess.CalledProcessError as e:
        return f"cannot shape a link ({' '.join(e.cmd[4:6])}): {e.stderr.strip()}"
    except subprocess.TimeoutExpired as e:
        return f"cannot shape a link: {e}"
    finally:
        _ip("netns", "del", name, check=False)
    return ""


def sweep_stale() -> list[str]:
    """Delete the namespaces (and /etc/netns folders) that a topology of a process no longer
    alive left behind (one killed before it could close), after killing what still runs in
    them; returns their names. A namespace of a live process, or not one of ours, is left
    alone."""
    import re

    out = _ip("netns", "list", check=False).stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    if ETC_NETNS.is_dir():
        names |= {d.name for d in ETC_NETNS.iterdir()}
    gone = []
    for ns in sorted(names):
        m = re.fullmatch(r"asgdp(\d+)-\d+-(hub|\d+)", ns)   # asgdp<maker's pid>-<k>-...
        if m is None:
            continue
        owner = int(m.group(1))
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        # what still runs in it was started there by the dead process (a server, a relay)
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        gone.append(ns)
    return gone


@dataclass(frozen=True)
class Shaping:
    rate_mbit: float = 0.0        # tc tbf on both ends of every host's link (0 = unlimited)
    loss: float = 0.0             # share of the packets dropped on arrival at each host
    delay_ms: float = 0.0         # held by the relay in each direction (needs a relay)
    delay_in: str = "stream"      # "stream": the TCP relay; "packets": every packet routed
                                  # through the relay host, held there (TCP sees the delay)
    burst_kb: int = 64            # tbf's bucket
    limit_kb: int = 2048          # tbf's queue (beyond it, drops)

    def describe(self) -> str:
        return (f"{self.delay_ms:g} ms delay each way"
                f"{' (packets)' if self.delay_in == 'packets' else ''}, "
                f"{100 * self.loss:g}% loss, {self.rate_mbit:g} Mbit/s")


class Topology:
    def __init__(self, hosts: list[str], subnet: int = 0, shaping: Shaping | None = None,
                 relay: tuple[str, list[int]] | None = None, relay_max_s: float = 900.0,
                 relay_log: Path | None = None):
        """``relay``: (service, ports): an extra host ``relay`` that the other hosts reach
        ``service`` through, holding every chunk ``shaping.delay_ms`` each way."""
        k = next(_TOPOLOGIES)                    # this process's k-th topology
        tag = f"{os.getpid() % 100000}x{k}"      # interface names are short (15 bytes)
        self.hub = f"asgdp{os.getpid()}-{k}-hub"
        shaping = shaping or Shaping()
        if shaping.delay_in not in ("stream", "packets"):
            raise ValueError(f"delay_in {shaping.delay_in!r}: stream or packets")
        # packets: the relay host routes every packet between the other hosts
        self.router = shaping.delay_ms > 0 and shaping.delay_in == "packets"
        if self.router:
            relay = None
            if RELAY in hosts:
                raise ValueError(f"a host is already named {RELAY!r}")
            hosts = [*hosts, RELAY]
        if relay is not None:
            if relay[0] not in hosts or RELAY in hosts:
                raise ValueError(f"relay for {relay[0]!r}: not one of the hosts, or a host is "
                                 f"already named {RELAY!r}")
            hosts = [*hosts, RELAY]
        self.ns = {h: f"asgdp{os.getpid()}-{k}-{i}" for i, h in enumerate(hosts)}
        # 198.18.<subnet>.0/24, .1 unused, hosts from .2
        self.ip = {h: f"198.18.{subnet}.{i + 2}" for i, h in enumerate(hosts)}
        self.tag = tag
        self.shaping = shaping
        self.relay = relay
        self.relay_max_s = relay_max_s
        self.relay_log = relay_log
        self.relay_proc: subprocess.Popen | None = None
        self._relay_tmp: Path | None = None
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Topology":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _hosts_file(self, host: str) -> str:
        """Every host's name and address; through the relay, its service's name is the
        relay's address (except in the relay itself and the service's own host)."""
        out = []
        for h, ip in self.ip.items():
            if self.relay and h == self.relay[0] and host not in (h, RELAY):
                ip = self.ip[RELAY]
            out.append(f"{ip} {h}\n")
        return "127.0.0.1 localhost\n" + "".join(out)

    def _build(self) -> None:
        sweep_stale()
        _ip("netns", "add", self.hub)
        _ip("link", "set", "lo", "up", ns=self.hub)
        _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        _ip("link", "set", "br0", "up", ns=self.hub)
        for i, (host, ns) in enumerate(self.ns.items()):
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
            outer, inner = f"a{self.tag}h{i}", f"a{self.tag}n{i}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "netns", self.hub)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", "br0", ns=self.hub)
            _ip("link", "set", outer, "up", ns=self.hub)
            _ip("link", "set", inner, "name", "eth0", ns=ns)
            _ip("addr", "add", f"{self.ip[host]}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            etc = ETC_NETNS / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self._hosts_file(host))
            if self.shaping.rate_mbit > 0 or self.shaping.loss > 0:
                # packets of one MTU, as on a real link: without this, veth passes TCP's
                # segmentation-offload packets of up to 64 KB, and a drop loses dozens at once
                _ip("link", "set", "dev", "eth0", "gso_max_segs", "1", ns=ns)
                _ip("link", "set", "dev", outer, "gso_max_segs", "1", ns=self.hub)
            if host != RELAY:
                self._shape(ns, outer)
        if self.relay is not None:
            self._start_relay()
        if self.router:
            self._start_router()

    def _shape(self, ns: str, outer: str) -> None:
        """Rate on both ends of a host's link, loss on arrival at the host: all of it inside
        the host's and the hub's namespaces, deleted with them."""
        s = self.shaping
        if s.rate_mbit > 0:
            tbf = ["root", "tbf", "rate", f"{s.rate_mbit:g}mbit", "burst", f"{s.burst_kb}kb",
                   "limit", f"{s.limit_kb}kb"]
            _in(ns, "tc", "qdisc", "add", "dev", "eth0", *tbf)            # the host sends
            _in(self.hub, "tc", "qdisc", "add", "dev", outer, *tbf)       # ... and receives
        if s.loss > 0:
            # a rule without a target counts every packet arriving; the next drops some
            _in(ns, "iptables", "-w", "5", "-A", "INPUT", "-i", "eth0")
            _in(ns, "iptables", "-w", "5", "-A", "INPUT", "-i", "eth0", "-m", "statistic",
                "--mode", "random", "--probability", f"{s.loss:g}", "-j", "DROP")

    def _start_relay(self) -> None:
        service, ports = self.relay
        self._run_relay(["relay", "--to", self.ip[service],
                         *[a for p in ports for a in ("--port", str(p))]], "listening")

    def _start_router(self) -> None:
        """The relay host as a router that holds every packet: what arrives on its eth0 is
        routed (table 100) into a TUN device, whose process (``python tests/multihost.py
        delay``) writes each packet back after ``delay_ms``; written back, it is routed on by
        the main table, out of eth0 to its destination. Every other host reaches every other
        through it (a /32 route each), so each direction of a path is held once, and TCP's
        own round trip (its loss recovery, its window) includes both delays."""
        r = self.ns[RELAY]
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0"):
            _in(r, "sysctl", "-q", "-w", key)
        _ip("tuntap", "add", "dev", "tun0", "mode", "tun", ns=r)
        _in(r, "sysctl", "-q", "-w", "net.ipv4.conf.tun0.rp_filter=0")
        _ip("link", "set", "tun0", "up", ns=r)
        _ip("rule", "add", "iif", "eth0", "lookup", "100", "pref", "100", ns=r)
        _ip("route", "add", "default", "dev", "tun0", "table", "100", ns=r)
        for h, ns in self.ns.items():
            for g in self.ns:
                if RELAY not in (h, g) and g != h:
                    _ip("route", "add", f"{self.ip[g]}/32", "via", self.ip[RELAY], ns=ns)
        self._run_relay(["delay", "--dev", "tun0"], "holding")

    def _run_relay(self, command: list[str], ready: str) -> None:
        """The relay host's process (``command`` of this module), bounded by relay_max_s;
        returns once its log says ``ready``."""
        if self.relay_log is None:
            import tempfile

            self._relay_tmp = Path(tempfile.mkdtemp(prefix=f"asgd{self.tag}-relay-"))
            self.relay_log = self._relay_tmp / "relay.log"
        argv = [sys.executable, str(Path(__file__).resolve()), *command,
                "--delay-ms", f"{self.shaping.delay_ms:g}",
                "--max-seconds", f"{self.relay_max_s:g}"]
        self.relay_proc = self.spawn(RELAY, argv, dict(os.environ, PYTHONUNBUFFERED="1"),
                                     Path("/"), self.relay_log)
        deadline = time.monotonic() + RELAY_READY_S
        while time.monotonic() < deadline:
            text = self.relay_log.read_text() if self.relay_log.exists() else ""
            if ready in text:
                return
            if self.relay_proc.poll() is not None:
                raise RuntimeError(f"the relay exited ({self.relay_proc.returncode}): {text}")
            time.sleep(0.05)
        raise RuntimeError(f"the relay was not ready within {RELAY_READY_S:g} s")

    def address(self, host: str) -> str:
        return self.ip[host]

    def spawn(self, host: str, argv: list[str], env: dict, cwd: Path,
              log: Path) -> subprocess.Popen:
        """Start ``argv`` in ``host``'s namespace, its output in ``log``."""
        out = open(log, "ab")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv], env=env, cwd=cwd,
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        self.procs.append(p)
        return p

    def run(self, host: str, argv: list[str], timeout_s: float,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """``argv`` run to its end in ``host``'s namespace (bounded by ``timeout_s``)."""
        return subprocess.run(["ip", "netns", "exec", self.ns[host], *argv], env=env,
                              capture_output=True, text=True, timeout=timeout_s)

    def loss_counters(self, host: str) -> tuple[int, int]:
        """(packets that arrived at ``host``'s eth0, packets of them dropped), from the
        counters of its two iptables rules; (0, 0) without loss."""
        out = _in(self.ns[host], "iptables", "-w", "5", "-S", "INPUT", "-v").stdout
        seen = dropped = 0
        for rule in out.splitlines():          # -A INPUT -i eth0 [...] -c PACKETS BYTES [-j DROP]
            words = rule.split()
            if words[:4] != ["-A", "INPUT", "-i", "eth0"] or "-c" not in words:
                continue
            packets = int(words[words.index("-c") + 1])
            if "DROP" in words:
                dropped += packets
            else:
                seen += packets
        return seen, dropped

    def tbf_counters(self, host: str) -> dict:
        """``tc -s`` of the tbf on ``host``'s eth0 (what it sends): bytes and packets sent,
        dropped, and overlimits (packets that had to wait for tokens)."""
        import re

        out = _in(self.ns[host], "tc", "-s", "qdisc", "show", "dev", "eth0").stdout
        m = re.search(r"qdisc tbf .*?Sent (\d+) bytes (\d+) pkt \(dropped (\d+), "
                      r"overlimits (\d+)", out, re.S)
        if m is None:
            return {}
        return dict(zip(("bytes", "packets", "dropped", "overlimits"), map(int, m.groups())))

    def relay_stats(self) -> str:
        """The relay's log so far (its connections and bytes)."""
        try:
            return self.relay_log.read_text() if self.relay_log else ""
        except OSError:
            return ""

    def close(self) -> None:
        if self.relay_proc is not None and self.relay_proc.poll() is None:
            self.relay_proc.terminate()      # it writes its totals
            try:
                self.relay_proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        for ns in [*self.ns.values(), self.hub]:
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        if self._relay_tmp is not None:
            shutil.rmtree(self._relay_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# the compose topology on it

REPO = Path(__file__).resolve().parents[1]
SERVER = "server"                  # the service that the workers reach


def compose_services(compose: Path | None = None) -> dict:
    """docker-compose.yml's services: name -> (argv to run here, environment, exposed ports).
    ``asgd`` becomes ``python -m asgd.cli``."""
    import shlex

    import yaml

    doc = yaml.safe_load((compose or REPO / "docker-compose.yml").read_text())
    out = {}
    for name, svc in doc["services"].items():
        argv = shlex.split(svc["command"])
        assert argv[0] == "asgd", argv
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        ports = [int(str(p).split("/")[0]) for p in svc.get("expose") or []]
        out[name] = ([sys.executable, "-m", "asgd.cli", *argv[1:]], env, ports)
    return out


@dataclass
class ComposeRun:
    test_accuracy: float
    train_s: float                 # from the server's start to the last worker's exit
    result: dict                   # asgd eval's answer
    logs: dict                     # service -> the tail of its log
    relay: str = ""                # the relay's log: its connections and totals
    loss: dict | None = None       # service -> (packets arrived, dropped), with shaping
    server: dict | None = None     # the server's last "server" record (updates, bytes, ...)
    workers: list | None = None    # the workers' "worker_done" records


def run_compose(work: Path, env: dict, shaping: Shaping | None = None,
                overrides: list[str] | tuple = (), services: dict | None = None,
                timeout_s: float = 240.0, subnet: int = 0) -> ComposeRun:
    """docker-compose.yml's services, each in a host of its own, in ``work`` (the containers'
    /app: configs copied in, runs/ and logs/ made); ``overrides`` (key=value) are appended to
    every service's command as ``--set``. With a delay in ``shaping`` the workers reach the
    server through the relay. Then ``asgd eval`` of the server's checkpoint."""
    import json
    import signal

    services = services or compose_services()
    if not (work / "configs").exists():
        shutil.copytree(REPO / "configs", work / "configs")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for f in logs.glob("*.log"):
        f.unlink()
    shutil.rmtree(work / "runs", ignore_errors=True)
    env = dict(env, PYTHONPATH=str(REPO))
    sets = [a for o in overrides for a in ("--set", o)]
    shaping = shaping or Shaping()
    relay = (SERVER, services[SERVER][2] or [5555]) \
        if shaping.delay_ms > 0 and shaping.delay_in == "stream" else None
    tails = {}
    with Topology(list(services), subnet=subnet, shaping=shaping, relay=relay,
                  relay_max_s=timeout_s + 60, relay_log=logs / "relay.log") as topo:
        started = time.monotonic()
        deadline = started + timeout_s
        procs = {}
        try:
            for name, (argv, senv, _) in services.items():
                procs[name] = topo.spawn(name, [*argv, *sets], dict(env, **senv), work,
                                         logs / f"{name}.log")
                if name == SERVER:
                    time.sleep(0.5)
            for n in (n for n in services if n != SERVER):
                rc = procs[n].wait(timeout=max(1.0, deadline - time.monotonic()))
                if rc != 0:
                    raise RuntimeError(f"{n} exited with {rc}: "
                                       + (logs / f"{n}.log").read_text()[-3000:])
            train_s = time.monotonic() - started
            procs[SERVER].send_signal(signal.SIGTERM)      # it writes its checkpoint
            if procs[SERVER].wait(timeout=60) != 0:
                raise RuntimeError("the server failed: "
                                   + (logs / f"{SERVER}.log").read_text()[-3000:])
            loss = {n: topo.loss_counters(n) for n in services} if shaping.loss > 0 else None
        finally:
            for n in services:
                f = logs / f"{n}.log"
                tails[n] = f.read_text()[-20000:] if f.exists() else ""
    r = subprocess.run([sys.executable, "-m", "asgd.cli", "eval", "runs/compose"], cwd=work,
                       env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"asgd eval failed: {r.stderr[-3000:]}")
    result = json.loads(r.stdout)
    relay_log = logs / "relay.log"
    records = [json.loads(line) for line in
               (work / "runs" / "compose" / "metrics.jsonl").read_text().splitlines() if line]
    server = [m for m in records if m.get("kind") == "server"]
    return ComposeRun(result["test_accuracy"], train_s, result, tails,
                      relay_log.read_text() if relay_log.exists() else "", loss,
                      server[-1] if server else None,
                      [m for m in records if m.get("kind") == "worker_done"])


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

    ap = argparse.ArgumentParser(prog="multihost.py echo")
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

    ap = argparse.ArgumentParser(prog="multihost.py probe")
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

    ap = argparse.ArgumentParser(prog="multihost.py delay")
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

    ap = argparse.ArgumentParser(prog="multihost.py relay")
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
    sys.exit("usage: multihost.py relay --to ADDRESS --port P [--delay-ms MS]\n"
             "       multihost.py delay --dev TUN [--delay-ms MS]\n"
             "       multihost.py echo --port P\n"
             "       multihost.py probe --to HOST --port P [--pings N] [--bytes B]")
