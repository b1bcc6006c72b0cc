"""benchmarks/fidelity.py: the commands it runs and the table it writes (no training here)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
    fields = set(ModelConfig.setting_names()) | set(TrainConfig.__dataclass_fields__)
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
    # Provenance from hm4sr_core.provenance, as a training result's: the CPU model, not just x86_64.
    from hm4sr_core import provenance
    cpu = provenance.cpu()["cpu_model"]
    assert row["cpu_model"] == results["environment"]["cpu_model"] == cpu
    assert results["environment"]["git"]["commit"] == provenance.git_state()["commit"]
    assert row["commit"] == (results["environment"]["git"]["commit"] or "")[:7] or None


def test_make_bench_leaves_the_memory_modes_and_scale_to_bench_all(tmp_path, monkeypatch):
    """Without --all the bench runs every part but prefix_recompute, prefix_parts and scale (so
    the peer has time to reach its target within the run); --all runs them too; --skip wins."""
    import benchmarks.run as bench
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench, "HISTORY", tmp_path / "history.jsonl")
    ran: list[str] = []
    monkeypatch.setattr(bench, "_run_part", lambda name, extra: ran.append(name) or {})
    monkeypatch.setattr(bench, "_run_scale", lambda args: ran.append("scale") or {})
    for argv, want in ((["run"], [p for p in bench.PARTS if p not in bench.EXTRA_PARTS]),
                       (["run", "--all"], list(bench.PARTS)),
                       (["run", "--all", "--skip", "scale", "--skip", "peer"],
                        [p for p in bench.PARTS if p not in ("scale", "peer")])):
        ran.clear()
        monkeypatch.setattr(sys, "argv", argv)
        bench.main()
        assert ran == want, argv
        row = json.loads(bench.HISTORY.read_text().splitlines()[-1])
        assert row["skipped_parts"] == ",".join(p for p in bench.PARTS if p not in want)


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


def test_scale_world_is_deterministic_and_shaped_like_a_catalogue():
    """benchmarks.scale_world: same seed, same arrays; every item used, ~10 interactions per
    item, power-law popularity, every user long enough for leave-one-out, time increasing."""
    import numpy as np

    from benchmarks.scale_world import make_scale_world
    a, b, c = make_scale_world(3000, seed=1), make_scale_world(3000, seed=1), make_scale_world(3000, seed=2)
    assert a.interactions.equals(b.interactions) and not a.interactions.equals(c.interactions)
    assert np.array_equal(a.modalities["image"].features, b.modalities["image"].features)
    inter = a.interactions
    assert a.num_items == 3000 and set(inter["item"].unique()) == set(range(1, 3001))
    assert 29_000 <= len(inter) <= 31_000
    counts = np.sort(inter["item"].value_counts().to_numpy())[::-1]
    assert counts[:30].sum() > 0.1 * len(inter)  # the top 1% of items hold over a tenth
    lengths = inter.groupby("user").size()
    assert lengths.min() >= 5 and 12 <= lengths.mean() <= 18
    assert (inter.groupby("user")["timestamp"].diff().dropna() > 0).all()
    assert a.categories.shape == (3001, 20) and (a.categories[1:].sum(1) == 1).all() and a.categories[0].sum() == 0
    assert a.modalities["text"].features.shape == (3001, 32) and not a.modalities["text"].available[0]
    with pytest.raises(ValueError, match="mean_length"):
        make_scale_world(3000, mean_length=4)


def test_scale_exponent_is_the_log_log_slope():
    from benchmarks.scale import _fit_exponent
    rows = [{"items": n, "cpu_seconds_per_step_median": 0.5 * n ** 0.25} for n in (10**4, 10**5, 10**6)]
    fit = _fit_exponent(rows)
    assert fit["exponent"] == pytest.approx(0.25) and fit["r2"] == pytest.approx(1.0)
    assert _fit_exponent(rows[:1]) is None


def test_scale_benchmark_runs_a_tiny_world_and_merges_into_results(tmp_path):
    """python -m benchmarks.scale on 2,000 items (a 3-step sampled-softmax run and an
    evaluation, each in its own process): the figures land under "scale", other keys stay;
    a later run with the same settings keeps the cases it did not measure, and an earlier
    run's cases of other settings are dropped."""
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"eval_users_per_second": 1817.0, "scale": {"cases": {"eval:7": {"x": 1}}}}))
    cmd = [sys.executable, "-m", "benchmarks.scale", "--sizes", "2e3", "--nprocs", "1", "--losses", "sampled",
           "--steps", "2", "--warmup", "1", "--skip", "prepare", "--eval-users", "50",
           "--set", "hidden_size=16", "--set", "inner_size=32", "--set", "num_layers=1",
           "--set", "num_negatives=64", "--results", str(results), "--headline"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[scale 1/2] train:2000:sampled:1" in proc.stderr  # a progress line per part
    out = json.loads(results.read_text())
    scale = out["scale"]
    assert out["eval_users_per_second"] == 1817.0 and "eval:7" not in scale["cases"]
    assert {"environment", "measured_at", "commit", "command", "settings", "summary"} <= set(scale)
    train = scale["cases"]["train:2000:sampled:1"]
    assert "error" not in train, train
    assert train["items"] == 2000 and train["num_negatives"] == 64 and len(train["seconds_per_step_all"]) == 2
    assert 0 < train["cpu_seconds_per_step"] < 120 and train["train_peak_rss_mb"] <= train["peak_rss_mb"]
    assert 0 < train["seconds_per_step"] < 60 and train["sequences_per_second"] == pytest.approx(32 / train["seconds_per_step"])
    assert 19_000 <= train["interactions"] <= 21_000 and 100 < train["peak_rss_mb"] < 4000
    ev = scale["cases"]["eval:2000"]
    assert ev["eval_users"] == 50 and ev["users_per_second"] > 0 and ev["peak_rss_mb"] >= ev["rss_before_ranking_mb"]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}  # headline: no exponent from one size

    again = subprocess.run(cmd + ["--only", "eval"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    later = json.loads(results.read_text())["scale"]["cases"]
    assert later["train:2000:sampled:1"] == train and later["eval:2000"]["measured_at"] > ev["measured_at"]


def test_scale_full_softmax_over_the_memory_limit_is_skipped_with_its_estimate(tmp_path):
    """A full-softmax case whose logits would not fit is recorded with the reason, not run."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--case", "train:2e3:full:1",
                           "--full-softmax-limit-gb", "0.001"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "skipped" in out and "seconds_per_step" not in out
    assert 0.001 < out["full_softmax_logits_gb_estimate"] < 1


def test_scale_ddp_case_runs_two_ranks_on_one_global_batch():
    """A 2-process case (hm4sr_core.distributed.spawn, gloo): both ranks time the same steps
    of 32-window global batches; the case's peak RSS is its largest rank's."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--case", "train:2e3:sampled:2", "--steps", "2",
                           "--warmup", "1", "--set", "hidden_size=16", "--set", "inner_size=32",
                           "--set", "num_layers=1", "--set", "num_negatives=64"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nproc"] == 2 and out["threads_per_process"] == 1 and out["windows_per_step"] == 32
    assert len(out["rank_peak_rss_mb"]) == 2 and out["child_peak_rss_mb"] == max(out["rank_peak_rss_mb"] + [out["launcher_peak_rss_mb"]])
    assert all(0 < s < 60 for s in out["rank_seconds_per_step"]) and math.isfinite(out["final_loss"])


def test_scale_results_never_mix_cases_of_two_commits(tmp_path):
    """Earlier cases are kept only when they were measured with the same settings at the same
    commit, and every case records its own commit: the summary's exponent and ratios never
    mix two versions of the code."""
    from benchmarks.scale import write_results
    path = tmp_path / "results.json"

    def run(commit, cases, settings="s"):
        return write_results({"commit": commit, "measured_at": f"t-{commit}", "settings": settings,
                              "cases": {k: dict(v) for k, v in cases.items()}}, path)

    run("aaa", {"eval:10000": {"users_per_second": 1.0}})
    kept = run("aaa", {"eval:100000": {"users_per_second": 2.0}})
    assert set(kept["cases"]) == {"eval:10000", "eval:100000"}
    assert kept["cases"]["eval:10000"]["commit"] == "aaa" and "earlier_cases_dropped" not in kept
    other = run("bbb", {"eval:100000": {"users_per_second": 3.0}})
    assert set(other["cases"]) == {"eval:100000"} and "another commit" in other["earlier_cases_dropped"]
    settings = run("bbb", {"eval:10000": {"users_per_second": 4.0}}, settings="t")
    assert set(settings["cases"]) == {"eval:10000"} and "other settings" in settings["earlier_cases_dropped"]


def test_a_run_with_a_last_checkpoint_of_the_same_settings_is_resumed(tmp_path):
    """A killed run, or a one-epoch screen's run asked for two epochs, continues from last.pt
    (hm4sr train --resume) when its settings are the variant's; other settings start over."""
    import torch

    from hm4sr_core.cli import MODEL_PRESETS
    from hm4sr_core.config import TrainConfig
    from hm4sr_core.runs import CHECKPOINT_VERSION
    folder = tmp_path / "time_float32" / "seed-2025"
    folder.mkdir(parents=True)
    assert not fidelity.resumable(folder, "time_float32")  # nothing to resume
    model = MODEL_PRESETS["reference"](timestamps="float32").to_dict()
    train = TrainConfig(mode="prefix", bucket_by_length=False, epochs=1, seed=2025, threads=1).to_dict()
    torch.save({"checkpoint_version": CHECKPOINT_VERSION, "model_config": model, "train_config": train,
                "data_hash": "abc"}, folder / "last.pt")
    assert fidelity.resumable(folder, "time_float32") and fidelity.resumable(folder, "time_float32", "abc")
    assert not fidelity.resumable(folder, "time_float32", "other data")
    assert not fidelity.resumable(folder, "reference")  # its timestamps differ
    (folder / "last.pt").write_bytes(b"not a checkpoint")
    assert not fidelity.resumable(folder, "time_float32")
    ns = type("A", (), dict(data="ml-100k", epochs=2, device="cpu", threads=1, out=str(tmp_path)))()
    assert "--resume" in fidelity.command("time_float32", 2025, ns, resume=True)
    assert "--resume" not in fidelity.command("time_float32", 2025, ns)


def test_a_parts_lines_are_passed_on_as_they_come(monkeypatch):
    """make bench shows each part's progress while it runs (the peer alone takes 20+ minutes):
    a line the part writes to stderr reaches ours before the part ends; its stdout comes back."""
    import benchmarks.run as bench

    class Clock:
        def __init__(self):
            self.lines: list[tuple[float, str]] = []

        def write(self, s):
            if s:  # print(..., end="") writes its empty end separately
                self.lines.append((time.monotonic(), s))

        def flush(self):
            pass

    clock = Clock()
    monkeypatch.setattr(sys, "stderr", clock)
    child = ("import sys, time; print('[bench] epoch 1', file=sys.stderr, flush=True); time.sleep(1.5); "
             "print('[bench] epoch 2', file=sys.stderr, flush=True); print('{\"a\": 1}')")
    code, printed, tail = bench._stream([sys.executable, "-c", child])
    done = time.monotonic()
    assert code == 0 and json.loads(printed) == {"a": 1}
    assert [s for _, s in clock.lines] == ["  [bench] epoch 1\n", "  [bench] epoch 2\n"]
    assert done - clock.lines[0][0] >= 1.0  # the first line came before the part slept, not at its end
    assert tail == "[bench] epoch 1\n[bench] epoch 2\n"


def test_a_failed_part_names_itself_and_shows_its_last_lines(monkeypatch):
    import benchmarks.run as bench
    monkeypatch.setattr(bench, "_stream", lambda cmd: (3, "", "Traceback ...\nValueError: no data\n"))
    with pytest.raises(SystemExit, match=r"part eval failed \(exit 3\):\nTraceback ...\nValueError: no data"):
        bench._run_part("eval", [])
    monkeypatch.setattr(bench, "_stream", lambda cmd: (0, "\n", "warning only\n"))
    with pytest.raises(SystemExit, match="part eval printed no result:\nwarning only"):
        bench._run_part("eval", [])


def test_history_records_the_openmp_setting_and_shows_the_ratios(tmp_path, monkeypatch, capsys):
    """Runs under another OpenMP wait policy are not comparable (dense epochs 1.65x under
    PASSIVE): each history line says which it ran under, and --history shows it with the ratios."""
    import benchmarks.run as bench
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench, "HISTORY", tmp_path / "history.jsonl")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    monkeypatch.setattr(bench, "_run_part", lambda name, extra: {})
    monkeypatch.setattr(sys, "argv", ["run"] + [a for p in bench.PARTS if p != "eval" for a in ("--skip", p)])
    bench.main()
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    bench.main()
    rows = [json.loads(line) for line in bench.HISTORY.read_text().splitlines()]
    assert [r["openmp"] for r in rows] == ["spin=10000", "PASSIVE"]
    for r in rows:  # the ratios of a run with the peer
        r["hm4sr_time_to_target_vs_recbole_sasrec"] = 0.1234
    bench.HISTORY.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    bench.print_history()
    out = capsys.readouterr().out
    assert "target/peer" in out and out.count("0.123 ") == 3  # two rows and the median
    assert " spin=10000 " in out and " PASSIVE " in out
    assert "hm4sr_time_to_target_vs_recbole_sasrec: median 0.123 over 2 runs, target <= 0.2: met" in out
    assert bench._openmp_label({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}) == "default"


# Lines of `perf report --no-children --sort dso,symbol --stdio` from a profile of prefix steps on
# the 2-core AMD EPYC machine (2026-12-06), symbols shortened where they run on for pages.
PERF_LINES = """
# Overhead  Shared Object  Symbol
    32.16%  libtorch_cpu.so  [.] mkl_blas_def_sgemm_kernel_0_zen
     7.60%  libtorch_cpu.so  [.] c10::function_ref<void (char**, long const*, long, long)>::callback_fn<at::native::AVX2::VectorizedLoop2d<at::native::AVX2::direct_copy_kernel(at::TensorIteratorBase&)::{lambda()#3}
     6.71%  libtorch_cpu.so  [.] mkl_blas_def_sgemm_scopy_right4_bdz
     4.68%  libtorch_cpu.so  [.] c10::function_ref<void (char**, long const*, long, long)>::callback_fn<at::native::AVX2::VectorizedLoop2d<at::native::(anonymous namespace)::mul_kernel(at::TensorIteratorBase&)::{lambda()#1}
                --7.46%--at::internal::serial_for_each
     2.68%  libgomp.so.1  [.] 0x000000000001de62
     2.65%  libtorch_cpu.so  [.] mkl_blas_def_sgemm_mscale
     2.45%  libtorch_cpu.so  [.] at::native::(anonymous namespace)::vectorized_outer_sum<float, at::native::(anonymous namespace)::OuterSumCastLoadPolicy<at::vec::AVX2::Vectorized<float>
     1.46%  libpython3.11.so.1.0  [.] gc_collect_main
     1.14%  libtorch_cpu.so  [.] at::internal::invoke_parallel<at::parallel_for<at::native::(anonymous namespace)::_vec_softmax_lastdim<float>(float const*, float*, long, long)::{lambda(long, long)#1}>
     1.07%  [kernel.kallsyms]  [k] clear_page_erms
     0.91%  libtorch_cpu.so  [.] at::native::(anonymous namespace)::LayerNormBackwardKernelImplInternal<float, float>(at::Tensor const&, at::Tensor const&)
     0.44%  libpython3.11.so.1.0  [.] _PyEval_EvalFrameDefault
     0.41%  libc.so.6  [.] _int_malloc
     0.30%  [kernel.kallsyms]  [k] memset_orig
     0.20%  [kernel.kallsyms]  [k] csum_partial
     0.10%  [JIT] tid 8068  [.] 0x00007f5477280221
     0.05%  libtorch_cpu.so  [.] dnnl::impl::cpu::x64::brgemm_matmul_utils::jit_brgemm_matmul_copy_b_f32_t::generate
     0.04%  libtorch_cpu.so  [.] at::native::layer_norm_cpu_out
     0.03%  libpython3.11.so.1.0  [.] consume_kw
"""


def test_step_profile_sums_perf_samples_by_kind_of_work():
    from benchmarks.step_profile import kinds_of
    shares, symbols = kinds_of(PERF_LINES)
    assert len(symbols) == 19  # the header and the call-graph line are not symbols
    expected = {"gemm_kernel": 32.16, "jit_unnamed": 0.10, "copy": 7.60, "gemm_packing": 6.71 + 0.05, "elementwise": 4.68,
                "openmp_wait": 2.68, "gemm_other": 2.65, "reduction": 2.45, "python_gc": 1.46,
                "norm_softmax": 1.14 + 0.91 + 0.04, "os_kernel": 1.07 + 0.30 + 0.20, "python": 0.44 + 0.03,
                "other": 0.41}
    assert shares == pytest.approx(expected, abs=1e-9)
    assert symbols[0] == (32.16, "libtorch_cpu.so mkl_blas_def_sgemm_kernel_0_zen", "gemm_kernel")
    # MKL's AVX-512 path (on an AMD CPU with hm4sr_core.runtime's library): "nocopy" kernels
    # multiply unpacked operands, the scopy routines pack them
    avx512 = ("     2.28%  libtorch_cpu.so  [.] mkl_blas_avx512_sgemm_kernel_nocopy_TN_b0\n"
              "     5.13%  libtorch_cpu.so  [.] mkl_blas_avx512_sgemm_scopy_right8_ea\n")
    shares, _ = kinds_of(avx512)
    assert shares["gemm_kernel"] == pytest.approx(2.28) and shares["gemm_packing"] == pytest.approx(5.13)


def test_prefix_ratio_refuses_bad_arguments_before_training():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "benchmarks.prefix_ratio", *args], capture_output=True, text=True,
                              timeout=120)
    done = run("--rounds", "0")
    assert done.returncode == 2 and "--rounds must be >= 1, got 0" in done.stderr
    done = run("--rev", "no-such-revision-xyz")
    assert done.returncode == 1 and "--rev no-such-revision-xyz: not a commit of this repository" in done.stderr


