"""Replay pruners on the learning curves of a study that ran without one.

A study tuned with ``--pruner none`` holds every trial's whole curve (the best validation
NDCG@20 so far after each epoch). Each candidate pruner is run by Optuna itself on a fresh
in-memory study that reports those curves in the same trial order, so its decisions are
the ones it would have made (the configurations are the unpruned study's; a real pruned
study's sampler would have seen other results and proposed others after its random startup
trials). Prints, per pruner, the epochs saved (the unpruned study's epochs / the replay's),
the trials pruned, and the best value it kept against the best of all.

    python -m benchmarks.pruner_replay runs/tune-ml100k-sasrec-nopruning
    python -m benchmarks.pruner_replay runs/tune-ml100k-sasrec-nopruning --json /tmp/replay.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def curves_of(folder: Path) -> tuple[list[list[float]], int]:
    """Completed trials' curves, in trial order, and the epoch cap (the longest curve)."""
    import optuna
    db = folder / "study.db"
    if not db.exists():
        raise SystemExit(f"{db}: no study there (expected the DIR of a `hm4sr tune --pruner none --out DIR`)")
    storage = f"sqlite:///{db.resolve()}"
    names = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=names[0], storage=storage)
    curves = [[t.intermediate_values[k] for k in sorted(t.intermediate_values)]
              for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.intermediate_values]
    if study.user_attrs.get("identity", {}).get("pruner", "none") != "none":
        raise SystemExit(f"{folder}: this study was pruned; replay needs one run with --pruner none")
    if len(curves) < 2:
        raise SystemExit(f"{folder}: {len(curves)} completed trial(s); a replay needs several")
    return curves, max(len(c) for c in curves)


def candidates(cap: int) -> dict:
    import optuna
    P = optuna.pruners
    return {
        "median, warm-up 4, startup 5": P.MedianPruner(5, 4),
        "median, warm-up 5, startup 5": P.MedianPruner(5, 5),
        "median, warm-up 2, startup 5": P.MedianPruner(5, 2),
        "percentile 25, warm-up 4, startup 5": P.PercentilePruner(25.0, 5, 4),
        "halving from epoch 2, factor 3": P.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3),
        "halving from epoch 3, factor 3 (default)": P.SuccessiveHalvingPruner(min_resource=3, reduction_factor=3),
        "halving from epoch 4, factor 3": P.SuccessiveHalvingPruner(min_resource=4, reduction_factor=3),
        "halving from epoch 5, factor 3": P.SuccessiveHalvingPruner(min_resource=5, reduction_factor=3),
        "halving from epoch 4, factor 2": P.SuccessiveHalvingPruner(min_resource=4, reduction_factor=2),
        f"hyperband 1..{cap}, factor 3": P.HyperbandPruner(min_resource=1, max_resource=cap, reduction_factor=3),
    }


def replay(curves: list[list[float]], pruner) -> dict:
    """What ``pruner`` would have done on ``curves`` (reported in order, epoch by epoch, as
    hm4sr tune's objective reports them: the running best, never pruned at a trial's last
    epoch). ``states``: each trial's final state, COMPLETE or PRUNED."""
    import optuna
    study = optuna.create_study(study_name="replay", direction="maximize", pruner=pruner)  # Hyperband brackets hash the name
    spent, kept = 0, []

    def objective(trial) -> float:
        nonlocal spent
        curve, best = curves[trial.number], -float("inf")
        for epoch, value in enumerate(curve, start=1):
            best = max(best, value)
            trial.report(best, epoch)
            spent += 1
            if epoch < len(curve) and trial.should_prune():
                raise optuna.TrialPruned()
        kept.append(best)
        return best

    study.optimize(objective, n_trials=len(curves))
    total = sum(len(c) for c in curves)
    return {"epochs": spent, "epochs_unpruned": total, "epochs_ratio": total / spent,
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
            "best_kept": max(kept), "states": [t.state.name for t in study.trials]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pruner_replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="the --out DIR of a study tuned with --pruner none")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    curves, cap = curves_of(args.folder)
    best = max(max(c) for c in curves)
    print(f"{args.folder}: {len(curves)} completed trials, epoch cap {cap}, best of all {best:.4f}")
    print(f"{'pruner':44s} {'epochs saved':>12s} {'pruned':>7s} {'best kept':>10s}")
    rows = {}
    for name, pruner in candidates(cap).items():
        r = rows[name] = replay(curves, pruner)
        print(f"{name:44s} {r['epochs_ratio']:11.2f}x {r['pruned']:7d} {r['best_kept']:10.4f}")
    if args.json:
        args.json.write_text(json.dumps({"folder": str(args.folder), "trials": len(curves), "best": best,
                                         "replays": {k: {f: v for f, v in r.items() if f != "states"}
                                                     for k, r in rows.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
