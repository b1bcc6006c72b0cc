"""Tests for hm4sr_core.distributed and the data-parallel path of train/evaluate: two gloo
ranks on 127.0.0.1 against one process (parameters after a few steps, evaluation to the
bit, the contrastive gradient with per-shard negatives, resume), a killed or failing rank
ending the run with a message naming it, and ``hm4sr train --nproc 2`` / torchrun.

Every multi-process run is a subprocess with a timeout (tests/ddp_ranks.py holds the rank
side), so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hm4sr_core import distributed
from hm4sr_core.data.splits import iterate_batches
from hm4sr_core.evaluate import evaluate
from hm4sr_core.model import build_model
from hm4sr_core.runs import load_checkpoint, model_from_checkpoint
from hm4sr_core.train import initial_model, train

sys.path.insert(0, str(Path(__file__).parent))
import ddp_ranks  # noqa: E402
from conftest import (  # noqa: E402
    FLOAT64_EPS, adam_param_tol, assert_float_close, batch_terms, float_tol, step_forward)

ROOT = Path(__file__).resolve().parent.parent
# DDP sums two ranks' gradients where one process sums all examples at once: float32
# rounding in another order. A step's gradient element sums at most 528 examples (the
# prefix-tail case's batch of every prefix but one).
STEP_TERMS = batch_terms(528, ddp_ranks.HM4SR_FULL)
PARAM_ATOL = adam_param_tol(3, ddp_ranks.BASE.lr, STEP_TERMS)  # 1.2e-5 (3 steps, lr 1e-3); measured <= 6.5e-8


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
            "HF_HUB_OFFLINE": "1"}


def _ranks(case: str, out: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_ranks.py"), case, str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Folder of the ``train`` case run by two ranks (tests/ddp_ranks.py)."""
    out = tmp_path_factory.mktemp("ddp")
    done = _ranks("train", out, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def world():
    return ddp_ranks.tiny_world()


# ----------------------------------------------------------------------------- no process group


def test_shards_are_strided_disjoint_and_weights_average_to_one(tiny_split):
    batch = next(iter(iterate_batches(tiny_split.train_dense, 7)))
    shards = [distributed.shard_batch(batch, distributed.Ranks(r, 3, r, True)) for r in range(3)]
    assert [s.batch.users.tolist() for s in shards] == [batch.users[r::3].tolist() for r in range(3)]
    assert sum(s.examples for s in shards) == shards[0].total == int((batch.position_targets > 0).sum())
    assert sum(s.weight for s in shards) == pytest.approx(3.0)  # DDP divides by 3: weights sum to 3 (float64)
    for s in shards:  # each shard is trimmed to its own longest sequence
        assert s.batch.items.shape[1] == int(s.batch.lengths.max())


def test_a_rank_without_rows_runs_one_row_at_weight_zero(tiny_split):
    batch = next(iter(iterate_batches(tiny_split.train_prefix, 1)))
    empty = distributed.shard_batch(batch, distributed.Ranks(1, 2, 1, True))
    assert empty.examples == 0 and empty.weight == 0.0 and empty.batch.size == 1
    full = distributed.shard_batch(batch, distributed.Ranks(0, 2, 0, True))
    assert full.examples == full.total == 1 and full.weight == 2.0


def test_setup_names_the_missing_environment(monkeypatch):
    for key in distributed.ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        distributed.setup("cpu")


def test_each_cuda_rank_takes_its_local_gpu():
    ranks = distributed.Ranks(3, 4, 1, True)
    assert distributed.rank_device("cuda", ranks) == torch.device("cuda", 1)
    assert distributed.rank_device("cpu", ranks) == torch.device("cpu")
    assert distributed.rank_device("cuda:1", distributed.SINGLE) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK 1"):
        distributed.rank_device("cuda:0", ranks)


# ----------------------------------------------------------------------------- two ranks


@pytest.mark.parametrize("case", ["sasrec_prefix", "sasrec_prefix_tail", "sasrec_dense", "hm4sr_dense"])
def test_two_ranks_reach_the_parameters_of_one_process(ddp_run, world, case, tmp_path):
    ds, split = world
    model_cfg, train_cfg = ddp_ranks.equality_cases(split)[case]
    single = train(ds, model_cfg, train_cfg, out_dir=tmp_path, data_hash="tiny", progress=False, split=split)
    ours, theirs = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(ddp_run / case / "last.pt")
    assert ours["step"] == theirs["step"] >= 2
    initial = initial_model(ds, model_cfg, train_cfg.seed).state_dict()
    moved = 0.0
    for name, want in ours["model_state"].items():
        got = theirs["model_state"][name]
        assert torch.allclose(got, want, rtol=0, atol=PARAM_ATOL), (name, float((got - want).abs().max()))
        moved = max(moved, float((want - initial[name]).abs().max()))
    assert moved > 100 * PARAM_ATOL  # the steps moved the weights far more than the tolerance
    # Adam divides a constant gradient scale away from the update, so equal weights alone
    # would not catch a mis-scaled shard weight; its moments keep the gradients' scale.
    for index, want in ours["optimizer_state"]["state"].items():
        got = theirs["optimizer_state"]["state"][index]
        # the first moment sums the steps' gradients, the second their squares (twice the
        # relative rounding); a mis-scaled shard weight would be off by a factor of 2 or more
        for moment, terms in (("exp_avg", STEP_TERMS), ("exp_avg_sq", 2 * STEP_TERMS)):
            assert_float_close(got[moment], want[moment], terms, msg=f"{index} {moment}")
    # the logged loss is the global batch's (count-weighted over ranks), as one process logs it:
    # a mean over <= 528 examples
    logged = pd.read_csv(ddp_run / case / "steps.csv")["loss_rec"]
    assert_float_close(logged, single.steps["loss_rec"], STEP_TERMS)
    record = json.loads((ddp_run / case / "results.json").read_text())
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["backend"] == "gloo"


def _one_thread(run):
    """``run()`` with one torch thread, as each rank runs: a thread count can change the
    order a kernel sums in, so only with the ranks' count is the arithmetic the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def test_sharded_evaluation_equals_one_process_to_the_bit(ddp_run, world):
    ds, split = world
    model = model_from_checkpoint(load_checkpoint(ddp_run / "sasrec_prefix" / "last.pt"), ds, best=False)
    want = _one_thread(lambda: evaluate(model, split.valid, ddp_ranks.EVAL_CONFIG, history=split.train_history(),
                                        time_origin=int(ds.stats["first_timestamp"])))
    got = torch.load(ddp_run / "eval.pt", weights_only=False)
    assert len(want.users) > 7 * 2  # more evaluation batches than ranks: both ranks ranked some
    # Exact: each rank scores whole 7-row batches, the same ones through the same ops on one
    # thread as this process, and the metrics are functions of integer counts
    assert np.array_equal(got["users"], want.users) and np.array_equal(got["top_items"], want.top_items)
    assert got["per_user"].keys() == want.per_user.keys()
    for k, v in want.per_user.items():
        assert torch.equal(torch.from_numpy(got["per_user"][k]), torch.from_numpy(v)), k
    assert got["metrics"] == want.metrics


def test_training_results_rank_every_user_once_as_one_process(ddp_run, world):
    """results.json and per_user_valid.parquet of a two-rank run: its best model scored by
    one process gives the same rows, in the same order."""
    ds, split = world
    _, train_cfg = ddp_ranks.equality_cases(split)["hm4sr_dense"]
    model = model_from_checkpoint(load_checkpoint(ddp_run / "hm4sr_dense" / "best.pt"), ds)
    want = _one_thread(lambda: evaluate(model, split.valid, train_cfg, history=split.train_history(),
                                        time_origin=int(ds.stats["first_timestamp"])))
    got = pd.read_parquet(ddp_run / "hm4sr_dense" / "per_user_valid.parquet")  # exact, as above
    assert got["user"].is_unique and np.array_equal(got["user"].to_numpy(), want.users)
    for k, v in want.per_user.items():
        assert np.array_equal(got[k].to_numpy(), v), k


def test_contrastive_negatives_stay_within_each_ranks_shard(ddp_run, world):
    """The DDP gradient with every auxiliary loss on is the example-weighted mean of each
    shard's own gradient (in-batch negatives from the shard only), not the full batch's."""
    ds, split = world
    batch = next(iter(iterate_batches(split.train_prefix, 45, shuffle=True,
                                      generator=torch.Generator().manual_seed(2))))
    got = torch.load(ddp_run / "grads.pt", weights_only=True)

    def grads(part, seed):  # in float64, as tests/ddp_ranks.py computes the DDP gradient
        torch.manual_seed(0)
        model = build_model(ddp_ranks.HM4SR_FULL, ds).double().train()
        out = step_forward(model, part, seed)
        out.loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    shards = [distributed.shard_batch(batch, distributed.Ranks(r, 2, r, True)) for r in range(2)]
    per_shard = [grads(s.batch, 100 + r) for r, s in enumerate(shards)]
    whole = grads(batch, 100)
    assert got.keys() == per_shard[0].keys() and len(got) > 10
    # a float64 rounding bound over a batch of 45 prefixes, ~4e-12 at the gradients' scale of ~5
    terms = batch_terms(45, ddp_ranks.HM4SR_FULL)
    for name in got:
        assert got[name].dtype == torch.float64, name
        want = sum(s.examples / s.total * g[name] for s, g in zip(shards, per_shard))
        assert_float_close(got[name], want, terms, eps=FLOAT64_EPS, msg=name)
    name = "item_embedding.weight"  # gathered negatives would differ by ~3, at the gradient's scale
    gap, scale = float((got[name] - whole[name]).abs().max()), float(whole[name].abs().max())
    assert gap > 0.1 * scale > 1e9 * float_tol(scale, terms, FLOAT64_EPS)


def test_a_run_stopped_on_every_rank_resumes_to_the_same_result(ddp_run):
    saved = torch.load(ddp_run / "resume.pt", weights_only=False)  # exact: the resume replays the same ops
    assert saved["resumed"] == saved["whole"] and saved["same_state"]
    ck = load_checkpoint(ddp_run / "whole" / "last.pt")
    assert ck["world_size"] == 2 and len(ck["rng_states"]) == 2
    assert not torch.equal(ck["rng_states"][0], ck["rng_states"][1])  # each rank its own dropout stream


@pytest.mark.parametrize("how, message", [("kill", "rank 1 of 2 was killed by signal SIGKILL"),
                                          ("raise", "rank 1 of 2 failed with ValueError: planted failure in rank 1")])
def test_a_dead_rank_ends_the_run_with_its_name_and_error(tmp_path, how, message):
    done = _ranks(how, tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"].startswith(message), report["error"]
    # rank 0 fails at its next collective (the peer's connection is gone), not after the
    # 60 s timeout, and the launcher returns within its 5 s grace
    assert report["seconds_after_failure"] < 30, report


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from hm4sr_core.cli import main
    root = tmp_path_factory.mktemp("ddp-data")
    assert main(["prepare", "synthetic", "--name", "ddptiny", "--out-root", str(root), "--users", "60",
                 "--items", "40"]) == 0
    return root / "ddptiny"


def _cli(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_nproc_and_torchrun_train_the_same_run_and_only_rank_0_writes(prepared, tmp_path):
    common = ["train", "--data", str(prepared), "--model", "sasrec", "--epochs", "2", "--quiet", "--set",
              "threads=1", "--set", "dense_batch_size=16"]
    spawned = _cli([sys.executable, "-m", "hm4sr_core.cli", *common, "--nproc", "2", "--out", str(tmp_path / "a")])
    assert spawned.returncode == 0, spawned.stderr[-3000:]
    assert spawned.stdout.count("sasrec seed 2025") == 1  # printed by rank 0 only
    port = distributed.free_port()
    launched = _cli([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                     "127.0.0.1", "--master-port", str(port), "-m", "hm4sr_core", *common,
                     "--out", str(tmp_path / "b")])
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = (json.loads((tmp_path / x / "results.json").read_text()) for x in "ab")
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    assert a["distributed"]["world_size"] == b["distributed"]["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "best.pt", "epochs.csv", "last.pt", "per_user_test.parquet", "per_user_valid.parquet", "results.json",
        "steps.csv"]  # no stray temporary files from a second writer


def test_nproc_refuses_settings_it_cannot_honour(prepared, tmp_path, capsys, monkeypatch):
    from hm4sr_core.cli import main
    assert main(["train", "--data", str(prepared), "--out", str(tmp_path), "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    assert main(["train", "--data", str(prepared), "--out", str(tmp_path), "--nproc", "2", "--mode", "prefix",
                 "--set", "micro_batches=2"]) == 2
    assert "micro_batches > 1 is for one process" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", str(prepared), "--out", str(tmp_path), "--nproc", "2"]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
