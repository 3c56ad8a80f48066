"""Entry points of the real runtime: one worker, a coordinator, a local launch, a status query.

``islands launch CONFIG --workers 4 --out runs/x`` starts a coordinator in this process and
4 worker processes on this machine, streams their per-round log lines, and writes
``runs/x/w<i>/`` (each worker's run directory) and the merged ``runs/x/summary.json``
(with the coordinator's view of the job), ``final.safetensors`` and ``loss.png``.

Two emulations make one machine stand in for uneven, poorly connected ones:
``--emulate-network`` (each worker in a network namespace, its links shaped as ``[network]``
says: :mod:`islands.runtime.wan`) and ``--emulate-compute`` (each worker slowed by its
``[compute]`` step time over the fastest worker's: :func:`throttle`). A config's ``[[faults]]``
plan is carried out on the launched processes (:class:`FaultRunner`: crashes, leaves, joins,
slowdowns and link changes, at a round or a time).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from islands.core.config import RunConfig
from islands.core.errors import CommError, ConfigError
from islands.core.sections import present_at_start
from islands.metrics.run_dir import RunDir, check_writable, clear_job, write_json
from islands.runtime.auth import client_connect
from islands.runtime.coordinator import Coordinator
from islands.runtime.fingerprint import config_fingerprint
from islands.runtime.report import write_job

log = logging.getLogger("islands.launch")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(name)s %(message)s",
                        datefmt="%H:%M:%S")


def parse_worker_id(text: str) -> int:
    """``"2"`` or ``"w2"`` -> 2: worker ids are indices into the config's workers."""
    digits = text[1:] if text[:1].lower() == "w" else text
    if not digits.isdigit():
        raise ConfigError(f"--worker-id ({text!r}) must be a worker index such as 2 or w2")
    return int(digits)


