"""Byzantine workers against robust aggregation: DiLoCo on the main job's setup with 8 workers,
each attack x aggregator x number of attackers, final eval loss against the clean run
aggregated by the plain mean.

    python benchmarks/byzantine.py --jobs 2                      # the default grid
    python benchmarks/byzantine.py --attackers 2 --aggregators mean,centered_clip
    python benchmarks/byzantine.py --workers 16 --attackers 7 --attacks sign_flip \\
        --aggregators mean,centered_clip --json bench-results/byzantine_16.json
    python benchmarks/byzantine.py --report bench-results/byzantine*.json   # merge, run nothing
    python benchmarks/byzantine.py --aggregators krum,sybil \\
        --skip-done docs/results/byzantine/*.json --list        # the cells still to run

A grid too long for one sitting is run in batches: ``--skip-done`` leaves out every cell an
earlier batch's JSON holds (without an error), so the same command resumes an interrupted
batch (its own ``--json`` among them: its rows are kept) or fills in the blanks of a merged
one; ``--list`` prints the cells and runs nothing.

A row is one simulation (``islands.simulate``, one torch thread each); the clean run of each
aggregator (no attacker) is run once and shared by every attack. Prints the table of final
eval loss change against the clean mean run of the same workers and seed, the verdicts of the
targets, the bytes and time of each aggregator's clean run, which workers were banned; writes
the rows to JSON and a heat map beside it (one panel per number of attackers).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SETUP = ["steps=400", "init.warm_start_steps=1000", "algorithm.name='diloco'"]

# label -> [aggregator] overrides
AGGREGATORS: dict[str, list[str]] = {
    "mean": ["aggregator.name='mean'"],
    "median": ["aggregator.name='median'"],
    "trimmed_mean": ["aggregator.name='trimmed_mean'", "aggregator.trim=0.25"],
    "krum": ["aggregator.name='krum'", "aggregator.f=2"],
    "multi_krum": ["aggregator.name='multi_krum'", "aggregator.f=2"],
    "bulyan": ["aggregator.name='bulyan'", "aggregator.f=1"],
    "centered_clip": ["aggregator.name='centered_clip'"],
    # with the clone filter in front: rows nearly parallel to an earlier one are dropped
    "centered_clip+clones": ["aggregator.name='centered_clip'", "aggregator.clones=0.999"],
    "sybil": ["aggregator.name='sybil'"],
    # every sync's butterfly verified: each member recomputes a shard it does not own
    "median+verify": ["aggregator.name='median'", "aggregator.verify=1.0"],
    # every member aggregates every row itself: no shard owner to trust
    "centered_clip+gather": ["aggregator.name='centered_clip'",
                             "algorithm.collective='all_gather'"],
    # both: no owner to trust, and clones dropped
    "centered_clip+gather+clones": ["aggregator.name='centered_clip'",
                                    "algorithm.collective='all_gather'",
                                    "aggregator.clones=0.999"],
}
ATTACKS = ["sign_flip", "noise", "alie", "ipm", "constant", "label_flip", "stale", "nan",
           "sybil", "forged_weight", "lying_aggregator"]
DEFAULT_AGGREGATORS = ["mean", "median", "trimmed_mean", "krum", "centered_clip", "sybil"]


def machine() -> str:
    """The CPU a row ran on, as far as results depend on it: the math library's kernels differ
    from one CPU to another (the same clean run ends at 1.6440 on one machine, 1.6481 on
    another), so a cell is compared with the clean mean run of its own machine."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = (f"{info.get('model name', cpu)} family {info.get('cpu family', '?')} "
               f"model {info.get('model', '?')} stepping {info.get('stepping', '?')}")
    except OSError:
        pass
    return f"{cpu}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def run_one(workers: int, aggregator: str, attack: str, attackers: int, seed: int,
            threads: int) -> dict:
    """One simulation; a failure is a row too, with its error."""
    import torch

    from islands import load_config, simulate

    torch.set_num_threads(threads)
    overrides = [*SETUP, f"workers={workers}", f"seed={seed}", *AGGREGATORS[aggregator]]
    if attackers:
        overrides += [f"attack.name='{attack}'", f"attack.attackers={attackers}"]
    row = {"workers": workers, "aggregator": aggregator,
           "attack": attack if attackers else "none", "attackers": attackers, "seed": seed,
           "overrides": overrides, "machine": machine()}
    started = time.perf_counter()
    try:
        s = simulate(load_config(None, overrides), out_dir=None)
        row.update(final_eval_loss=s["final_eval_loss"], algorithm=s["algorithm"],
                   bytes_sent_per_worker=s["bytes_sent_per_worker"],
                   bytes_received_per_worker=s["bytes_received_per_worker"],
                   banned=s.get("banned", []), attacker_ids=s.get("attackers", []),
                   influence_by_worker=s.get("influence_by_worker", {}), error=None)
    except Exception as err:  # noqa: BLE001 (an aggregator that cannot run here is a result)
        row.update(final_eval_loss=float("nan"), bytes_sent_per_worker=float("nan"),
                   bytes_received_per_worker=float("nan"), banned=[], attacker_ids=[],
                   error=f"{type(err).__name__}: {err}")
    row["wall_s"] = time.perf_counter() - started
    return row


