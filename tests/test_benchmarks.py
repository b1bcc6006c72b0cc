"""benchmarks/fidelity.py: the commands it runs and the table it writes (no training here)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from benchmarks import fidelity


def _fake_run(root, variant, seed, curve, epochs_run=None, **changes):
    """A run folder as `hm4sr train` leaves it (the parts the screen reads)."""
    folder = root / variant / f"seed-{seed}"
    folder.mkdir(parents=True)
    rows = "\n".join(f"{i + 1},{v}" for i, v in enumerate(curve))
    (folder / "epochs.csv").write_text("epoch,valid_ndcg@20\n" + rows + "\n")
    from hm4sr_core.cli import MODEL_PRESETS, parse_overrides
    from hm4sr_core.config import TrainConfig
    preset, sets = fidelity.VARIANTS[variant]
    model_over, train_over = parse_overrides([f"{k}={v}" for k, v in sets.items()])
    model = MODEL_PRESETS[preset](**model_over).to_dict()
    train = TrainConfig(mode="prefix", bucket_by_length=False, epochs=2, seed=seed, **train_over).to_dict()
    for k, v in changes.items():
        (train if k in train else model)[k] = v
    (folder / "results.json").write_text(json.dumps({"epochs_run": epochs_run or len(curve),
                                                     "config": {"model": model, "train": train}}))


def test_every_variant_is_one_train_command_with_its_settings(tmp_path):
    ns = type("A", (), dict(data="ml-100k", epochs=2, device="cuda", threads=1, out=str(tmp_path)))()
    cmd = fidelity.command("released_all", 2026, ns)
    joined = " ".join(cmd)
    assert "--model reference" in joined and "--mode prefix" in joined and "--seed 2026" in joined
    for setting in ("gap_buckets=released", "feature_width=768", "category_columns=192",
                    "bucket_by_length=false", "device=cuda", "threads=1"):
        assert f"--set {setting}" in joined, setting
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "released_all" / "seed-2026")
    assert fidelity.command("reference", 1, ns).count("--set") == 3  # batches, device, threads: nothing else


def test_summary_means_spreads_and_shift_against_reference(tmp_path):
    base = {2025: [0.040, 0.055], 2026: [0.044, 0.058], 2027: [0.042, 0.060]}
    other = {2025: [0.050, 0.061], 2026: [0.054, 0.062], 2027: [0.049, 0.066]}
    for seed in base:
        _fake_run(tmp_path, "reference", seed, base[seed])
        _fake_run(tmp_path, "lr_2e-3", seed, other[seed], lr=2e-3)
    _fake_run(tmp_path, "no_category", 2025, [0.1], epochs_run=1)  # unfinished: 1 of 2 epochs
    _fake_run(tmp_path, "no_category", 2026, [0.1, 0.2], w_category=1.0)  # an older definition
    _fake_run(tmp_path, "no_category", 2027, [0.1, 0.2], bucket_by_length=True)  # other batches
    text = fidelity.summarise(tmp_path, ["reference", "lr_2e-3", "no_category"], [2025, 2026, 2027], 2)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "no_category" not in rows
    b1, o1 = [v[0] for v in base.values()], [v[0] for v in other.values()]
    assert f"{statistics.mean(b1):.4f} +- {statistics.stdev(b1):.4f}" in rows["reference"]
    assert f"{statistics.mean(o1):.4f} +- {statistics.stdev(o1):.4f}" in rows["lr_2e-3"]
    diff = statistics.mean(o1) - statistics.mean(b1)
    pooled = ((statistics.variance(b1) + statistics.variance(o1)) / 2) ** 0.5
    assert f"{diff:+.4f} ({diff / pooled:+.1f} sd)" in rows["lr_2e-3"]
    assert "0.0528" in rows["released code (seed 2025, CPU)"]
    assert "released code" not in fidelity.summarise(tmp_path, ["reference"], [2025], 2, released=False)
    assert fidelity.finished(tmp_path / "lr_2e-3" / "seed-2025", 2, "lr_2e-3")
    assert not fidelity.finished(tmp_path / "lr_2e-3" / "seed-2025", 2, "reference")  # lr differs


def test_unknown_variant_and_bad_seeds_are_refused_before_any_run(tmp_path):
    for bad in (["--variants", "reference,nope"], ["--seeds", "1,x"], ["--epochs", "0"]):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", *bad, "--out", str(tmp_path)],
                              capture_output=True, text=True)
        assert proc.returncode == 2, bad
        assert "error" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("variant", list(fidelity.VARIANTS))
def test_every_variant_setting_is_a_config_field(variant):
    from hm4sr_core.config import ModelConfig, TrainConfig
    fields = set(ModelConfig.__dataclass_fields__) | set(TrainConfig.__dataclass_fields__)
    preset, sets = fidelity.VARIANTS[variant]
    assert preset in ("reference", "hm4sr") and set(sets) <= fields


def test_bench_history_records_only_what_this_run_measured(tmp_path, monkeypatch):
    """make bench merges into results.json (a skipped part keeps its old figures there), but
    its history line holds this run's figures only, so medians never count a stale one twice."""
    import benchmarks.run as bench
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench, "HISTORY", tmp_path / "history.jsonl")
    bench.RESULTS.write_text(json.dumps({"hm4sr_prefix_seconds_per_epoch": 999.0}))
    monkeypatch.setattr(bench, "_run_part", lambda name, extra: {"eval_users_per_second": 2000.0})
    skip = [p for p in bench.PARTS if p != "eval"]
    monkeypatch.setattr(sys, "argv", ["run"] + [a for p in skip for a in ("--skip", p)])
    bench.main()
    results = json.loads(bench.RESULTS.read_text())
    assert results["hm4sr_prefix_seconds_per_epoch"] == 999.0 and results["eval_users_per_second"] == 2000.0
    row = json.loads(bench.HISTORY.read_text())
    assert row["eval_users_per_second"] == 2000.0 and "hm4sr_prefix_seconds_per_epoch" not in row
    assert row["skipped_parts"] == ",".join(skip) and row["measured_at"] == results["measured_at"]


def test_same_results_finds_every_kind_of_difference():
    """benchmarks.same_results: equal nested values pass (NaN included); a changed element,
    dtype or shape, a missing key and a changed metric are each reported by place."""
    import torch

    from benchmarks.same_results import differences
    a = {"state": {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(3)}, "metric": 0.25, "nan": float("nan"),
         "rows": [1, 2]}
    same = {"state": {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(3)}, "metric": 0.25, "nan": float("nan"),
            "rows": [1, 2]}
    assert differences(a, same, "run") == []
    nudged = torch.arange(6.0).view(2, 3)
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(10.0))  # one ulp
    cases = [({"w": nudged}, "run.state.w"), ({"w": torch.arange(6.0).view(2, 3).double()}, "run.state.w"),
             ({"w": torch.arange(6.0).view(3, 2)}, "run.state.w")]
    for change, where in cases:
        other = dict(same, state=dict(same["state"], **change))
        assert differences(a, other, "run") == [where]
    assert differences(a, dict(same, metric=0.25000001), "run") == ["run.metric: 0.25 != 0.25000001"]
    assert differences(a, {k: v for k, v in same.items() if k != "rows"}, "run") == ["run: keys ['rows']"]
    assert differences(a, dict(same, rows=[1, 2, 3]), "run") == ["run.rows: lengths 2 and 3"]
