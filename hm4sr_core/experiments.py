"""Several seeds, several models: mean +- std tables and paired significance tests
(evaluation.md 5-6). Reads run folders written by :func:`hm4sr_core.train.train`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import mean_std, paired_test


@dataclass
class RunGroup:
    """All seeds of one model configuration."""

    label: str
    folders: list[Path]
    records: list[dict]  # results.json of each seed
    per_user: pd.DataFrame  # per-user test metrics averaged over seeds, indexed by user


def load_group(path: str | Path, label: str | None = None) -> RunGroup:
    """A run folder (results.json) or a folder whose seed-*/ sub-folders are runs."""
    path = Path(path)
    folders = [path] if (path / "results.json").exists() else sorted(
        p for p in path.glob("seed-*") if (p / "results.json").exists())
    if not folders:
        raise FileNotFoundError(f"{path}: no results.json, nor seed-*/results.json")
    records = [json.loads((f / "results.json").read_text()) for f in folders]
    hashes = {r["data_hash"] for r in records} | set()
    if len(hashes) > 1:
        raise ValueError(f"{path}: runs were trained on different data ({len(hashes)} data hashes)")
    frames = [pd.read_parquet(f / "per_user_test.parquet").set_index("user") for f in folders]
    per_user = sum(frames) / len(frames)
    return RunGroup(label or path.name, folders, records, per_user)


def compare_runs(paths: list[str | Path], metrics: list[str], test: str = "wilcoxon") -> pd.DataFrame:
    """One row per group: mean, std over seeds for each metric, and the paired p-value of
    each metric against the first group (per-user test metrics averaged over seeds)."""
    groups = [load_group(p) for p in paths]
    hashes = {g.records[0]["data_hash"] for g in groups}
    if len(hashes) > 1:
        raise ValueError("the runs to compare were trained on different data; compare like with like")
    base = groups[0]
    rows = []
    for g in groups:
        row = {"model": g.label, "seeds": len(g.records)}
        for m in metrics:
            values = [r["test"][m] for r in g.records if m in r["test"]]
            if len(values) != len(g.records):
                raise ValueError(f"{g.label}: metric {m!r} missing from a results.json")
            row[f"{m} mean"], row[f"{m} std"] = mean_std(values)
            if g is not base and m in g.per_user.columns:
                users = base.per_user.index.intersection(g.per_user.index)
                row[f"{m} p"] = paired_test(g.per_user.loc[users, m].to_numpy(),
                                            base.per_user.loc[users, m].to_numpy(), method=test)["p_value"]
            else:
                row[f"{m} p"] = np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame, metrics: list[str]) -> str:
    """Markdown: mean +- std per metric, p-value against the first row in brackets."""
    head = "| model | seeds | " + " | ".join(metrics) + " |"
    sep = "|---|---:|" + "---:|" * len(metrics)
    lines = [head, sep]
    for _, r in table.iterrows():
        cells = []
        for m in metrics:
            cell = f"{r[f'{m} mean']:.4f} +- {r[f'{m} std']:.4f}"
            if not np.isnan(r[f"{m} p"]):
                cell += f" (p={r[f'{m} p']:.3g})"
            cells.append(cell)
        lines.append(f"| {r['model']} | {int(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