def jobs_for(args, done: set[tuple] = frozenset()) -> list[tuple]:
    """The clean run of each aggregator (the mean's is the baseline: list it, or merge a
    report that has it), then each attack x aggregator x attackers > 0; a cell in ``done``
    (``(workers, aggregator, attack, attackers, seed)``, :func:`cells_done`) is left out."""
    aggs = [a.strip() for a in args.aggregators.split(",")]
    attacks = [a.strip() for a in args.attacks.split(",")]
    out = []
    for seed in args.seeds:
        for agg in aggs if args.clean else ():
            out.append((args.workers, agg, "none", 0, seed))
        for k in (k for k in args.attackers if k):
            for attack in attacks:
                for agg in aggs:
                    out.append((args.workers, agg, attack, k, seed))
    return [job for job in out if job not in done]


def cells_done(files: list[str], own: Path | None = None) -> set[tuple]:
    """The cells the rows of these JSON files ran without an error. ``own`` (the batch's
    ``--json``) may be missing: a batch resumed before its first cell ended."""
    present = [f for f in files if Path(f).exists()]
    missing = [f for f in files if f not in present
               and (own is None or Path(f).resolve() != own.resolve())]
    if missing:
        raise SystemExit(f"--skip-done: no such file {missing}; name the --json files of "
                         "earlier batches")
    return {(r["workers"], r["aggregator"], r["attack"], r["attackers"], r["seed"])
            for f in present for r in json.loads(Path(f).read_text())["rows"] if not r["error"]}


def clean_runs(rows: list[dict]) -> dict[tuple, dict]:
    """The clean mean runs, the baselines: ``{(workers, seed, machine): row}``."""
    return {(r["workers"], r["seed"], r.get("machine")): r for r in rows
            if r["attackers"] == 0 and r["aggregator"] == "mean"}


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (workers, attack, attackers, aggregator): the change of final eval loss
    against the clean mean run of the same workers, seed and machine (:func:`machine`; rows
    that do not record one share theirs), mean over seeds, and whether only attackers were
    banned. A cell with no clean mean run on its machine has no change (``baseline``
    False)."""
    latest = {(r["workers"], r["attack"], r["attackers"], r["aggregator"], r["seed"]): r
              for r in rows}
    clean = {key: r["final_eval_loss"] for key, r in clean_runs(rows).items()}
    groups: dict[tuple, list[dict]] = {}
    for (w, attack, k, agg, _), r in latest.items():
        groups.setdefault((w, attack, k, agg), []).append(r)
    lines = []
    for (w, attack, k, agg), runs in sorted(groups.items()):
        base = [clean.get((w, r["seed"], r.get("machine"))) for r in runs]
        pct = [100 * (r["final_eval_loss"] / b - 1) for r, b in zip(runs, base) if b]
        finite = [p for p in pct if math.isfinite(p)]
        wrongly = sorted({b["worker"] for r in runs for b in r["banned"]
                          if b["worker"] not in r["attacker_ids"]})
        lines.append({"workers": w, "attack": attack, "attackers": k, "aggregator": agg,
                      "seeds": len(runs),
                      "pct": sum(finite) / len(finite) if finite and len(finite) == len(pct)
                      else float("nan"),
                      "loss": runs[0]["final_eval_loss"], "baseline": all(base),
                      "banned": sorted({b["worker"] for r in runs for b in r["banned"]}),
                      "honest_banned": wrongly,
                      "sent": runs[0]["bytes_sent_per_worker"],
                      "received": runs[0]["bytes_received_per_worker"],
                      "wall_s": sum(r["wall_s"] for r in runs) / len(runs),
                      "errors": [r["error"] for r in runs if r["error"]]})
    return lines


def _order(aggregators) -> list[str]:
    """The aggregators in AGGREGATORS' order (the mean first)."""
    seen = set(aggregators)
    return [a for a in AGGREGATORS if a in seen]


