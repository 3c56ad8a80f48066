"""The sparse end of the codec frontier: SparseLoCo, DeMo-style DCT top-k and MuLoCo against
DDP and DiLoCo fp32/int8/int4/fp4, several seeds each (``codecs_frontier.py --sparse`` runs
this; see that module's docstring for the commands).

Each method is a list of config overrides (``METHODS``) on a setup (``SETUPS``); a row is one
simulation; the table averages the seeds of each (setup, H, method).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SPARSE = ["algorithm.ddp_steps=0", "codec.name='identity'", "algorithm.name='sparseloco'"]
# SparseLoCo's outer step: plain SGD, lr 1, no momentum
OUTER_SGD = ["outer.lr=1.0", "outer.momentum=0.0", "outer.nesterov=false"]
# DeMo's compressor on DiLoCo's pseudo-gradients: 4 of every 64 DCT coefficients, signs with
# one scale per tensor, the rest owed by a decaying accumulator that replaces the momentum
DEMO = ["algorithm.collective='all_gather'", "codec.name='chain'",
        "codec.stages=[{name='dct_topk', count=4, chunk=64}, {name='sign'}]",
        "codec.error_feedback=true", "codec.error_feedback_beta=0.95", *OUTER_SGD]
# Muon's runs start from the warm start the AdamW runs share (warm-started with Muon, they
# would start from another, better, checkpoint)
MUON = ["inner.optimizer='muon'", "init.warm_start_optimizer='adamw'"]


def random_k(fraction: float, values: str) -> list[str]:
    """Random-k positions shared by every worker, then ``values``' codec, with error feedback."""
    return ["codec.name='chain'", f"codec.stages=[{{name='randomk', fraction={fraction}}}, "
            f"{values}]", "codec.error_feedback=true"]


# label -> overrides; "diloco" is the baseline every ratio is taken against
METHODS: dict[str, list[str]] = {
    "ddp": ["algorithm.ddp_steps=0", "algorithm.name='ddp'", "codec.name='identity'"],
    "diloco": ["codec.name='identity'"],
    "diloco int8": ["codec.name='int8'"],
    "diloco int4": ["codec.name='int4'"],
    "diloco fp4": ["codec.name='fp4'"],
    # SparseLoCo's outer step (plain SGD) on dense fp32 pseudo-gradients: what the outer
    # optimizer alone costs or gains
    "diloco outer sgd": ["codec.name='identity'", *OUTER_SGD],
    "diloco outer sgd lr 1.5": ["codec.name='identity'", *OUTER_SGD, "outer.lr=1.5"],
    "sparseloco 1.6%": SPARSE,
    "sparseloco 3%": [*SPARSE, "algorithm.density=0.03"],
    "sparseloco 6%": [*SPARSE, "algorithm.density=0.0625"],
    "sparseloco 12%": [*SPARSE, "algorithm.density=0.125"],
    "sparseloco 1.6% beta 1": [*SPARSE, "algorithm.beta=1.0"],
    "sparseloco 3% beta 1": [*SPARSE, "algorithm.density=0.03", "algorithm.beta=1.0"],
    "sparseloco 3% beta 1 lr 1.5": [*SPARSE, "algorithm.density=0.03", "algorithm.beta=1.0",
                                    "outer.lr=1.5"],
    "sparseloco 6% 4-bit": [*SPARSE, "algorithm.density=0.0625", "algorithm.bits=4"],
    "sparseloco 6% beta 1": [*SPARSE, "algorithm.density=0.0625", "algorithm.beta=1.0"],
    "sparseloco 6% lr 1.5": [*SPARSE, "algorithm.density=0.0625", "outer.lr=1.5"],
    "demo dct 4/64 sign": DEMO,
    "muloco": [*MUON, "codec.name='identity'"],
    "muloco 2-bit ef": [*MUON, "codec.name='quant'", "codec.bits=2",
                        "codec.error_feedback=true"],
    "muloco int4 ef": [*MUON, "codec.name='int4'", "codec.error_feedback=true"],
    # SparseLoCo's compressor on Muon's pseudo-gradients
    "sparseloco+muon 1.6%": [*SPARSE, *MUON],
    "sparseloco+muon 3%": [*SPARSE, *MUON, "algorithm.density=0.03"],
    # 1-bit signs (one scale per tensor) with error feedback
    "muloco sign ef": [*MUON, "codec.name='sign'", "codec.error_feedback=true"],
    # the same random positions at every worker (a seed travels, no indices): the mean is
    # exact there and the butterfly all-reduces it (the all-gather's n - 1 uploads avoided)
    "muloco randomk 25% 2-bit ef": [*MUON, *random_k(0.25, "{name='quant', bits=2}")],
    "muloco randomk 50% sign ef": [*MUON, *random_k(0.5, "{name='sign'}")],
    "muloco randomk 25% 2-bit ef sgd": [*MUON, *random_k(0.25, "{name='quant', bits=2}"),
                                        *OUTER_SGD],
}
DEFAULT = ["ddp", "diloco", "diloco int8", "diloco int4", "diloco fp4", "sparseloco 1.6%",
           "sparseloco 3%", "sparseloco 6%", "sparseloco 12%", "demo dct 4/64 sign", "muloco",
           "muloco 2-bit ef"]