def test_prefix_ratio_runs_a_revision_s_package_with_this_checkout_s_benchmarks(tmp_path, monkeypatch):
    from benchmarks import prefix_ratio
    monkeypatch.setattr(prefix_ratio, "REVS", tmp_path / "revs")
    package = prefix_ratio.package_at("HEAD")
    assert package.parent == tmp_path / "revs"
    assert (package / "hm4sr_core" / "model.py").read_text() == \
        subprocess.run(["git", "show", "HEAD:hm4sr_core/model.py"], cwd=prefix_ratio.ROOT, capture_output=True,
                       text=True, check=True).stdout
    assert not (package / "benchmarks").exists()
    prefix_ratio.check_package(package)  # today's package: accepted
    for where, expected_core in ((package, package), (None, prefix_ratio.ROOT)):
        cmd, cwd, env = prefix_ratio.side_process("hm4sr", where)
        assert cmd[-2:] == ["--one", "hm4sr"]
        probe = "import benchmarks, hm4sr_core; print(hm4sr_core.__file__); print(benchmarks.__file__)"
        for safe in ("", "1"):  # with PYTHONSAFEPATH python leaves out the working folder
            done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env={**env, "PYTHONSAFEPATH": safe},
                                  capture_output=True, text=True, timeout=60, check=True)
            core, bench = done.stdout.split()
            assert Path(core).resolve() == (expected_core / "hm4sr_core" / "__init__.py").resolve(), safe
            assert Path(bench).resolve() == (prefix_ratio.ROOT / "benchmarks" / "__init__.py").resolve()


