"""The CUDA path: skipped where torch sees no GPU (CI), run on a GPU machine with
``pytest tests/test_cuda.py``. Training, evaluation, bf16 autocast and a checkpoint
trained on the GPU and re-scored on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BF16_EPS, adam_param_tol, assert_float_close, batch_terms, float_tol, step_forward

from hm4sr_core import steps as training_steps
from hm4sr_core.evaluate import evaluate
from hm4sr_core.runs import load_checkpoint, model_from_checkpoint
from hm4sr_core.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("mode", ["dense", "prefix"])
def test_training_on_cuda_learns_and_its_checkpoint_scores_the_same_on_cpu(tiny_ds, tiny_split, tiny_model_config,
                                                                         tiny_train_config, tmp_path, mode):
    config = tiny_train_config.replace(device="cuda", mode=mode, batch_size=128, epochs=3)
    result = train(tiny_ds, tiny_model_config, config, out_dir=tmp_path, data_hash="tiny", progress=False,
                   split=tiny_split)
    steps = result.steps
    assert steps["loss_rec"].map(math.isfinite).all()
    by_epoch = steps.groupby("epoch")["loss_rec"].mean()
    assert by_epoch.iloc[-1] < by_epoch.iloc[0]  # it learns on the GPU
    model = model_from_checkpoint(load_checkpoint(tmp_path / "best.pt"), tiny_ds)  # read onto the CPU
    assert next(model.parameters()).device.type == "cpu"
    origin = int(tiny_ds.stats["first_timestamp"])
    on_cpu = evaluate(model, tiny_split.valid, config.replace(device="cpu"), time_origin=origin)
    on_gpu = evaluate(model.to("cuda"), tiny_split.valid, config, device="cuda", time_origin=origin)
    # CPU and GPU kernels round the scores differently; a user's metric (in [0, 1]) moves only
    # where rounding reorders a near tie, which moves the mean by at most 1 / users: one allowed
    one_user = 1 / len(on_cpu.users)
    for k in ("ndcg@10", "hr@10", "mrr@10"):
        assert math.isclose(on_cpu.metrics[k], on_gpu.metrics[k], abs_tol=one_user), k
    assert math.isclose(result.valid.metrics[config.valid_metric], on_gpu.metrics[config.valid_metric],
                        abs_tol=one_user)


def test_bf16_autocast_trains_with_finite_losses(tiny_ds, tiny_split, tiny_model_config, tiny_train_config):
    config = tiny_train_config.replace(device="cuda", amp=True, epochs=2)
    result = train(tiny_ds, tiny_model_config, config, progress=False, split=tiny_split)
    for name in ("loss_rec", "loss_id_contrastive", "loss_category", "loss_placeholder_contrastive"):
        assert result.steps[name].map(math.isfinite).all(), name
    assert 0.0 <= result.test.metrics["ndcg@10"] <= 1.0


def test_introspection_tensors_come_back_from_the_gpu(tiny_ds, tiny_split, tiny_model_config):
    from hm4sr_core.data.splits import iterate_batches
    from hm4sr_core.model import build_model
    model = build_model(tiny_model_config, tiny_ds).to("cuda").eval()
    batch = next(iter(iterate_batches(tiny_split.valid, 16))).to("cuda")
    with torch.no_grad():
        out, scores = model.encode(batch), model.full_sort_predict(batch)
    assert scores.device.type == "cuda" and scores.shape[0] == 16
    sums = out.interactive_gates.sum(-1)[batch.items > 0]  # (real positions, S); padding rows are 0
    experts = out.interactive_gates.shape[-1]  # a softmax's E outputs (exp, sum of E, divide) summed again
    assert_float_close(sums, torch.ones_like(sums), 2 * experts + 3, magnitude=1.0)
    assert set(out.losses) >= {"rec", "id_contrastive", "category", "placeholder_contrastive"}


def test_recompute_on_cuda_replays_dropout_and_gives_the_same_gradients(tiny_ds, tiny_split, tiny_model_config):
    """On a GPU the stacked encoder draws dropout with F.dropout; recomputation must replay
    the CUDA random stream, so loss and gradients equal the plain run's."""
    from hm4sr_core.data.splits import iterate_batches
    from hm4sr_core.model import build_model
    batch = next(iter(iterate_batches(tiny_split.train_prefix, 64, shuffle=True,
                                      generator=torch.Generator().manual_seed(2)))).to("cuda")
    runs = []
    for on in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_model_config, tiny_ds).to("cuda").train().recompute_activations(on)
        torch.manual_seed(7)
        out = step_forward(model, batch, 3)
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, grads0), (loss1, grads1) = runs
    # recomputation reruns the forward inside backward, where kernels may sum in another
    # order: a batch of 64 prefixes (a dropout mask not replayed would move the gradients by
    # a sizeable fraction of their scale)
    terms = batch_terms(64, tiny_model_config)
    assert_float_close(loss1, loss0, terms)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert_float_close(grads1[name], grads0[name], terms, msg=name)


