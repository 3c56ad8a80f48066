"""``islands coordinator | run | launch | status``: the real multi-process runtime.

    islands coordinator --port P [--token-file F] [--config CONFIG] [--set k=v ...]
    islands run CONFIG --coordinator HOST:P --worker-id NAME [--token-file F] [--out DIR]
    islands run CONFIG                       (under torchrun: a fixed group, no coordinator)
    islands launch CONFIG --workers N [--out DIR]      coordinator + N workers on this machine
    islands status --coordinator HOST:P [--token-file F]

Workers are started by ``launch`` as ``python -m islands.cli.runtime_cmd run ...``, which
imports only what a worker needs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from islands.core.config import load_config
from islands.metrics.run_dir import json_line


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("config", nargs="?", default=None, help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable (as `islands sim`)")
    p.add_argument("--token-file", default=None, help="shared secret for the control plane")


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("coordinator", help="start the rendezvous and membership service")
    c.add_argument("--port", type=int, default=29400)
    c.add_argument("--host", default="0.0.0.0", help="interface to bind (default: all)")
    c.add_argument("--insecure", action="store_true",
                   help="allow no --token-file on an address beyond loopback")
    c.add_argument("--config", default=None, help="config whose [runtime] section applies")
    _common(c, config=False)
    c.set_defaults(func=cmd_coordinator)

    r = sub.add_parser("run", help="run one worker (needs a coordinator, or torchrun)")
    _common(r)
    r.add_argument("--coordinator", default=None, metavar="HOST:PORT")
    r.add_argument("--worker-id", default=None, help="worker index (default: $RANK)")
    r.add_argument("--out", default=None, help="run directory (default: runs/<name>-job/w<id>; "
                   "under torchrun, the job folder holding w<rank>/)")
    r.add_argument("--checkpoint-dir", default=None, help="write checkpoints here")
    r.add_argument("--resume", default=None, help="resume from this checkpoint (keeps the "
                   "rows already in --out)")
    r.add_argument("--overwrite", action="store_true",
                   help="remove a run already in --out first (without it, another run there, "
                        "or this worker's finished, is refused)")
    r.add_argument("--host", default=None, help="address peers reach this worker at")
    r.add_argument("--attack", default=None, metavar="NAME",
                   help="this worker turns Byzantine (drills and tests): as --set "
                        "attack.name=NAME --set attack.attackers=[ID]; --set attack.start_round "
                        "and attack.scale tune it (attack.* may differ between workers)")
    r.set_defaults(func=cmd_run)

    la = sub.add_parser("launch", help="coordinator and N workers on this machine (a config's "
                        "[[faults]] plan carried out on them)")
    _common(la)
    la.add_argument("--workers", type=int, default=None, help="number of workers")
    la.add_argument("--out", default=None, help="launch folder (default: runs/<name>-launch)")
    la.add_argument("--checkpoint-dir", default=None, help="workers write checkpoints here")
    la.add_argument("--overwrite", action="store_true",
                    help="remove a run already in --out (and its workers' folders) first")
    la.add_argument("--emulate-network", action="store_true",
                    help="each worker in a network namespace of its own, its upload and "
                         "download shaped as [network] says (bandwidth; latency stays in the "
                         "simulator); needs root and iproute2")
    la.add_argument("--emulate-compute", action="store_true",
                    help="each worker slowed by its [compute] step time over the fastest "
                         "worker's (its process stopped part of the time)")
    la.set_defaults(func=cmd_launch)

    s = sub.add_parser("status", help="a coordinator's members, epoch, rounds, exclusions")
    s.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    s.add_argument("--token-file", default=None)
    s.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    s.add_argument("--stuck", type=float, default=5.0,
                   help="flag a round in flight longer than this many median rounds")
    s.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    s.set_defaults(func=cmd_status)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from islands.runtime.auth import load_token
    from islands.runtime.fingerprint import config_fingerprint
    from islands.runtime.launch import setup_logging, start_coordinator

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    # with a config, the job's fingerprint is the coordinator's (else the first worker's)
    fp = config_fingerprint(cfg) if args.config or args.overrides else None
    coord = start_coordinator(cfg, args.port, load_token(args.token_file), host=args.host,
                              fingerprint=fp, insecure=args.insecure)
    print(f"coordinator listening on {args.host}:{coord.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        coord.stop()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One worker; exits 0 when done or asked to stop (SIGTERM, from any state), 2 on a bad
    setting, 3 when it cannot go on in the run (excluded, or the job finished without it)."""
    from islands.runtime.auth import load_token
    from islands.runtime.launch import parse_worker_id, run_worker, setup_logging

    stopping = threading.Event()  # first: SIGTERM is honoured from here on
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    setup_logging()
    wid = parse_worker_id(args.worker_id if args.worker_id is not None
                          else os.environ.get("RANK", "0"))
    attack = ([f"attack.name='{args.attack}'", f"attack.attackers=[{wid}]"]
              if args.attack else [])
    cfg = load_config(args.config, [*args.overrides, *attack])
    out = Path(args.out or job_folder(cfg))
    if args.out is None or (args.coordinator is None and "WORLD_SIZE" in os.environ):
        out = out / f"w{wid}"  # a job folder: one run directory per worker below it
    summary = run_worker(cfg, wid, coordinator=args.coordinator,
                         token=load_token(args.token_file), out_dir=out,
                         checkpoint_dir=args.checkpoint_dir, resume=args.resume, host=args.host,
                         stopping=stopping,
                         existing="overwrite" if args.overwrite else "refuse")
    print(json_line({k: summary[k] for k in ("worker", "rounds_committed", "final_eval_loss",
                                             "bytes_sent_total", "final_hash")}), flush=True)
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr, flush=True)
        return 2
    if summary.get("removed"):
        print(f"error: {summary['removed']}", file=sys.stderr, flush=True)
        return 3
    return 0