SETUPS = {
    "main": (None, ["steps=400", "init.warm_start_steps=1000"]),  # examples/diloco.toml's
    "cold": ("examples/cold_start_recipe.toml", []),
}


def run_one(setup: str, h: int | None, method: str, seed: int, threads: int) -> dict:
    """One simulation; a failure is a row too, with its error."""
    import torch

    from islands import load_config, simulate

    torch.set_num_threads(threads)
    path, base = SETUPS[setup]
    overrides = [*base, f"seed={seed}", *METHODS[method]]
    if h is not None:
        overrides.append(f"algorithm.sync_every={h}")
    row = {"setup": setup, "H": h if h is not None else "recipe", "method": method,
           "seed": seed, "overrides": overrides}
    started = time.perf_counter()
    try:
        s = simulate(load_config(path, overrides), out_dir=None)
        row.update(final_eval_loss=s["final_eval_loss"], algorithm=s["algorithm"],
                   codec=s["codec_detail"], rounds=s["rounds"], steps=s["steps"],
                   bytes_sent_per_worker=s["bytes_sent_per_worker"],
                   bytes_received_per_worker=s["bytes_received_per_worker"],
                   eval_curve=[(p["step"], p["eval_loss"]) for p in s["eval_curve"]], error=None)
    except Exception as err:  # noqa: BLE001 (a method that breaks training is a result)
        row.update(final_eval_loss=float("nan"), bytes_sent_per_worker=float("nan"),
                   bytes_received_per_worker=float("nan"), error=f"{type(err).__name__}: {err}")
    row["wall_s"] = time.perf_counter() - started
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (setup, H, method): mean ± std over seeds, the change against fp32 DiLoCo
    seed by seed, and the byte ratios."""
    from islands.metrics.seeds import mean_std

    latest: dict[tuple, dict] = {}  # a run repeated (merged reports) counts once
    for r in rows:
        method = r["method"]
        if "chunk_topk" in r.get("codec", "") and "rice" not in r["codec"]:
            method += " (packed offsets)"  # a run from before offsets were Rice-coded
        latest[(r["setup"], str(r["H"]), method, r["seed"])] = r
    diloco = {(setup, h, seed): r["final_eval_loss"]
              for (setup, h, method, seed), r in latest.items() if method == "diloco"}
    groups: dict[tuple, list[dict]] = {}
    for (setup, h, method, _), r in latest.items():
        groups.setdefault((setup, h, method), []).append(r)
    lines = []
    for (setup, h, method), runs in groups.items():
        losses = [r["final_eval_loss"] for r in runs]
        pct = [100 * (r["final_eval_loss"] / diloco[(setup, h, r["seed"])] - 1)
               for r in runs if (setup, h, r["seed"]) in diloco]
        loss_mean, loss_std = mean_std(losses)  # (NaN when a run diverged)
        pct_mean, pct_std = mean_std(pct) if pct else (float("nan"), None)
        lines.append({
            "setup": setup, "H": h, "method": method, "seeds": sorted(r["seed"] for r in runs),
            "loss_mean": loss_mean, "loss_std": loss_std or 0.0,
            "paired_pct_mean": pct_mean, "paired_pct_std": pct_std or 0.0,
            "sent": mean_std([r["bytes_sent_per_worker"] for r in runs])[0],
            "received": mean_std([r["bytes_received_per_worker"] for r in runs])[0],
            "rounds": runs[0].get("rounds"), "steps": runs[0].get("steps"),
            "errors": [r["error"] for r in runs if r["error"]]})
    by_key = {(x["setup"], x["H"], x["method"]): x for x in lines}
    for line in lines:
        base = by_key.get((line["setup"], line["H"], "diloco"))
        ddp = by_key.get((line["setup"], line["H"], "ddp"))
        line["fewer_than_diloco_x"] = base["sent"] / line["sent"] if base else float("nan")
        if ddp is not None:
            ddp_sent, line["ddp_bytes"] = ddp["sent"], "measured"
        elif base is not None and base["rounds"]:
            ddp_sent, line["ddp_bytes"] = base["sent"] / base["rounds"] * base["steps"], "derived"
        else:
            ddp_sent, line["ddp_bytes"] = float("nan"), "none"
        line["fewer_than_ddp_x"] = ddp_sent / line["sent"]
    return sorted(lines, key=lambda x: (x["setup"], x["H"], -x["sent"]))


def table(lines: list[dict]) -> str:
    out = [f"{'setup':5} {'H':>6} {'method':34} {'seeds':>5} {'eval loss':>16} "
           f"{'vs DiLoCo, per seed':>19} {'up MB/w':>9} {'down MB/w':>9} {'< DiLoCo':>9} "
           f"{'< DDP':>9}"]
    for x in lines:
        note = f"  {x['errors'][0][:50]}" if x["errors"] else ""
        out.append(f"{x['setup']:5} {x['H']:>6} {x['method']:34} {len(x['seeds']):5d} "
                   f"{x['loss_mean']:8.4f} ± {x['loss_std']:.4f} "
                   f"{x['paired_pct_mean']:+8.2f} ± {x['paired_pct_std']:.2f}% "
                   f"{x['sent'] / 1e6:9.3f} "
                   f"{x['received'] / 1e6:9.3f} {x['fewer_than_diloco_x']:8.1f}x "
                   f"{x['fewer_than_ddp_x']:8.0f}x{note}")
    return "\n".join(out)


def verdicts(lines: list[dict]) -> list[str]:
    """Per (setup, H): the fewest-bytes method within 1% of fp32 DiLoCo's loss (the mean of
    the per-seed changes), among methods with DiLoCo's inner optimizer (AdamW), then among all
    (Muon's runs train better per step, so they beat the AdamW baseline on loss alone)."""
    out = []
    for key in sorted({(x["setup"], x["H"]) for x in lines}):
        for who, muon_too in (("AdamW inner", False), ("any inner optimizer", True)):
            close = [x for x in lines if (x["setup"], x["H"]) == key and x["method"] != "ddp"
                     and (muon_too or "mu" not in x["method"])
                     and "warm start" not in x["method"]  # not from the shared checkpoint
                     and math.isfinite(x["paired_pct_mean"]) and x["paired_pct_mean"] <= 1.0]
            if not close:
                out.append(f"{key[0]} H={key[1]} ({who}): no method within 1% of fp32 DiLoCo")
                continue
            best = min(close, key=lambda x: x["sent"])
            met = "MET" if best["fewer_than_diloco_x"] >= 50 else "MISSED"
            out.append(f"{key[0]} H={key[1]} ({who}): fewest bytes within 1% of fp32 DiLoCo: "
                       f"{best['method']} ({best['paired_pct_mean']:+.2f}% per seed, "
                       f"{best['fewer_than_diloco_x']:.1f}x fewer than DiLoCo, "
                       f"{best['fewer_than_ddp_x']:.0f}x fewer than DDP; target 50x): {met}")
    return out


def plot(lines: list[dict], path: Path) -> None:
    """Loss change against fp32 DiLoCo (seed by seed, mean ± std) over bytes per worker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from codecs_frontier import pareto

    panels = sorted({(x["setup"], x["H"]) for x in lines})
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 5.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    markers = {"ddp": "s", "diloco": "o", "sparseloco": "^", "sparseloco+muon": "P",
               "demo": "D", "muloco": "v"}
    for ax, key in zip(axes.flat, panels):
        good = [x for x in lines if (x["setup"], x["H"]) == key  # (another start: table only)
                and math.isfinite(x["paired_pct_mean"]) and "warm start" not in x["method"]]
        for x in good:
            ax.errorbar(x["sent"], x["paired_pct_mean"], yerr=x["paired_pct_std"], capsize=2,
                        fmt=markers.get(x["method"].split()[0], "x"), ms=5)
            ax.annotate(x["method"], (x["sent"], x["paired_pct_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        front = pareto([(x["sent"], x["paired_pct_mean"]) for x in good])
        if front:
            ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto frontier")
        ax.axhline(1.0, color="grey", lw=0.6, ls=":", label="fp32 DiLoCo + 1%")
        ax.set(xscale="log", xlabel="bytes sent per worker (log)",
               ylabel="final eval loss vs fp32 DiLoCo, same seed (%)",
               title=f"{key[0]} setup, H = {key[1]} (mean ± std over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def finish(rows: list[dict], out: Path) -> None:
    lines = summarize(rows)
    print(table(lines))
    for v in verdicts(lines):
        print(v)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(lines, out.with_suffix(".png"))
    out.write_text(json.dumps({"rows": rows, "summary": lines, "verdicts": verdicts(lines)},
                              indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(DEFAULT),
                   help=f"comma-separated labels of {list(METHODS)}".replace("%", "%%"))
    p.add_argument("--setup", choices=list(SETUPS), default="main")
    p.add_argument("--sync-every", type=int, default=None,
                   help="H (default: 50 for main, the recipe's schedule for cold)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="simulations run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per simulation")
    p.add_argument("--json", default="bench-results/sparse_frontier.json")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge the rows of earlier --json files")
    args = p.parse_args()
    out = Path(args.json)
    if args.report:
        finish([r for f in args.report for r in json.loads(Path(f).read_text())["rows"]], out)
        return
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    h = args.sync_every if args.sync_every is not None else (50 if args.setup == "main"
                                                             else None)
    jobs = [(args.setup, h, m, seed) for seed in args.seeds for m in methods]
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, *job, args.threads) for job in jobs]
        for i, f in enumerate(futures):
            r = f.result()
            rows.append(r)
            print(f"[{i + 1}/{len(jobs)}] {r['setup']} H={r['H']} {r['method']} seed "
                  f"{r['seed']}: loss {r['final_eval_loss']:.4f}, "
                  f"{r['bytes_sent_per_worker'] / 1e6:.3f} MB/worker up, {r['wall_s']:.0f} s"
                  f"{'  ' + r['error'] if r['error'] else ''}", flush=True)
            out.write_text(json.dumps({"rows": rows}, indent=1))
    finish(rows, out)


if __name__ == "__main__":
    main()