def test_backward_in_parts_on_cuda_replays_each_parts_dropout(tiny_ds, tiny_split, tiny_model_config):
    """micro_batches on a GPU: the rerun of each part must rewind the CUDA random stream
    (F.dropout draws there), so the gradients equal those of a direct whole-batch loss
    over the parts encoded one after another from the same seed."""
    from hm4sr_core.data.splits import SequenceBatch, iterate_batches
    from hm4sr_core.model import SequenceStates, build_model
    from hm4sr_core.sampling import StepSampler
    batch = next(iter(iterate_batches(tiny_split.train_prefix, 64, shuffle=True,
                                      generator=torch.Generator().manual_seed(2)))).to("cuda")
    grads = []
    for direct in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_model_config, tiny_ds).to("cuda").train()
        torch.manual_seed(7)
        draws = StepSampler.for_model(model)(batch, torch.Generator().manual_seed(3))
        if not direct:
            training_steps.backward_in_parts(model, batch, draws, 2)
        else:
            place = draws.placeholders
            hs, augs = [], []
            for sl in (slice(0, 32), slice(32, 64)):
                sub = SequenceBatch(batch.items[sl], batch.timestamps[sl], batch.lengths[sl], batch.targets[sl],
                                    batch.users[sl])
                states, _ = model.encode_states(sub, model.item_tables(), place[sl])
                hs.append(states.last)
                augs.append(states.augmented)
            named = model.named_losses(batch, SequenceStates(torch.cat(hs, 1), None, torch.cat(augs, 1), place),
                                       model.item_matrix())
            model.total_loss(named).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:  # a batch of 64 prefixes, summed in parts or at once
        assert_float_close(grads[0][name], grads[1][name], batch_terms(64, tiny_model_config), msg=name)


def test_backward_in_parts_under_bf16_autocast_reaches_every_weight(tiny_ds, tiny_split, tiny_model_config):
    """micro_batches with amp: the no-graph first pass runs in autocast regions of its own, so
    no bf16 weight copy made without a graph is reused by the reruns; every weight the one-pass
    bf16 step trains gets a gradient here too, close to that step's (dropout off, so the two
    compute the same thing up to bf16 rounding)."""
    from hm4sr_core.data.splits import iterate_batches
    from hm4sr_core.model import build_model
    from hm4sr_core.sampling import StepSampler
    config = tiny_model_config.replace(hidden_dropout=0.0, attention_dropout=0.0)
    batch = next(iter(iterate_batches(tiny_split.train_prefix, 64, shuffle=True,
                                      generator=torch.Generator().manual_seed(2)))).to("cuda")
    grads = []
    for parts in (1, 4):
        torch.manual_seed(0)
        model = build_model(config, tiny_ds).to("cuda").train()
        if parts == 1:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = step_forward(model, batch, 3)
            out.loss.backward()
        else:
            draws = StepSampler.for_model(model)(batch, torch.Generator().manual_seed(3))
            training_steps.backward_in_parts(model, batch, draws, parts, autocast_dtype=torch.bfloat16)
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    # bf16 keeps 8 significant bits; each of the ~6 matmuls on the forward and backward path
    # rounds both operands to bf16: ~12 roundings of at most BF16_EPS / 2 each, relative to the
    # gradient's norm; the one-pass and 4-part steps round differently, so twice that
    # (0.094); the float32 accumulation adds far less
    for name, want in grads[0].items():
        got = grads[1][name]
        assert float(got.norm()) > 0 or float(want.norm()) == 0, name
        scale = float(want.norm())
        bound = float_tol(scale, 12, BF16_EPS) + float_tol(scale, batch_terms(64, config))
        assert float((got - want).norm()) <= bound, name


def test_ddp_over_nccl_trains_as_one_process_and_evaluates_to_the_bit(tiny_ds, tmp_path):
    """`hm4sr train --nproc N --set device=cuda`'s path: N nccl ranks (N = 2 where two GPUs
    are seen, else a process group of one, which still runs DDP, the shards and the
    gathers over nccl), rank r on cuda:r. Parameters as one CUDA process's within a bound
    the CPU test's (a rounding bound holds for any kernel's order); evaluation equal to the
    bit (same batches, same kernels, metrics from integer counts)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests"))
    import ddp_ranks

    nproc = min(2, torch.cuda.device_count())
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(root / "tests" / "ddp_ranks.py"), "cuda", str(tmp_path), str(nproc)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ds, split = ddp_ranks.tiny_world()
    model_cfg, train_cfg = ddp_ranks.equality_cases(split)[ddp_ranks.CUDA_CASE]
    single = train(ds, model_cfg, train_cfg.replace(device="cuda"), out_dir=tmp_path / "single", data_hash="tiny",
                   progress=False, split=split)
    theirs = load_checkpoint(tmp_path / ddp_ranks.CUDA_CASE / "last.pt")["model_state"]
    # 3 steps of 16 windows x 10 positions
    atol = adam_param_tol(train_cfg.max_steps_per_epoch, train_cfg.lr, batch_terms(160, model_cfg))
    for name, want in load_checkpoint(tmp_path / "single" / "last.pt")["model_state"].items():
        assert torch.allclose(theirs[name], want, rtol=0, atol=atol), (name, float((theirs[name] - want).abs().max()))
    got = torch.load(tmp_path / "eval.pt", weights_only=False)
    assert got["backend"] == "nccl"
    model = model_from_checkpoint(load_checkpoint(tmp_path / ddp_ranks.CUDA_CASE / "last.pt"), ds, best=False)
    again = evaluate(model.to("cuda"), split.valid, ddp_ranks.EVAL_CONFIG.replace(device="cuda"),
                     history=split.train_history(), time_origin=int(ds.stats["first_timestamp"]), device="cuda")
    assert np.array_equal(got["users"], again.users)
    for k, v in again.per_user.items():  # the DDP model scored by one process: the gathered rows, bit for bit
        assert np.array_equal(got["per_user"][k], v), k
