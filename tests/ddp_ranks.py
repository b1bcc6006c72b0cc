"""The rank side of tests/test_distributed.py and tests/test_cuda.py:
``python tests/ddp_ranks.py CASE OUT [NPROC]`` starts NPROC (default 2) ranks on
127.0.0.1 with :func:`hm4sr_core.distributed.spawn` and runs CASE in each; rank 0 saves
what the test compares into OUT. Run in a subprocess with a timeout, so no test can hang.

Cases: ``train`` (gloo: the runs compared with one process, the gradient with
contrastive losses, sharded evaluation, a killed and resumed run), ``kill`` (rank 1 is
SIGKILLed after its first epoch), ``raise`` (rank 1 raises after its first epoch),
``cuda`` (nccl, rank r on cuda:r: one run compared with one process, sharded evaluation).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from conftest import TINY_T, TINY_WORLD  # noqa: E402 - tests/ is sys.path[0] when run as a script
from hm4sr_core import distributed
from hm4sr_core.config import ModelConfig, PreprocessConfig, SplitConfig, TrainConfig
from hm4sr_core.data.preprocess import preprocess
from hm4sr_core.data.splits import build_split, iterate_batches
from hm4sr_core.data.synthetic import make_synthetic_world
from hm4sr_core.evaluate import evaluate
from hm4sr_core.model import build_model
from hm4sr_core.sampling import StepSampler
from hm4sr_core.runs import load_checkpoint, model_from_checkpoint
from hm4sr_core.train import train

# The cases compared with one process (tests/test_distributed.py builds the same ones):
# no dropout (each rank draws its own), no auxiliary loss (in-batch negatives are per shard).
SASREC = ModelConfig.sasrec(hidden_size=16, max_length=TINY_T, num_layers=1, num_heads=2, inner_size=32,
                            hidden_dropout=0.0, attention_dropout=0.0)
HM4SR_REC_ONLY = ModelConfig(hidden_size=16, max_length=TINY_T, num_layers=1, num_heads=2, inner_size=32,
                             hidden_dropout=0.0, attention_dropout=0.0, w_id_contrastive=0.0, w_category=0.0,
                             w_placeholder_contrastive=0.0)
HM4SR_FULL = ModelConfig(hidden_size=16, max_length=TINY_T, num_layers=1, num_heads=2, inner_size=32,
                         hidden_dropout=0.0, attention_dropout=0.0)
BASE = TrainConfig(epochs=1, seed=11, eval_batch_size=16)


def equality_cases(split) -> dict:
    """name -> (model config, train config), 2 or 3 optimizer steps each. Prefix: shards of
    29 and 28 rows; then a batch of every example but one, and a last batch of one row,
    which leaves rank 1 without a row (it joins the all-reduce at weight 0)."""
    n = len(split.train_prefix)
    return {
        "sasrec_prefix": (SASREC, BASE.replace(mode="prefix", batch_size=57, max_steps_per_epoch=3)),
        "sasrec_prefix_tail": (SASREC, BASE.replace(mode="prefix", batch_size=n - 1, bucket_by_length=False)),
        "sasrec_dense": (SASREC, BASE.replace(mode="dense", dense_batch_size=16, max_steps_per_epoch=3)),
        "hm4sr_dense": (HM4SR_REC_ONLY, BASE.replace(mode="dense", dense_batch_size=16, max_steps_per_epoch=3)),
    }


EVAL_CONFIG = BASE.replace(eval_batch_size=7, eval_time="shuffled", mask_history=True)  # 9 batches over 2 ranks


def tiny_world():
    ds = preprocess(make_synthetic_world(**TINY_WORLD), PreprocessConfig(max_length=TINY_T))
    return ds, build_split(ds, SplitConfig(kind="leave_one_out", max_length=TINY_T))


def _save(obj, path: Path) -> None:
    if distributed.current().main:
        torch.save(obj, path)


def case_train(out: Path) -> None:
    ds, split = tiny_world()
    ranks = distributed.current()
    for name, (model_cfg, train_cfg) in equality_cases(split).items():
        train(ds, model_cfg, train_cfg, out_dir=out / name, data_hash="tiny", progress=False, split=split)

    # sharded evaluation of one model, with every option that draws or masks
    model = model_from_checkpoint(load_checkpoint(out / "sasrec_prefix" / "last.pt"), ds, best=False)
    origin = int(ds.stats["first_timestamp"])
    result = evaluate(model, split.valid, EVAL_CONFIG, history=split.train_history(), time_origin=origin,
                      ranks=ranks)
    _save({"per_user": result.per_user, "users": result.users, "top_items": result.top_items,
           "metrics": result.metrics}, out / "eval.pt")

    # one DDP step's gradient with every auxiliary loss on, in float64: the test computes the
    # per-shard gradients in another process with another thread count, and in float32 that
    # summation order alone moved an element by one ulp of the gradient's scale (issue 25)
    torch.manual_seed(0)
    model = build_model(HM4SR_FULL, ds).double().train()
    net = distributed.wrap_model(model, torch.device("cpu"))
    batch = next(iter(iterate_batches(split.train_prefix, 45, shuffle=True,
                                      generator=torch.Generator().manual_seed(2))))
    shard = distributed.shard_batch(batch, ranks)
    draws = StepSampler.for_model(model)(shard.batch, torch.Generator().manual_seed(100 + ranks.rank))
    result = net(shard.batch, draws)
    (result.loss * shard.weight).backward()
    _save({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out / "grads.pt")

    # a run stopped after epoch 1 on every rank and resumed equals the run never stopped
    cfg = BASE.replace(epochs=2, mode="dense", dense_batch_size=16, max_steps_per_epoch=2)
    small = HM4SR_FULL.replace(hidden_dropout=0.1, attention_dropout=0.1)
    whole = train(ds, small, cfg, out_dir=out / "whole", data_hash="tiny", progress=False, split=split)

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    try:
        train(ds, small, cfg, out_dir=out / "resumed", data_hash="tiny", progress=False, split=split, on_epoch=stop)
    except KeyboardInterrupt:
        pass
    resumed = train(ds, small, cfg, out_dir=out / "resumed", data_hash="tiny", progress=False, split=split,
                    resume=True)
    _save({"whole": whole.record["test"], "resumed": resumed.record["test"],
           "same_state": all(torch.equal(v, resumed.model.state_dict()[k])
                             for k, v in whole.model.state_dict().items())}, out / "resume.pt")


CUDA_CASE = "sasrec_dense"


def case_cuda(out: Path) -> None:
    ds, split = tiny_world()
    model_cfg, train_cfg = equality_cases(split)[CUDA_CASE]
    result = train(ds, model_cfg, train_cfg.replace(device="cuda"), out_dir=out / CUDA_CASE, data_hash="tiny",
                   progress=False, split=split)
    ranks = distributed.current()
    device = torch.device("cuda", ranks.local_rank)
    got = evaluate(result.model, split.valid, EVAL_CONFIG.replace(device="cuda"), history=split.train_history(),
                   time_origin=int(ds.stats["first_timestamp"]), device=device, ranks=ranks)
    _save({"per_user": got.per_user, "users": got.users, "backend": torch.distributed.get_backend()},
          out / "eval.pt")


def case_fail(out: Path, how: str) -> None:
    ds, split = tiny_world()
    ranks = distributed.current()

    def fail(row):
        if ranks.rank == 1:
            (out / "failed_at").write_text(repr(time.time()))
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("planted failure in rank 1")

    train(ds, SASREC, BASE.replace(epochs=50, dense_batch_size=8), data_hash="tiny", progress=False, split=split,
          on_epoch=fail)


def run_rank(case: str, out: str) -> None:
    torch.set_num_threads(1)
    if case == "train":
        case_train(Path(out))
    elif case == "cuda":
        case_cuda(Path(out))
    else:
        case_fail(Path(out), case)


if __name__ == "__main__":
    case, out = sys.argv[1], sys.argv[2]
    nproc = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    Path(out).mkdir(parents=True, exist_ok=True)
    try:
        distributed.spawn(run_rank, nproc, (case, out), device="cuda" if case == "cuda" else "cpu", timeout_s=60.0,
                          grace_s=5.0)
    except distributed.DistributedError as err:
        failed_at = Path(out) / "failed_at"
        after = time.time() - float(failed_at.read_text()) if failed_at.exists() else None
        print(json.dumps({"error": str(err), "seconds_after_failure": after}))
        sys.exit(1)
    print(json.dumps({"error": None}))
