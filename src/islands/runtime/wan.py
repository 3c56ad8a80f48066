"""Emulated slow links between real processes on one machine: each host in a network namespace
of its own on a Linux bridge, its upload and download shaped by ``tc``'s token bucket (tbf).

    with EmulatedNetwork([100e6, 100e6], [100e6, 100e6]) as net:   # upload, download bps
        subprocess.Popen(net.command(0, ["python", "-m", "islands.cli.runtime_cmd", ...]))
        net.addr(0)        # host 0's address on the bridge: give it as --host
        net.gateway        # the root namespace's address on the bridge (a coordinator here)

Host ``i``'s upload is the egress of its interface (``wan0``, inside its namespace) and its
download the egress of the bridge's side of its link, so the two directions are shaped apart,
as a full-duplex access link is. The root namespace sits on the bridge at :attr:`gateway`
(``.1``) with an unshaped link: the coordinator and the test run there.

Latency is not emulated: ``netem`` is not in this kernel, and a relay that delays packets in
user space would spend the CPU the workers need on 2 cores. It stays in the simulator; a
comparison of the two worlds sets ``network.latency_s`` to the bridge's (about 0.1 ms).

Cleanup: :meth:`EmulatedNetwork.stop` (or leaving the ``with``) deletes every namespace and link
it made. A guardian process, in a session of its own, does the same when the process that made
them dies without stopping (SIGKILL), and :func:`remove_stale` deletes what a dead owner left.
Everything made is named ``isl<pid>x<k>...`` after the owner's pid (base 36, so that a link's
name fits Linux's 15 characters).

Run ``python -m islands.runtime.wan --clean`` to remove what dead owners left.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from islands.core.errors import ConfigError

INTERFACE = "wan0"  # each namespace's link to the bridge
_NAME = re.compile(r"^isl([0-9a-z]+)x([0-9a-z]+)")
_LOCK = Path("/tmp/islands-wan.lock")
_counter = iter(range(1, 1 << 30))
_counter_lock = threading.Lock()

# the guardian: waits for its stdin to close (its owner stopped or died), then deletes
# every namespace and link named with the prefix; stdlib only, so it starts in milliseconds
GUARD = r"""
import re, subprocess, sys
mine = re.compile(re.escape(sys.argv[1]) + "[hbvp]")  # not isl..x10's when this is isl..x1
sys.stdin.read()
out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
for ns in re.findall(r"^(\S+)", out, re.M):
    if mine.match(ns):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
for dev in re.findall(r"^\d+: ([^:@]+)", out, re.M):
    if mine.match(dev):
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
"""


def _run(*argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"emulating the network: `{' '.join(argv)}` failed: "
                          f"{(r.stderr or r.stdout).strip()}")
    return r.stdout


def check_available() -> None:
    """Raises ``ConfigError`` saying what is missing when namespaces cannot be made here."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"--emulate-network needs iproute2's {' and '.join(missing)} (apt-get "
                          "install iproute2)")
    if os.geteuid() != 0:
        raise ConfigError("--emulate-network makes network namespaces and shapes links, which "
                          "needs root: run it as root (or without --emulate-network)")


def tbf_burst(rate_bps: float) -> int:
    """The bucket of a tbf at ``rate_bps``: 10 ms of traffic, at least 64 KiB (a bucket below
    rate / HZ cannot reach the rate)."""
    return max(1 << 16, int(rate_bps / 8 / 100))