def job_folder(cfg) -> str:
    """Where a real job's workers write by default (``w<i>/`` below it): never inside
    ``islands sim``'s ``runs/<name>``."""
    return f"runs/{cfg.label}-job"


def exit_now(code: int) -> None:
    """Ends a worker process whose results are all written, skipping interpreter teardown.

    A worker that lived through an aborted collective keeps the process groups of old epochs
    with work that will never complete (they cannot be destroyed safely while it is pending).
    Destroying them at interpreter exit can make gloo call ``std::terminate`` (SIGABRT) after
    the run has finished cleanly, so once the run directory, logs and stdout are flushed the
    process leaves with ``os._exit``.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_launch(args: argparse.Namespace) -> int:
    import json

    from islands.engine.attacks import COLLUDING
    from islands.runtime.auth import load_token
    from islands.runtime.launch import launch, setup_logging

    setup_logging()
    overrides = list(args.overrides) + ([f"workers={args.workers}"] if args.workers else [])
    cfg = load_config(args.config, overrides)
    out = Path(args.out or f"runs/{cfg.label}-launch")
    if cfg.attack.name in COLLUDING and cfg.attack.shared_dir is None:
        # the attackers' accomplices meet in the launch's folder
        shared = str(out / "attack")
        overrides.append(f"attack.shared_dir={json.dumps(shared)}")
        cfg = cfg.replace(**{"attack.shared_dir": shared})

    def argv_for(i: int, addr: str, host: str) -> list[str]:
        argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "run"]
        argv += [args.config] if args.config else []
        for o in overrides:
            argv += ["--set", o]
        argv += ["--coordinator", addr, "--worker-id", str(i), "--out", str(out / f"w{i}"),
                 "--host", host]
        argv += ["--token-file", args.token_file] if args.token_file else []
        argv += ["--checkpoint-dir", args.checkpoint_dir] if args.checkpoint_dir else []
        # the fault plan is the launch's to carry out, not the workers'
        return argv + (["--set", "faults=[]"] if cfg.faults else [])

    merged = launch(cfg, out, argv_for, token=load_token(args.token_file),
                    existing="overwrite" if args.overwrite else "refuse",
                    emulate_network=args.emulate_network,
                    emulate_compute=args.emulate_compute)
    print(json_line({k: merged[k] for k in ("algorithm", "workers", "rounds",
                                            "final_eval_loss", "bytes_sent_total",
                                            "final_hashes")}), flush=True)
    print(f"launch folder: {out}/ (final.safetensors, summary.json, loss.png, "
          "w<i>/metrics.jsonl)", file=sys.stderr, flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from islands.runtime.auth import load_token
    from islands.runtime.launch import query_status

    token = load_token(args.token_file)
    if not args.watch:
        print(json_line(query_status(args.coordinator, token)), flush=True)
        return 0
    from islands.runtime.watch import watch

    watch(lambda: query_status(args.coordinator, token), interval_s=args.interval,
          factor=args.stuck, count=args.count)
    return 0


def main(argv: list[str] | None = None) -> int:
    """A lean entry point for worker processes (no plotting imports). Every exit of a worker
    goes through :func:`exit_now` (no interpreter teardown of process groups)."""
    parser = argparse.ArgumentParser(prog="islands")
    register(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(argv),
                    lambda e: print(f"error: {e}", file=sys.stderr, flush=True))


def dispatch(args: argparse.Namespace, report, on_interrupt=lambda: None) -> int:
    """Runs a parsed subcommand for either entry point: an ``IslandsError`` is reported
    (``report(error)``) as exit 2, Ctrl-C is 130; a worker (``run``) leaves through
    :func:`exit_now` whatever happens, a bug included (its traceback, exit 1)."""
    from islands.core.errors import IslandsError

    try:
        code = args.func(args) or 0
    except IslandsError as e:
        report(e)
        code = 2
    except KeyboardInterrupt:
        on_interrupt()
        code = 130
    except BaseException:
        if args.command != "run":
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if args.command == "run":
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
