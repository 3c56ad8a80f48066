"""The butterfly all-reduce over the real transport against gloo's own ``all_reduce``, measured
side by side in the same processes, and the simulator's in-process butterfly against a copy.

For each worker count this spawns that many processes on 127.0.0.1 (a ``TCPStore`` on a free
port, one gloo process group, one torch thread each). In every process, for each size and
codec, gloo's ``all_reduce`` (a sum, in place, on a copy of the tensor in a kept buffer) and
islands' butterfly (:class:`~islands.collectives.butterfly.Group` over
:class:`~islands.transports.dist.DistTransport`) take turns, one call of each per repeat after
a warm-up, in an order drawn anew for each repeat (the same in every process), so that each
follows each of the others alike (``--fixed-turns``: the same order in every repeat;
``--blocks``, and the default with ``--network``: each runs its repeats in a block of its
own), every call after a barrier. A collective's time is the slowest worker's; the
table gives medians over the repeats.

* ``goodput``: fp32 bytes of the tensor (``4 · numel``) over the time, in GB/s.
* ``vs gloo``: gloo's time over the butterfly's (> 1: the butterfly is faster). gloo reduces
  in place into a copy of the tensor made before the clock starts; the butterfly writes its
  result into a buffer the caller keeps from call to call (``out=``).
* ``fresh vs gloo`` (``--fresh``): the same with a new result tensor at each call (no
  ``out=``): the price of 128 MB of new pages, side by side. Off by default: taking its turn
  among the others, it slows the calls after it too (3 workers: the butterfly's 0.75-0.86 of
  gloo's goodput in six runs with it, 0.82-0.87 in three without).
* ``streams vs signed``: the signed butterfly over gloo's pairs, its time over the same
  over islands' framed TCP streams (``runtime.wire = "streams"``: a peer cannot make the
  receiver abort), side by side.
* ``signed vs bfly``: the butterfly's time over its own with every header signed (an open
  job's real runtime: Ed25519 per header, the payload's Merkle roots, checked on receipt),
  side by side in the same processes.
* ``verified vs streams`` (identity rows): the signed butterfly over streams with every sync
  verified (``aggregator.verify = 1``: every member re-sends its phase-1 payloads to the
  verifiers, recomputes one shard it does not own, and each owner signs its inputs' Merkle
  roots with its aggregate), its time over the same unverified: the cost of checking the
  shard owners, side by side.
* ``bfly vs 2-phase`` (identity rows up to 4 workers, where the mean streams): the butterfly
  with its all-gather sent as each step of the shard's mean is computed (the default over
  gloo's pairs without signatures: ``DistTransport.start_relay``), its time over the same
  with the all-gather after the whole reduce (``DistTransport.pipeline = False``), side by
  side.
* ``native vs gloo`` (identity rows): gloo's time over that of the path a trusted job takes
  (``runtime.trust = "cluster"``: the contribution divided by n and checked finite in one
  pass, a vector of who found NaN shared, then gloo's ``all_reduce``), side by side.
* ``check+gloo vs gloo`` and ``native vs check+gloo`` (identity rows): gloo's ``all_reduce``
  after the cheapest complete check that the contribution is finite
  (``codecs.base.all_finite``: one read of every value), the floor of any path that checks
  what it sends, against gloo alone and against the native path.
* ``native vs div+gloo`` (identity rows): PyTorch DDP's ``allreduce_hook`` (the contribution
  divided by n in place, then gloo's ``all_reduce``: the mean without a check), its time over
  the native path's.
* ``--network MBIT``: each worker in a network namespace of its own with its upload and
  download shaped to MBIT Mbit/s (``islands.runtime.wan``; root only).
* breakdown (median over repeats of the mean over workers, in ms): ``encode`` and ``decode``
  (the codec, the finiteness checks included), ``reduce`` (the aggregation), ``pack`` (building
  and parsing the wire messages), ``wire`` (waiting on gloo's sends and receives), ``other``
  (the rest: allocation, bookkeeping).

Then, in this process, the simulator's butterfly (every worker in one process, no network)
for the same worker counts, sizes and codecs: its time per worker (total / workers) against a
``copy_`` of one worker's fp32 tensor into a buffer that already exists.

Run it (each process sets one torch thread):

    python benchmarks/collective.py                                   # the full grid
    python benchmarks/collective.py --workers 2 3 --sizes-mb 128 --codecs identity int8
    python benchmarks/collective.py --quick                           # under a minute
    python benchmarks/collective.py --workers 4 --no-sim              # one worker count

Writes ``bench-results/collective.json`` (``--json`` to move it) with every repeat, the
breakdown, the load average before and after each worker count, and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import islands
from islands.codecs import build_codec, codec_config
from islands.codecs.base import all_finite
from islands.core.timing import Stopwatch

# label -> CodecConfig fields (every codec the [codec] section builds, and the wrappers)
CODECS: dict[str, dict] = {
    "identity": {"name": "identity"},
    "fp16": {"name": "fp16"},
    "bf16": {"name": "bf16"},
    "int8": {"name": "int8"},
    "int4": {"name": "int4"},
    "fp4": {"name": "fp4"},
    "topk1%": {"name": "topk", "fraction": 0.01},
    "randomk1%": {"name": "randomk", "fraction": 0.01},
    "sign": {"name": "sign"},
    "powersgd4": {"name": "powersgd", "rank": 4},
    "ef(int8)": {"name": "int8", "error_feedback": True},
    "int8+zstd": {"name": "int8", "entropy": True},
}
ACTIVITIES = ("encode", "decode", "reduce", "pack", "wire")
QUICK = {"workers": [2, 3], "sizes_mb": [1.0, 16.0], "codecs": ["identity", "int8"],
         "repeats": 3}


def make_codec(label: str, numel: int):
    """A fresh codec; PowerSGD sees the flat tensor as one square-ish matrix."""
    codec = build_codec(codec_config(**CODECS[label]))
    side = max(1, int(numel ** 0.5))
    while numel % side:
        side -= 1
    codec.bind_layout([torch.Size([side, numel // side])])
    return codec


def numel_of(size_mb: float) -> int:
    return int(size_mb * 2**20) // 4


# --- one worker process ---------------------------------------------------------------------

def worker_main(args: argparse.Namespace) -> None:
    """One process of the group: every (size, codec) in order, gloo then the butterfly."""
    from islands.collectives.butterfly import Group
    from islands.collectives.verify import verifiers_for
    from islands.core import memory
    from islands.core.signing import Signer
    from islands.transports.dist import DistTransport, new_group, open_store
    from islands.transports.streams import Listener

    torch.set_num_threads(1)
    if args.chunk_mb:
        from islands.transports import wire

        wire.CHUNK_BYTES = int(args.chunk_mb * 2**20)
    rank, n = args.rank, args.world
    store = open_store(args.store_host, args.port, is_master=rank == 0, timeout_s=120)
    pg = new_group(store, "bench/", rank, n, 120, host=args.host)
    transport = DistTransport(rank, timeout_s=120)
    transport.use_group(pg, tuple(range(n)))
    signer = Signer()  # an open job's key; its public half shared through the store
    store.set(f"key/{rank}", signer.public)
    keys = {r: store.get(f"key/{r}").decode() for r in range(n)}
    transport.streams = Listener(args.host, signer)  # runtime.wire = "streams"
    transport.open_streams(store, "bench-streams/", tuple(range(n)), keys)
    streams, transport._epoch = transport._epoch, None  # gloo's pairs unless swapped in
    transport.stopwatch = Stopwatch()
    group = Group(transport, tuple(range(n)))
    rows = []
    for size_mb in args.sizes_mb:
        numel = numel_of(size_mb)
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        result = memory.empty(numel)
        inplace = memory.empty(numel)  # what gloo reduces in place: x copied in, untimed
        for label in args.codecs:
            codec = make_codec(label, numel)
            row = {"size_mb": size_mb, "codec": label, "gloo_s": [], "butterfly_s": [],
                   "native_s": [], "checked_s": [], "divided_s": [], "signed_s": [],
                   "streams_s": [], "verified_s": [], "two_phase_s": [], "fresh_s": [],
                   "breakdown": []}
            # Over loopback the collectives take turns, one call of each per repeat, so a
            # change in the machine's load during the run reaches all of them alike. Over a
            # shaped link (``--network``) each runs its repeats in a block of its own after its
            # own warm-up: a collective run right after another inherits the TCP state the
            # other left on the pairs (gloo's ring grows the neighbours' windows and leaves
            # the others cold), which cost the butterfly 10-25% when the two alternated.
            turns: list[tuple[str, Callable, Callable]] = []

            def measure(key: str, call, prepare=lambda rep: None, runs: bool = True) -> None:
                """``call(prepare(rep))`` after a barrier, timed: a warm-up, then
                ``args.repeats`` times (none unless ``runs``)."""
                if runs:
                    turns.append((key, call, prepare))

            def butterfly(_=None, **kw) -> None:  # into a result buffer kept by the caller
                group.start_all_reduce({rank: x}, codecs={rank: codec}, tag="bench",
                                       **{"out": {rank: result}, **kw}).wait()

            def breakdown(rep: int) -> None:  # the butterfly; its breakdown and bytes recorded
                transport.stopwatch.reset()
                sent = transport.bytes_sent
                butterfly()
                if rep:  # not the warm-up's
                    row["breakdown"].append(dict(transport.stopwatch.seconds))
                row["bytes_sent"] = transport.bytes_sent - sent

            @contextlib.contextmanager
            def setting(**attrs):  # transport attributes for one collective's calls
                saved = {k: getattr(transport, k) for k in attrs}
                for k, v in attrs.items():
                    setattr(transport, k, v)
                try:
                    yield
                finally:
                    for k, v in saved.items():
                        setattr(transport, k, v)

            def under(call, **attrs):
                def run(arg):
                    with setting(**attrs):
                        call(arg)
                return run

            identity = label == "identity"
            measure("gloo_s", lambda t: pg.allreduce([t]).wait(), lambda rep: inplace.copy_(x))
            # runtime.trust = "cluster": gloo's, the mean, checked
            measure("native_s", lambda t: transport.all_reduce_mean(t, tuple(range(n)),
                                                                    "bench/native"),
                    lambda rep: inplace.copy_(x), runs=identity)
            # gloo's after one read proving every value finite: what checking costs at least
            measure("checked_s", lambda t: (all_finite(t), pg.allreduce([t]).wait()),
                    lambda rep: inplace.copy_(x), runs=identity)
            # PyTorch DDP's allreduce_hook: divide, then gloo's (the mean, unchecked)
            measure("divided_s", lambda t: (t.div_(n), pg.allreduce([t]).wait()),
                    lambda rep: inplace.copy_(x), runs=identity)
            measure("butterfly_s", breakdown, lambda rep: rep)
            measure("fresh_s", lambda _: butterfly(out=None),  # a new result tensor each call
                    runs=args.fresh)
            # the all-gather after the whole reduce
            measure("two_phase_s", under(butterfly, pipeline=False), runs=identity)
            signed = not args.unsigned_only
            for wire, key in ((None, "signed_s"), (streams, "streams_s")):
                # the same, every header signed and checked; over gloo, then over streams
                measure(key, under(butterfly, signer=signer, _epoch=wire),
                        lambda rep, key=key: transport.set_context(f"bench/{key}/{rep}", keys),
                        runs=signed)
            # the same over streams with every sync verified (lossless codecs only)
            measure("verified_s", under(lambda _: butterfly(
                        verifiers=verifiers_for(group.members, 1)), signer=signer,
                        _epoch=streams),
                    lambda rep: transport.set_context(f"bench/verified/{rep}", keys),
                    runs=identity and n > 1 and signed)
            reps = range(args.repeats + 1)
            if not args.interleave:
                order = [(rep, turn) for turn in turns for rep in reps]
            else:
                # What runs just before a call changes its time (caches, the pairs' TCP
                # state): in an order drawn per repeat, each follows each of the others alike.
                order = [(rep, turn) for rep in reps
                         for turn in (turns if args.fixed_turns
                                      else random.Random(rep).sample(turns, len(turns)))]
            for rep, (key, call, prepare) in order:
                arg = prepare(rep)
                pg.barrier().wait()
                start = time.perf_counter()
                call(arg)
                elapsed = time.perf_counter() - start
                if rep:
                    row[key].append(elapsed)
                del arg
            # Every worker must hold the same result: compared by the parent through a digest.
            row["digest"] = digest(group.all_reduce({rank: x}, codecs={rank: codec},
                                                    tag="bench")[rank])
            rows.append(row)
    Path(args.result).write_text(json.dumps(rows))


def digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


# --- the parent -----------------------------------------------------------------------------

def chunk_bytes() -> int | None:
    """The real transport's chunk size (None for a tree without chunks: a before/after run
    with ``PYTHONPATH`` on an older checkout)."""
    try:
        from islands.transports import wire
    except ImportError:
        return None
    return wire.CHUNK_BYTES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(n: int, args: argparse.Namespace) -> list[dict]:
    """Spawns ``n`` worker processes (each in a shaped network namespace of its own with
    ``--network``) and combines their measurements."""
    with contextlib.ExitStack() as stack:
        net = None
        if args.network:
            from islands.runtime.wan import EmulatedNetwork

            bps = [args.network * 1e6] * n
            net = stack.enter_context(EmulatedNetwork(bps, bps))
        return _run_group(n, args, net)


def _run_group(n: int, args: argparse.Namespace, net) -> list[dict]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    host = net.addr if net is not None else (lambda r: "127.0.0.1")
    wrap = net.command if net is not None else (lambda r, argv: argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"rank{r}.json" for r in range(n)]
        common = ["--world", str(n), "--port", str(port), "--repeats", str(args.repeats),
                  "--chunk-mb", str(args.chunk_mb or 0), "--store-host", host(0),
                  "--sizes-mb", *map(str, args.sizes_mb), "--codecs", *args.codecs,
                  *(["--unsigned-only"] if args.unsigned_only else []),
                  *([] if args.interleave else ["--blocks"]),
                  *(["--fixed-turns"] if args.fixed_turns else []),
                  *(["--fresh"] if args.fresh else [])]
        procs = [subprocess.Popen(wrap(r, [sys.executable, __file__, "--rank", str(r),
                                           "--host", host(r), "--result", str(files[r]),
                                           *common]), env=env, stderr=subprocess.PIPE,
                                  text=True) for r in range(n)]
        errs = [p.communicate(timeout=args.timeout_s)[1] for p in procs]
        for r, (p, err) in enumerate(zip(procs, errs)):
            if p.returncode:
                raise SystemExit(f"worker {r} of {n} failed:\n{err}")
        per_rank = [json.loads(f.read_text()) for f in files]
    rows = []
    for parts in zip(*per_rank):
        gloo = [max(r["gloo_s"][i] for r in parts) for i in range(args.repeats)]
        bfly = [max(r["butterfly_s"][i] for r in parts) for i in range(args.repeats)]
        numel = numel_of(parts[0]["size_mb"])
        breakdown = {}
        for act in ACTIVITIES:
            breakdown[act] = statistics.median(
                statistics.fmean(r["breakdown"][i].get(act, 0.0) for r in parts)
                for i in range(args.repeats))
        breakdown["other"] = max(0.0, statistics.median(
            statistics.fmean(r["butterfly_s"][i] for r in parts) for i in range(args.repeats))
            - sum(breakdown.values()))
        g, b = statistics.median(gloo), statistics.median(bfly)
        native = ([max(r["native_s"][i] for r in parts) for i in range(args.repeats)]
                  if parts[0].get("native_s") else None)
        signed, over_streams, verified, two_phase, fresh, checked, divided = (
            statistics.median(max(r[k][i] for r in parts) for i in range(args.repeats))
            if parts[0].get(k) else None
            for k in ("signed_s", "streams_s", "verified_s", "two_phase_s", "fresh_s",
                      "checked_s", "divided_s"))
        rows.append({"workers": n, "size_mb": parts[0]["size_mb"], "codec": parts[0]["codec"],
                     "gloo_s": g, "butterfly_s": b, "gloo_gbps": 4 * numel / g / 1e9,
                     "butterfly_gbps": 4 * numel / b / 1e9, "vs_gloo": g / b,
                     "breakdown_s": breakdown, "gloo_repeats_s": gloo,
                     "butterfly_repeats_s": bfly,
                     **({"signed_s": signed, "signed_vs_butterfly": b / signed,
                         "streams_s": over_streams, "streams_vs_signed": signed / over_streams}
                        if signed else {}),
                     **({"verified_s": verified, "verified_vs_streams": over_streams / verified}
                        if verified else {}),
                     **({"two_phase_s": two_phase, "butterfly_vs_two_phase": two_phase / b}
                        if two_phase else {}),
                     **({"fresh_s": fresh, "fresh_vs_gloo": g / fresh,
                         "kept_vs_fresh": fresh / b} if fresh else {}),
                     **({"native_s": statistics.median(native), "native_repeats_s": native,
                         "native_vs_gloo": g / statistics.median(native)} if native else {}),
                     **({"checked_s": checked, "checked_vs_gloo": g / checked,
                         "native_vs_checked": checked / statistics.median(native)}
                        if checked and native else {}),
                     **({"divided_s": divided,
                         "native_vs_divided": divided / statistics.median(native)}
                        if divided and native else {}),
                     "bytes_sent_per_worker": parts[0]["bytes_sent"],
                     "identical_on_every_worker": len({r["digest"] for r in parts}) == 1})
    return rows


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def simulator_rows(args: argparse.Namespace) -> list[dict]:
    """The simulator's butterfly in this process, per worker, against a ``copy_``."""
    from islands.collectives.butterfly import Group
    from islands.transports.sim import NetworkModel, SimTransport, VirtualClock

    torch.set_num_threads(1)
    rows = []
    for size_mb in args.sizes_mb:
        numel = numel_of(size_mb)
        x = torch.randn(numel)
        into = torch.empty_like(x)
        for n in args.workers:
            xs = {i: torch.randn(numel, generator=torch.Generator().manual_seed(i))
                  for i in range(n)}
            for label in args.codecs:
                group = Group(SimTransport(n, NetworkModel(), VirtualClock(n)), tuple(range(n)))
                codecs = {i: make_codec(label, numel) for i in range(n)}
                # the copy beside each row, so that both see the same load
                copy_s = median_time(functools.partial(into.copy_, x), args.repeats)
                t = median_time(functools.partial(group.all_reduce, xs, codecs=codecs,
                                                  tag="bench"), args.repeats)
                rows.append({"workers": n, "size_mb": size_mb, "codec": label,
                             "total_s": t, "per_worker_s": t / n, "copy_s": copy_s,
                             "vs_copy": t / n / copy_s})
    return rows