def fixed_world(cfg: RunConfig) -> int:
    """The world size of a fixed group started by torchrun; it must be the config's workers."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if not world:
        raise ConfigError("give --coordinator HOST:PORT, or run under torchrun "
                          "(which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    if world != cfg.workers:
        raise ConfigError(f"torchrun started {world} processes (WORLD_SIZE) but the config "
                          f"has workers = {cfg.workers}: the run would differ from the one "
                          f"configured; pass --nproc-per-node {cfg.workers} or --set "
                          f"workers={world}")
    return world


def connect(cfg: RunConfig, worker_id: int, *, coordinator: str | None, token: bytes,
            host: str | None = None, stopping: threading.Event | None = None):
    """This worker's membership (not yet started) and rendezvous store: a coordinator's
    client and a store this worker hosts, or a fixed torchrun group and its store."""
    from islands.core.signing import Signer
    from islands.runtime.membership import CoordinatorClient, FixedMembership
    from islands.runtime.worker import advertised_host
    from islands.transports.dist import open_store

    timeout = cfg.runtime.collective_timeout_s
    if coordinator is None:
        world = fixed_world(cfg)
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = open_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           is_master=worker_id == 0 and not agent, timeout_s=timeout)
        return FixedMembership(world), store
    host = host or advertised_host(coordinator)
    store = open_store(host, 0, is_master=True, timeout_s=timeout)
    signer = Signer() if cfg.runtime.trust == "open" else None
    membership = CoordinatorClient(coordinator, token, worker_id, [host, store.port],
                                   heartbeat_s=cfg.runtime.heartbeat_s,
                                   reconnect_s=cfg.runtime.join_timeout_s, stopping=stopping,
                                   coordinator_timeout_s=cfg.runtime.coordinator_timeout_s,
                                   signer=signer)
    return membership, store


def run_worker(cfg: RunConfig, worker_id: int, *, coordinator: str | None, token: bytes,
               out_dir: str | Path | None, checkpoint_dir=None, resume=None,
               host: str | None = None, stopping: threading.Event | None = None,
               existing: str = "refuse") -> dict:
    """Runs one worker to the end: with a coordinator, or in a fixed torchrun group.

    Args:
        stopping: set by the caller's SIGTERM handler: the worker leaves promptly from any
            state (waiting to join, in a barrier, in a collective).
        existing: what to do with a run already in ``out_dir`` (see
            :func:`islands.runtime.outputs.claim`; resuming a checkpoint keeps it).
    """
    from islands.runtime import outputs
    from islands.runtime.worker import RuntimeWorker, check_worker_id

    check_worker_id(cfg, worker_id)
    for path, what in ((out_dir, "--out"), (checkpoint_dir, "--checkpoint-dir")):
        if path is not None:  # before any training: a bad path fails now, not at the end
            check_writable(path, what)
    append = out_dir is not None and outputs.claim(
        RunDir(out_dir), cfg, existing="resume" if resume and existing == "refuse" else existing)
    membership, store = connect(cfg, worker_id, coordinator=coordinator, token=token, host=host,
                                stopping=stopping)
    worker = RuntimeWorker(cfg, worker_id, membership, store, token=token, out_dir=out_dir,
                           append=append, checkpoint_dir=checkpoint_dir, resume=resume,
                           stopping=stopping)
    membership.on_live = worker.on_live
    return worker.run()


def start_coordinator(cfg: RunConfig, port: int, token: bytes, host: str = "0.0.0.0", *,
                      fingerprint: dict | None = None, insecure: bool = False) -> Coordinator:
    """Starts a coordinator with the config's ``[runtime]`` settings.

    Args:
        fingerprint: the job's config fingerprint (None: learned from the first worker).
        insecure: allow an empty token on an address beyond loopback.

    Raises:
        ConfigError: no token while listening beyond loopback, without ``insecure``.
        CommError: the port cannot be bound (one line naming it).
    """
    if not token and not insecure and not is_loopback(host):
        raise ConfigError(f"no --token-file: anyone who can reach {host}:{port} could join the "
                          "run and send it data. Give --token-file FILE (a random secret "
                          "shared by the workers), bind --host 127.0.0.1, or pass --insecure "
                          "on a network you trust")
    r = cfg.runtime
    # without a config of its own, the coordinator takes the settings it reads from the first
    # worker (they are part of every worker's fingerprint, so the others must agree)
    return Coordinator(host, port, token=token, heartbeat_timeout_s=r.heartbeat_timeout_s,
                       deadline_s=r.round_deadline_s, join_timeout_s=r.join_timeout_s,
                       fingerprint=fingerprint, max_attempts=r.max_attempts,
                       min_quorum=getattr(cfg.algorithm, "min_quorum", 0),
                       grace_s=getattr(cfg.algorithm, "grace_s", 0.0),
                       adopt_settings=fingerprint is None).start()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def query_status(addr: str, token: bytes) -> dict:
    """The coordinator's status (members, epoch, last round)."""
    ch = client_connect(addr, token, {"role": "status"})
    try:
        ch.send({"op": "status"})
        return ch.recv()
    finally:
        ch.close()


THROTTLE_PERIOD_S = 0.03


def throttle(process: subprocess.Popen, factor: float, *, period_s: float = THROTTLE_PERIOD_S,
             stop: threading.Event | None = None) -> threading.Thread | None:
    """Makes ``process`` ``factor`` times slower until it ends (or ``stop`` is set): stopped
    (SIGSTOP) for ``1 - 1/factor`` of every ``period_s``, running for the rest, from a thread
    of this process, which it returns (None: ``factor <= 1``, nothing to do). Its own clock
    sees the time it was stopped, as a slower machine's would. Where processes share too few
    cores, the stopped one also loses its turns to the others: it ends slower than
    ``factor``."""
    if factor <= 1:
        return None
    run_s = period_s / factor

    def cycle() -> None:
        while process.poll() is None and not (stop is not None and stop.is_set()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGSTOP)
            time.sleep(period_s - run_s)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # each cycle ends running
            time.sleep(run_s)

    t = threading.Thread(target=cycle, daemon=True, name=f"throttle {process.pid}")
    t.start()
    return t