class EmulatedNetwork:
    """Hosts in network namespaces on a bridge, each direction of each link shaped.

    Args:
        upload_bps: per host, its upload capacity in bits per second (None: unshaped).
        download_bps: per host, its download capacity (None: unshaped).
    """

    def __init__(self, upload_bps: list[float | None], download_bps: list[float | None]) -> None:
        if len(upload_bps) != len(download_bps):
            raise ValueError("upload_bps and download_bps need one value per host")
        with _counter_lock:
            self.prefix = f"isl{_base36(os.getpid())}x{_base36(next(_counter))}"
        if len(self.prefix) + 1 + len(str(len(upload_bps))) > 15:
            raise ValueError(f"{len(upload_bps)} hosts: link names would pass 15 characters")
        self.upload_bps, self.download_bps = list(upload_bps), list(download_bps)
        self.subnet: int | None = None
        self._guard: subprocess.Popen | None = None

    @property
    def hosts(self) -> int:
        return len(self.upload_bps)

    def namespace(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def addr(self, i: int) -> str:
        """Host ``i``'s address on the bridge."""
        return f"10.78.{self.subnet}.{i + 2}"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge."""
        return f"10.78.{self.subnet}.1"

    def command(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run in host ``i``'s namespace. Give it ``--host addr(i)``: islands binds
        gloo there (a process that does not can set ``GLOO_SOCKET_IFNAME=wan0``)."""
        return ["ip", "netns", "exec", self.namespace(i), *argv]

    def start(self) -> EmulatedNetwork:
        """Makes the bridge, a namespace and a shaped link per host; a guardian removes them
        if this process dies first."""
        check_available()
        self._guard = subprocess.Popen([sys.executable, "-c", GUARD, self.prefix],
                                       stdin=subprocess.PIPE, start_new_session=True)
        try:
            with open(_LOCK, "w") as lock:  # subnets of concurrent harnesses must differ
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.subnet = _free_subnet()
                bridge = f"{self.prefix}b"
                _run("ip", "link", "add", bridge, "type", "bridge")
                _run("ip", "addr", "add", f"{self.gateway}/24", "dev", bridge)
                _run("ip", "link", "set", bridge, "up")
            for i in range(self.hosts):
                self._add_host(i, bridge)
        except BaseException:
            self.stop()
            raise
        return self

    def _add_host(self, i: int, bridge: str) -> None:
        ns, outer, inner = self.namespace(i), f"{self.prefix}v{i}", f"{self.prefix}p{i}"
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _run("ip", "link", "set", inner, "netns", ns)
        _run("ip", "-n", ns, "link", "set", inner, "name", INTERFACE)
        _run("ip", "link", "set", outer, "master", bridge)
        _run("ip", "link", "set", outer, "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", INTERFACE)
        _run("ip", "-n", ns, "link", "set", INTERFACE, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        if self.upload_bps[i]:
            _shape(["ip", "netns", "exec", ns], INTERFACE, self.upload_bps[i])
        if self.download_bps[i]:
            _shape([], outer, self.download_bps[i])

    def set_link(self, i: int, upload_bps: float | None = None,
                 download_bps: float | None = None) -> dict[str, int | None]:
        """Host ``i``'s upload and/or download shaped anew, the other direction unchanged
        (a fault plan's ``link`` event, mid-run). Returns the rates the kernel holds now,
        read back from ``tc`` (None: that direction is unshaped)."""
        ns, outer = self.namespace(i), f"{self.prefix}v{i}"
        if upload_bps is not None:
            _shape(["ip", "netns", "exec", ns], INTERFACE, upload_bps, op="replace")
            self.upload_bps[i] = upload_bps
        if download_bps is not None:
            _shape([], outer, download_bps, op="replace")
            self.download_bps[i] = download_bps
        return {"upload_bps": _rate(["ip", "netns", "exec", ns], INTERFACE),
                "download_bps": _rate([], outer)}

    def stop(self) -> None:
        """Deletes every namespace and link this network made (the guardian checks again)."""
        if self._guard is None:
            return
        for i in range(self.hosts):
            subprocess.run(["ip", "netns", "del", self.namespace(i)], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.prefix}b"], capture_output=True)
        self._guard.stdin.close()  # the guardian looks for leftovers and exits
        self._guard.wait(timeout=30)
        self._guard = None

    def __enter__(self) -> EmulatedNetwork:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _shape(prefix: list[str], dev: str, rate_bps: float, op: str = "add") -> None:
    _run(*prefix, "tc", "qdisc", op, "dev", dev, "root", "tbf", "rate", f"{int(rate_bps)}bit",
         "burst", str(tbf_burst(rate_bps)), "latency", "100ms")


_RATE = re.compile(r"\btbf\b.*?\brate (\d+(?:\.\d+)?)([KMG]?)bit")


def _rate(prefix: list[str], dev: str) -> int | None:
    """The rate of ``dev``'s root tbf in bits per second, as ``tc`` reports it (None: none)."""
    m = _RATE.search(_run(*prefix, "tc", "qdisc", "show", "dev", dev))
    if m is None:
        return None
    return round(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)])


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def _free_subnet() -> int:
    """The lowest third octet of 10.78.x.0/24 that no bridge of this machine uses."""
    used = {int(m) for m in re.findall(r"10\.78\.(\d+)\.1/", _run("ip", "-4", "-o", "addr"))}
    return next(k for k in range(1, 255) if k not in used)


def owned() -> dict[str, list[str]]:
    """Namespaces and links made by :class:`EmulatedNetwork`, by kind."""
    namespaces = [n for n in re.findall(r"^(\S+)", _run("ip", "netns", "list"), re.M)
                  if _NAME.match(n)]
    links = [d for d in re.findall(r"^\d+: ([^:@]+)", _run("ip", "-o", "link"), re.M)
             if _NAME.match(d)]
    return {"namespaces": namespaces, "links": links}


def remove_stale() -> list[str]:
    """Deletes the namespaces and links whose owner process is gone; returns their names."""
    removed = []
    for kind, names in owned().items():
        for name in names:
            pid = int(_NAME.match(name).group(1), 36)
            if _alive(pid):
                continue
            argv = ["ip", "netns", "del", name] if kind == "namespaces" else \
                ["ip", "link", "del", name]
            if subprocess.run(argv, capture_output=True).returncode == 0:
                removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    if sys.argv[1:] == ["--clean"]:
        print("\n".join(remove_stale()) or "nothing to remove")
    else:
        sys.exit(__doc__.split("\n\n")[-1])