def print_tables(dist_rows: list[dict], sim_rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="butterfly over DistTransport vs gloo all_reduce (medians, 1 thread each)")
    for col in ("workers", "MB", "codec", "gloo s", "gloo GB/s", "bfly s", "bfly GB/s",
                "vs gloo", "fresh vs gloo", "bfly vs 2-phase", "native vs gloo",
                "check+gloo vs gloo", "native vs check+gloo", "native vs div+gloo",
                "signed vs bfly",
                "streams vs signed", "verified vs streams", *ACTIVITIES, "other", "same"):
        t.add_column(col, justify="right")
    for r in dist_rows:
        bd = r["breakdown_s"]
        t.add_row(str(r["workers"]), f"{r['size_mb']:g}", r["codec"], f"{r['gloo_s']:.3f}",
                  f"{r['gloo_gbps']:.2f}", f"{r['butterfly_s']:.3f}",
                  f"{r['butterfly_gbps']:.2f}", f"{r['vs_gloo']:.2f}x",
                  f"{r['fresh_vs_gloo']:.2f}x" if "fresh_vs_gloo" in r else "—",
                  f"{r['butterfly_vs_two_phase']:.2f}x" if "butterfly_vs_two_phase" in r
                  else "—",
                  f"{r['native_vs_gloo']:.3f}x" if "native_vs_gloo" in r else "—",
                  *((f"{r['checked_vs_gloo']:.3f}x", f"{r['native_vs_checked']:.3f}x")
                    if "checked_vs_gloo" in r else ("—", "—")),
                  f"{r['native_vs_divided']:.3f}x" if "native_vs_divided" in r else "—",
                  *((f"{r['signed_vs_butterfly']:.2f}x", f"{r['streams_vs_signed']:.2f}x")
                    if "signed_s" in r else ("—", "—")),
                  f"{r['verified_vs_streams']:.2f}x" if "verified_vs_streams" in r else "—",
                  *(f"{1e3 * bd[a]:.0f}" for a in (*ACTIVITIES, "other")),
                  "yes" if r["identical_on_every_worker"] else "NO")
    s = Table(title="simulator's butterfly (one process, 1 thread): time per worker vs copy_")
    for col in ("workers", "MB", "codec", "total ms", "per worker ms", "copy_ ms", "÷ copy_"):
        s.add_column(col, justify="right")
    for r in sim_rows:
        s.add_row(str(r["workers"]), f"{r['size_mb']:g}", r["codec"], f"{1e3 * r['total_s']:.2f}",
                  f"{1e3 * r['per_worker_s']:.3f}", f"{1e3 * r['copy_s']:.3f}",
                  f"{r['vs_copy']:.2f}x")
    console = Console(width=200)
    console.print(t)
    console.print(s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[1.0, 16.0, 128.0])
    p.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help=f"{QUICK}")
    p.add_argument("--no-sim", action="store_true", help="skip the simulator's rows")
    p.add_argument("--no-dist", action="store_true", help="skip the real transport's rows")
    p.add_argument("--unsigned-only", action="store_true",
                   help="skip the signed, streams and verified columns (a slow link's runs)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per worker count")
    p.add_argument("--chunk-mb", type=float, default=None,
                   help="the real transport's chunk size (default: wire.CHUNK_BYTES)")
    p.add_argument("--network", type=float, default=None, metavar="MBIT",
                   help="each worker in a network namespace of its own, its upload and "
                        "download shaped to MBIT Mbit/s (root; islands.runtime.wan)")
    p.add_argument("--blocks", action="store_true",
                   help="each collective's repeats in a block of their own (the default with "
                        "--network; over loopback they take turns)")
    p.add_argument("--fixed-turns", action="store_true",
                   help="over loopback, the collectives' turns in the same order in every "
                        "repeat (default: an order drawn anew for each)")
    p.add_argument("--fresh", action="store_true",
                   help="also the butterfly with a new result tensor at each call (the 'fresh "
                        "vs gloo' column; freeing 128 MB of pages slows the calls after it, so "
                        "off by default)")
    p.add_argument("--json", default="bench-results/collective.json")
    # set by the parent for a worker process
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--store-host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.interleave = not (args.blocks or args.network)
    if args.rank is not None:
        return worker_main(args)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    loads, dist_rows = {}, []
    for n in [] if args.no_dist else args.workers:
        before = os.getloadavg()
        dist_rows += run_group(n, args)
        loads[n] = {"before": before, "after": os.getloadavg()}
    before = os.getloadavg()
    sim_rows = [] if args.no_sim else simulator_rows(args)
    if sim_rows:
        loads["sim"] = {"before": before, "after": os.getloadavg()}
    print_tables(dist_rows, sim_rows)
    env = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "order": ("blocks" if not args.interleave else
                     "turns" if args.fixed_turns else "shuffled turns"), "fresh": args.fresh,
           "threads_per_process": 1, "islands": str(Path(islands.__file__).parent),
           "chunk_bytes": int(args.chunk_mb * 2**20) if args.chunk_mb else chunk_bytes(),
           "torch": torch.__version__, "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "load_average": loads,
           "load_average_end": os.getloadavg()}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "dist": dist_rows, "sim": sim_rows}, indent=1))
    print(f"load average (1, 5, 15 min) per worker count and for the simulator: {loads}; "
          f"at the end: {env['load_average_end']}\nwrote {out}")


if __name__ == "__main__":
    main()