class Workers:
    """The launched worker processes, one per worker id; a fault plan's crash kills one (its
    folder kept as ``w<i>-crashed-<k>``), its join starts one anew.

    Args:
        argv: ``worker id -> command line`` of one worker process.
        out: the launch's folder (``w<i>/`` per worker).
    """

    def __init__(self, argv: Callable[[int], list[str]], out: Path) -> None:
        self.argv, self.out = argv, out
        self.procs: dict[int, subprocess.Popen] = {}
        self.crashed: set[int] = set()  # killed by the plan, not started again
        self.relays: list[threading.Thread] = []
        self._crashes = 0

    def start(self, i: int) -> subprocess.Popen:
        """Starts worker ``i``; its stdout comes through here line by line, so no two lines
        ever share one."""
        p = subprocess.Popen(self.argv(i), stdout=subprocess.PIPE, text=True)
        relay = threading.Thread(target=_relay, args=(p.stdout,), daemon=True)
        relay.start()
        self.procs[i], self.crashed = p, self.crashed - {i}
        self.relays.append(relay)
        return p

    def crash(self, i: int) -> None:
        """Kills worker ``i`` (SIGKILL) and keeps its folder aside."""
        p = self.procs[i]
        p.kill()
        p.wait()
        self._crashes += 1
        if (self.out / f"w{i}").exists():
            (self.out / f"w{i}").rename(self.out / f"w{i}-crashed-{self._crashes}")
        self.crashed.add(i)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs.values())


class Throttles:
    """One :func:`throttle` per worker process, changed as a fault plan slows a worker."""

    def __init__(self, procs: dict[int, subprocess.Popen]) -> None:
        self.procs, self.factors = procs, {}
        self._stops: dict[int, threading.Event] = {}

    def set(self, i: int, factor: float) -> None:
        """Worker ``i`` runs ``factor`` times slower from now on (1 or less: unthrottled)."""
        if i in self._stops:
            self._stops.pop(i).set()
        self.factors[i] = factor
        stop = threading.Event()
        if throttle(self.procs[i], factor, stop=stop) is not None:
            self._stops[i] = stop


# the fault plan's events islands launch carries out on real processes (a partition stays the
# simulator's: the runtime's gossip cannot keep exchanging within each side of a cut)
LAUNCH_FAULTS = ("crash", "leave", "join", "slow", "link")
POLL_S = 0.05  # how often the fault plan looks at the coordinator's round


def check_launch_faults(cfg: RunConfig, emulate_network: bool) -> None:
    """Refuses, before anything starts, a ``[[faults]]`` event ``islands launch`` cannot carry
    out, naming it and what to do."""
    absent = set(range(cfg.workers)) - present_at_start(cfg.faults, cfg.workers)
    for i, f in enumerate(cfg.faults):
        key = f"faults[{i}]"
        if f.kind not in LAUNCH_FAULTS:
            raise ConfigError(f"{key} (kind = {f.kind!r}): islands launch carries out the fault "
                              f"plan's {', '.join(LAUNCH_FAULTS)} events; a partition runs in "
                              "the simulator only (islands sim): remove it")
        if f.kind == "join" and f.worker in absent:
            raise ConfigError(f"{key}: worker {f.worker} joins without having been there "
                              "(its first membership event): islands launch starts every "
                              "worker with the job (the job's start waits for all of them); "
                              "give it a leave or a crash before, or run the plan in the "
                              "simulator")
        if f.kind == "link" and not emulate_network:
            raise ConfigError(f"{key} (kind = 'link') changes a shaped link: launch with "
                              "--emulate-network")
        if f.kind == "link" and f.latency_s is not None:
            raise ConfigError(f"{key}.latency_s ({f.latency_s}): real processes' latency is "
                              "not emulated (netem is not in this kernel: see "
                              "islands.runtime.wan); remove it, or run the plan in the "
                              "simulator")