def test_prefix_ratio_refuses_a_revision_its_benchmarks_cannot_drive(tmp_path, monkeypatch):
    from benchmarks import prefix_ratio
    monkeypatch.setattr(prefix_ratio, "REVS", tmp_path / "revs")
    old = prefix_ratio.package_at("f4b72c5")  # before hm4sr_core.provenance existed
    with pytest.raises(SystemExit, match="revisions from c11ac5c on can"):
        prefix_ratio.check_package(old)


def test_steal_percent_is_the_share_of_ticks_between_two_readings():
    from benchmarks.run import steal_percent
    assert steal_percent((10, 1000), (13, 1400)) == 0.75
    assert steal_percent(None, (13, 1400)) is None and steal_percent((10, 1000), (10, 1000)) is None


def test_mkl_paths_times_and_compares_every_product_of_a_step_on_both_paths(tmp_path):
    out = tmp_path / "paths.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.mkl_paths", "--rows", "300", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert [r["product"] for r in figures["products"]] == [
        f"{k}->{n} {what}" for k, n in ((64, 192), (64, 64), (64, 256), (256, 64))
        for what in ("forward", "input_gradient", "weight_gradient")]
    assert all(r["generic_seconds"] > 0 and r["library_seconds"] > 0 for r in figures["products"])
    from hm4sr_core import runtime
    if not figures["library"]["on"]:  # no library here: both columns are one path, so the bits agree
        assert all(r["same_bits"] for r in figures["products"]), figures
        assert figures["mkl_code_path"]["generic"] == figures["mkl_code_path"]["library"]
    elif runtime.mkl_shim_wanted(env={}) is None and figures["mkl_code_path"]["generic"] is not None:
        assert figures["mkl_code_path"]["generic"] == 0 and figures["mkl_code_path"]["library"] != 0
    assert "all products at 2 threads" in done.stdout
    assert subprocess.run([sys.executable, "-m", "benchmarks.mkl_paths", "--rows", "0"], capture_output=True,
                          text=True, timeout=120).returncode == 2