def table(lines: list[dict]) -> str:
    aggs = _order(x["aggregator"] for x in lines)
    out = []
    for w in sorted({x["workers"] for x in lines}):
        cell = {(x["attack"], x["attackers"], x["aggregator"]): x for x in lines
                if x["workers"] == w}
        out.append(f"\n{w} workers: final eval loss vs the clean mean run (%); "
                   "'div' = diverged (NaN), 'error' = could not run (listed below), "
                   "'no clean' = no clean mean run on its machine")
        out.append(f"{'attack':15} {'k':>2} " + " ".join(f"{a:>13}" for a in aggs))
        for attack, k in sorted({(a, k) for a, k, _ in cell}, key=lambda t: (t[1], t[0])):
            vals = []
            for a in aggs:
                x = cell.get((attack, k, a))
                vals.append(f"{'':>13}" if x is None else f"{_pct(x):>13}")
            out.append(f"{attack:15} {k:2d} " + " ".join(vals))
        out.append(f"\n{'aggregator (clean run)':24} {'up MB/w':>9} {'down MB/w':>9} "
                   f"{'run s':>7} {'banned':>8}")
        for a in aggs:
            x = cell.get(("none", 0, a))
            if x is not None:
                out.append(f"{a:24} {x['sent'] / 1e6:9.2f} {x['received'] / 1e6:9.2f} "
                           f"{x['wall_s']:7.0f} {str(x['banned']):>8}")
    bans = [x for x in lines if x["banned"]]
    if bans:
        out.append("\nbanned (attack, attackers, aggregator: workers banned; honest among them)")
        out += [f"  {x['attack']}, {x['attackers']}, {x['aggregator']}: {x['banned']}; "
                f"honest {x['honest_banned']}" for x in bans]
    errors = [x for x in lines if x["errors"]]
    out += [f"  error {x['attack']}/{x['attackers']}/{x['aggregator']}: {x['errors'][0][:90]}"
            for x in errors]
    return "\n".join(out)


def _pct(x: dict) -> str:
    if x["errors"]:
        return "error"
    if not x["baseline"]:
        return "no clean"
    return "div" if not math.isfinite(x["pct"]) else f"{x['pct']:+.1f}"


def verdicts(lines: list[dict], default: str) -> list[str]:
    """The targets: with 2 of 8 attacking, ``default`` within 5% of the clean run under every
    attack while the mean is 10% worse (or diverges) under sign flip and noise; clean, the
    default costs at most 1%; no honest worker banned."""
    out = []
    cell = {(x["workers"], x["attack"], x["attackers"], x["aggregator"]): x for x in lines}
    for w in sorted({x["workers"] for x in lines}):
        clean = cell.get((w, "none", 0, default))
        if clean is not None:
            ok = math.isfinite(clean["pct"]) and clean["pct"] <= 1.0
            out.append(f"{w} workers, no attacker: {default} {_pct(clean)}% (target <= +1%): "
                       f"{'MET' if ok else 'MISSED'}")
        for k in sorted({x["attackers"] for x in lines if x["workers"] == w and x["attackers"]}):
            attacks = sorted({x["attack"] for x in lines
                              if x["workers"] == w and x["attackers"] == k})
            for attack in attacks:
                d, m = cell.get((w, attack, k, default)), cell.get((w, attack, k, "mean"))
                parts = []
                if d is not None:
                    ok = math.isfinite(d["pct"]) and d["pct"] <= 5.0
                    parts.append(f"{default} {_pct(d)}% (<= +5%: {'MET' if ok else 'MISSED'})")
                if m is not None:
                    bad = not m["errors"] and (not math.isfinite(m["pct"]) or m["pct"] >= 10.0)
                    need = attack in ("sign_flip", "noise")
                    parts.append(f"mean {_pct(m)}%" + (
                        f" (>= +10%: {'MET' if bad else 'MISSED'})" if need else ""))
                if parts:
                    out.append(f"{w} workers, {k} x {attack}: " + ", ".join(parts))
    honest = [x for x in lines if x["honest_banned"]]
    out.append("honest workers banned: " + ("none" if not honest else "; ".join(
        f"{x['attack']}/{x['attackers']}/{x['aggregator']}: {x['honest_banned']}"
        for x in honest)))
    return out


