"""Full vs sampled softmax: per-seed metrics and paired comparisons, as markdown.

    python -m benchmarks.sampled_table runs/ml100k/full runs/ml100k/sampled256

Each argument is a folder of ``seed-<S>/`` runs (``hm4sr train --out``); the first is the
baseline. Prints, for valid and test NDCG@10 and NDCG@20: every seed's value, mean +- std
over seeds (:func:`hm4sr_core.significance.mean_std`), the per-seed difference to the
baseline's run of the same seed with, per seed, the Wilcoxon signed-rank p-value over
users (:func:`hm4sr_core.significance.paired_test`, per-user valid or test metrics), and
the mean difference with a paired t-test over seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from hm4sr_core.significance import mean_std, paired_test

METRICS = ("ndcg@10", "ndcg@20")


def _runs(folder: Path) -> dict[int, Path]:
    return {int(p.name.split("-", 1)[1]): p for p in sorted(folder.glob("seed-*")) if (p / "results.json").exists()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", type=Path, help="folders of seed-*/ runs; the first is the baseline")
    args = p.parse_args(argv)
    runs = {g: _runs(g) for g in args.groups}
    base = args.groups[0]
    seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    records = {g: {s: json.loads((runs[g][s] / "results.json").read_text()) for s in runs[g]} for g in args.groups}
    print(f"seeds finished in every group: {seeds}\n")
    for split in ("valid", "test"):
        lines = [f"| {split} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std |",
                 "|---|" + "---:|" * (len(seeds) + 1)]
        for metric in METRICS:
            for g in args.groups:
                values = [records[g][s][split][metric] for s in seeds]
                m, sd = mean_std(values) if len(values) > 1 else (values[0], float("nan"))
                lines.append(f"| {g.name} {metric} | " + " | ".join(f"{v:.4f}" for v in values)
                             + f" | {m:.4f} +- {sd:.4f} |")
        print("\n".join(lines) + "\n")
    for g in args.groups[1:]:
        lines = [f"| {g.name} - {base.name} | split | metric | " + " | ".join(f"seed {s}" for s in seeds)
                 + " | mean |",
                 "|---|---|---|" + "---:|" * (len(seeds) + 1)]
        for split in ("valid", "test"):
            for metric in METRICS:
                diffs, cells = [], []
                for s in seeds:
                    d = records[g][s][split][metric] - records[base][s][split][metric]
                    a = pd.read_parquet(runs[g][s] / f"per_user_{split}.parquet").set_index("user")[metric]
                    b = pd.read_parquet(runs[base][s] / f"per_user_{split}.parquet").set_index("user")[metric]
                    users = a.index.intersection(b.index)
                    pval = paired_test(a.loc[users].to_numpy(), b.loc[users].to_numpy())["p_value"]
                    diffs.append(d)
                    cells.append(f"{d:+.4f} (p={pval:.2g})")
                mean = f"{sum(diffs) / len(diffs):+.4f}"
                if len(seeds) > 1:  # paired t-test over seeds (each seed's run against the baseline's)
                    a = [records[g][s][split][metric] for s in seeds]
                    b = [records[base][s][split][metric] for s in seeds]
                    mean += f" (t-test over seeds p={paired_test(a, b, method='ttest')['p_value']:.2g})"
                lines.append(f"| | {split} | {metric} | " + " | ".join(cells) + f" | {mean} |")
        print("\n".join(lines) + "\n")
    for g in args.groups:
        secs = [records[g][s]["seconds_per_epoch"] for s in seeds]
        print(f"{g.name}: median seconds per epoch per seed " + ", ".join(f"{v:.1f}" for v in secs))


if __name__ == "__main__":
    main()
