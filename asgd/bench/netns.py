"""A multi-host harness: hosts in network namespaces on this machine, and shaped links.

Shared by tests/test_multihost.py and bench/shaped.py; the compose topology on it is
asgd.bench.compose, the delay relay and the probe asgd.bench.relay.

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
* delay: the kernel here has no netem, so a relay of this package's own (``Relay``, run with
  ``python asgd/bench/relay.py relay``) does it: an extra host ``relay`` whose TCP relay
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
process (``python asgd/bench/relay.py delay``) writes each packet back ``delay_ms`` later, to
be routed on to its destination. Then TCP's handshake, its acknowledgements and its loss
recovery all wait for the delay, as on a real distant link. See docs/performance.md,
"Across hosts: a shaped network".

What the shaping does can be read back: ``loss_counters(host)`` (packets that arrived at a
host, and those of them dropped: a counting rule sits before the drop rule),
``tbf_counters(host)`` (``tc -s``: bytes sent, overlimits), the relay's log (a line per
connection with its bytes each way, then the totals), and a probe (asgd.bench.relay):

    python asgd/bench/relay.py echo --port 5555              # in one host: echo and sink
    python asgd/bench/relay.py probe --to server --port 5555 # in another: JSON, round
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
RELAY_SCRIPT = Path(__file__).resolve().with_name("relay.py")   # stdlib only
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
        routed (table 100) into a TUN device, whose process (``python asgd/bench/relay.py
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
        argv = [sys.executable, str(RELAY_SCRIPT), *command,
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