def plot(lines: list[dict], path: Path) -> None:
    """Heat maps: attack x aggregator, the loss change against the clean mean run, one panel
    per number of attackers (and workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = sorted({(x["workers"], x["attackers"]) for x in lines if x["attackers"]})
    if not panels:
        return
    # the largest panel first, full width; the others two to a row, each with its own columns
    panels.sort(key=lambda p: -sum((x["workers"], x["attackers"]) == p for x in lines))
    below = len(panels) // 2  # rows for the other panels, two to a row
    fig = plt.figure(figsize=(14, 6 + 4 * below))
    grid_spec = fig.add_gridspec(1 + below, 2, height_ratios=[6] + [4] * below)
    axes = [fig.add_subplot(grid_spec[0, :])] + [
        fig.add_subplot(grid_spec[1 + i // 2, i % 2]) for i in range(len(panels) - 1)]
    for ax, (w, k) in zip(axes, panels):
        here = [x for x in lines if (x["workers"], x["attackers"]) == (w, k)
                and x["baseline"]]
        aggs = _order(x["aggregator"] for x in here)
        attacks = sorted({x["attack"] for x in here})
        cell = {(x["attack"], x["aggregator"]): x["pct"] for x in here}
        grid = np.array([[cell.get((a, g), np.nan) for g in aggs] for a in attacks])
        ran = np.array([[(a, g) in cell for g in aggs] for a in attacks])
        # not run: blank; diverged or failed: the darkest red
        shown = np.ma.masked_array(np.clip(np.nan_to_num(grid, nan=100.0), -5, 100), ~ran)
        cmap = matplotlib.colormaps["RdYlGn_r"].copy()
        cmap.set_bad("#f2f2f2")
        ax.imshow(shown, cmap=cmap, vmin=-5, vmax=30, aspect="auto")
        for i in range(len(attacks)):
            for j in range(len(aggs)):
                v = grid[i, j]
                text = "" if (attacks[i], aggs[j]) not in cell else (
                    "n/a" if not np.isfinite(v) else f"{v:+.0f}")
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(aggs)), aggs, rotation=25, ha="right", fontsize=8)
        ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
        ax.set_title(f"{k} of {w} workers attacking\n(% eval loss vs clean mean run)",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def baselines(rows: list[dict]) -> list[str]:
    """The clean mean runs the changes are against, one per workers, seed and machine."""
    return [f"clean mean run, {w} workers, seed {seed}: {r['final_eval_loss']:.4f} on "
            f"{where or 'a machine not recorded'}"
            for (w, seed, where), r in clean_runs(rows).items()]


def finish(rows: list[dict], out: Path, default: str) -> None:
    lines = summarize(rows)
    print(table(lines))
    print("\n".join(baselines(rows)))
    for v in verdicts(lines, default):
        print(v)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(lines, out.with_suffix(".png"))
    out.write_text(json.dumps({"rows": rows, "summary": lines,
                               "verdicts": verdicts(lines, default)}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--attackers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated: {ATTACKS}")
    p.add_argument("--aggregators", default=",".join(DEFAULT_AGGREGATORS),
                   help=f"comma-separated labels of {list(AGGREGATORS)}")
    p.add_argument("--default", default="centered_clip+gather+clones",
                   help="the robust configuration the verdicts judge")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--no-clean", dest="clean", action="store_false",
                   help="skip the clean runs (a batch to merge with --report)")
    p.add_argument("--jobs", type=int, default=1, help="simulations run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per simulation")
    p.add_argument("--json", default="bench-results/byzantine.json")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge the rows of earlier --json files")
    p.add_argument("--skip-done", nargs="+", default=[], metavar="JSON",
                   help="leave out the cells these earlier --json files ran without an error")
    p.add_argument("--list", action="store_true", help="print the cells to run; run nothing")
    args = p.parse_args()
    out = Path(args.json)
    if args.report:
        rows = [r for f in args.report for r in json.loads(Path(f).read_text())["rows"]]
        finish(rows, out, args.default)
        return
    unknown = sorted(set(args.aggregators.split(",")) - set(AGGREGATORS))
    unknown += sorted(set(args.attacks.split(",")) - set(ATTACKS))
    if unknown:
        p.error(f"unknown {unknown}; aggregators: {list(AGGREGATORS)}; attacks: {ATTACKS}")
    jobs = jobs_for(args, cells_done(args.skip_done, out))
    if args.list or not jobs:
        for w, agg, attack, k, seed in jobs:
            print(f"{w}w {agg} {attack} x{k} seed {seed}")
        print(f"{len(jobs)} cells to run" + (" (none: every cell is done)" if not jobs else ""))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    # resuming into the same file keeps what it holds
    resumed = out.exists() and any(Path(f).resolve() == out.resolve() for f in args.skip_done)
    rows: list[dict] = json.loads(out.read_text())["rows"] if resumed else []
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, *job, args.threads) for job in jobs]
        for i, f in enumerate(futures):
            r = f.result()
            rows.append(r)
            print(f"[{i + 1}/{len(jobs)}] {r['workers']}w {r['aggregator']} {r['attack']} "
                  f"x{r['attackers']}: loss {r['final_eval_loss']:.4f}, banned "
                  f"{[b['worker'] for b in r['banned']]}, {r['wall_s']:.0f} s"
                  f"{'  ' + r['error'] if r['error'] else ''}", flush=True)
            out.write_text(json.dumps({"rows": rows}, indent=1))
    finish(rows, out, args.default)


if __name__ == "__main__":
    main()