class FaultRunner:
    """Carries out the fault plan on launched workers, each event when due: at its ``at_s``
    (wall seconds from the job's start, when the coordinator formed its first group: the
    simulator's virtual time starts there too) or as soon as the coordinator has its
    ``round`` in flight (polled every :data:`POLL_S`; the workers do not wait for it, so it
    lands a little into that round). A ``crash`` kills the worker (SIGKILL), a ``leave`` asks
    it to stop (SIGTERM: it leaves with its files written), a ``join`` starts it anew (it
    receives the committed state, healing into the round in flight or at the next start); a
    ``slow`` worker runs ``factor`` times slower than its ``--emulate-compute`` share
    (:class:`Throttles`); a ``link`` is shaped anew
    (:meth:`~islands.runtime.wan.EmulatedNetwork.set_link`). Each is logged, and listed in
    :attr:`carried_out` with when it happened (and a link's rates as ``tc`` holds them
    after)."""

    def __init__(self, faults, workers: Workers, throttles: Throttles, net,
                 coord: Coordinator) -> None:
        self.pending = list(enumerate(faults))
        self.workers, self.throttles, self.net, self.coord = workers, throttles, net, coord
        self.carried_out: list[dict] = []
        self._stop = threading.Event()
        self._started: float | None = None  # when the first group formed
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault plan")

    def start(self) -> FaultRunner:
        if self.pending:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops looking; the events not due by then are listed as skipped (the job ended
        first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for i, f in self.pending:
            self.carried_out.append({"fault": i, "kind": f.kind, "worker": f.worker,
                                     "skipped": "the job ended first"})
            log.warning("fault plan: faults[%d] (%s of worker %s) not carried out: the job "
                        "ended first", i, f.kind, f.worker)
        self.pending = []

    def _run(self) -> None:
        while self.pending and not self._stop.wait(POLL_S):
            s = self.coord.status()
            if self._started is None:
                if s["epoch"] == 0:
                    continue
                self._started = time.monotonic()
            at_s = time.monotonic() - self._started
            now = max(s["last_round"], s["round_in_flight"] if s["round_in_flight"] is not None
                      else -1)
            for i, f in [(i, f) for i, f in self.pending
                         if (f.round is not None and now >= f.round)
                         or (f.at_s is not None and at_s >= f.at_s)]:
                self.pending.remove((i, f))
                self._carry_out(i, f, at_s, now)

    def _carry_out(self, i: int, f, at_s: float, round_now: int) -> None:
        done = {"fault": i, "kind": f.kind, "worker": f.worker, "at_s": round(at_s, 3),
                "round": round_now}
        w, running = f.worker, self.workers.procs[f.worker].poll() is None
        if f.kind in ("crash", "leave") and running:
            if f.kind == "crash":
                self.workers.crash(w)
            else:
                self.workers.procs[w].send_signal(signal.SIGTERM)
            log.info("fault plan: worker %d %s (faults[%d], round %d, %.1f s)", w,
                     "killed" if f.kind == "crash" else "asked to leave", i, round_now, at_s)
        elif f.kind == "join" and not running:
            self.workers.start(w)
            self.throttles.set(w, self.throttles.factors.get(w, 1.0))
            log.info("fault plan: worker %d started anew (faults[%d], round %d, %.1f s)", w, i,
                     round_now, at_s)
        elif f.kind in ("crash", "leave", "join"):
            done["skipped"] = "running" if f.kind == "join" else "not running"
            log.info("fault plan: faults[%d] (%s of worker %d) skipped: it is %s", i, f.kind, w,
                     done["skipped"])
        elif f.kind == "slow":
            factor = self.throttles.factors.get(f.worker, 1.0) * f.factor
            self.throttles.set(f.worker, factor)
            done["factor"] = factor
            log.info("fault plan: worker %d runs %.2fx slower from now on (faults[%d], round "
                     "%d, %.1f s)", f.worker, factor, i, round_now, at_s)
        else:
            done.update(self.net.set_link(f.worker, f.upload_bps, f.download_bps))
            log.info("fault plan: worker %d's link is now %s up, %s down (faults[%d], round "
                     "%d, %.1f s)", f.worker, _mbit(done["upload_bps"]),
                     _mbit(done["download_bps"]), i, round_now, at_s)
        self.carried_out.append(done)


def _mbit(bps: int | None) -> str:
    return "unshaped" if bps is None else f"{bps / 1e6:g} Mbit/s"


def compute_factors(cfg: RunConfig) -> dict[int, float]:
    """Each worker's slowdown under ``--emulate-compute``: its ``[compute]`` step time over
    the fastest worker's."""
    own = {w.id: w.step_time_s for w in cfg.compute.worker}
    times = [own.get(i, cfg.compute.step_time_s) for i in range(cfg.workers)]
    return {i: t / min(times) for i, t in enumerate(times)}


def launch(cfg: RunConfig, out: Path, argv_for: Callable[[int, str, str], list[str]], *,
           token: bytes = b"", timeout_s: float | None = None,
           existing: str = "refuse", emulate_network: bool = False,
           emulate_compute: bool = False) -> dict:
    """Starts a coordinator here and ``cfg.workers`` worker processes; returns the merged summary.

    Args:
        cfg: the run's config.
        out: the launch's folder (``config.json``, ``w<i>/`` per worker, the merged
            ``summary.json``, ``final.safetensors`` and ``loss.png``).
        argv_for: ``(worker id, coordinator address, its own address) -> command line`` of
            one worker.
        token: the shared secret.
        timeout_s: kill the workers after this long (None: wait).
        existing: ``"refuse"`` another run (or this one finished) in ``out``, or
            ``"overwrite"`` it (its files and its workers' are removed first).
        emulate_network: each worker in a network namespace of its own, its upload and
            download shaped as ``[network]`` says (:mod:`islands.runtime.wan`; root only).
        emulate_compute: each worker slowed by its ``[compute]`` step time over the
            fastest's (:func:`throttle`).
    """
    from islands.runtime.member import refuse_simulator_only

    check_launch_faults(cfg, emulate_network)  # before anything starts
    refuse_simulator_only(cfg.replace(faults=[]))  # (the workers run without the plan)
    if emulate_network:
        from islands.runtime.wan import check_available

        check_available()  # before anything is written
    if existing == "overwrite":
        clear_job(out)
    else:
        RunDir(out, fix="give another --out, or --overwrite to replace it").claim(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg.to_dict())
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(emulated(cfg)) if emulate_network else None
        factors = compute_factors(cfg) if emulate_compute else {}
        return _launch(cfg, out, argv_for, token, timeout_s, net, factors)


def emulated(cfg: RunConfig):
    """The shaped namespaces of ``cfg.workers`` workers, from ``[network]`` (the coordinator
    in this process, on the bridge's own address)."""
    from islands.runtime.wan import EmulatedNetwork

    n, default = cfg.workers, cfg.network.bandwidth_bps
    links = {w.id: w for w in cfg.network.worker}
    up = [getattr(links.get(i), "upload_bps", None) or default for i in range(n)]
    down = [getattr(links.get(i), "download_bps", None) or default for i in range(n)]
    return EmulatedNetwork(up, down)


def _launch(cfg, out, argv_for, token, timeout_s, net, factors) -> dict:
    host = net.gateway if net is not None else "127.0.0.1"
    # a private bridge on this machine: no token needed, as on loopback; the fault plan is
    # this process's to carry out (argv_for gives the workers none)
    coord = start_coordinator(cfg, 0, token, host=host,
                              fingerprint=config_fingerprint(cfg.replace(faults=[])),
                              insecure=net is not None)
    addr = f"{host}:{coord.port}"
    wrap = net.command if net is not None else (lambda i, argv: argv)
    own = net.addr if net is not None else (lambda i: "127.0.0.1")
    # each worker sets its torch threads from the config's `threads` (auto: 1 on the CPU)
    workers = Workers(lambda i: wrap(i, argv_for(i, addr, own(i))), out)
    for i in range(cfg.workers):
        workers.start(i)
    throttles = Throttles(workers.procs)
    for i, factor in sorted(factors.items()):
        throttles.set(i, factor)
        if factor > 1:
            log.info("worker %d runs %.2fx slower (--emulate-compute: [compute])", i, factor)
    faults = FaultRunner(cfg.faults, workers, throttles, net, coord).start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while workers.running():  # (a joiner started meanwhile included)
            if deadline is not None and time.monotonic() > deadline:
                raise CommError(f"launch: workers still running after {timeout_s} s; killed")
            time.sleep(0.1)
    finally:
        faults.stop()
        for p in workers.procs.values():
            if p.poll() is None:
                p.kill()
        for t in workers.relays:
            t.join(timeout=5)
        coord.stop()
    failed = [i for i, p in sorted(workers.procs.items())
              if p.returncode != 0 and i not in workers.crashed]
    if failed:
        raise CommError(f"launch: workers {failed} exited with an error (see their log above)")
    merged = write_job(out, coord.job_view(), title=f"{cfg.label} (islands launch)")
    if cfg.faults:  # what the plan asked, and when it happened
        merged["faults_carried_out"] = faults.carried_out
        write_json(out / "summary.json", merged)
    return merged


_STDOUT = threading.Lock()


def _relay(stream) -> None:
    """Copies a worker's stdout to this process's, whole lines at a time."""
    for line in stream:
        with _STDOUT:
            sys.stdout.write(line if line.endswith("\n") else line + "\n")
            sys.stdout.flush()
