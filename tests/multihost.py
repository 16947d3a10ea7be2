"""A multi-host harness: the compose topology in network namespaces on this machine.

    with Topology(["server", "worker-0", "worker-1"]) as topo:   # a host per service
        topo.address("server")                                    # 198.18.x.2
        popen = topo.spawn("worker-0", [sys.executable, ...], env, cwd, log)

Each host is a network namespace with its loopback up and one end of a veth pair; the other
ends join a bridge in a hub namespace, addresses from the benchmarking range 198.18.0.0/15.
Service names resolve in every host through ``/etc/netns/<namespace>/hosts``, which
``ip netns exec`` puts over ``/etc/hosts``. Everything made is removed on exit, and names carry
the process id so that parallel runs never meet. ``available()`` says whether namespaces can
be made here (root and iproute2), and why not.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ETC_NETNS = Path("/etc/netns")


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=20)


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


class Topology:
    def __init__(self, hosts: list[str], subnet: int = 0):
        tag = f"{os.getpid() % 100000}"
        self.hub = f"asgd{tag}-hub"
        self.ns = {h: f"asgd{tag}-{i}" for i, h in enumerate(hosts)}
        # 198.18.<subnet>.0/24, .1 unused, hosts from .2
        self.ip = {h: f"198.18.{subnet}.{i + 2}" for i, h in enumerate(hosts)}
        self.tag = tag
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

    def _build(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("link", "set", "lo", "up", ns=self.hub)
        _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        _ip("link", "set", "br0", "up", ns=self.hub)
        hosts_file = "".join(f"{ip} {h}\n" for h, ip in self.ip.items())
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
            (etc / "hosts").write_text("127.0.0.1 localhost\n" + hosts_file)

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

    def close(self) -> None:
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
