"""Shared fixtures: a tiny planted synthetic dataset, its splits, a tiny model config
and one tiny trained run folder, built once per session so every test stays fast.

Sizes: 60 users, 40 items, ~700 interactions, T = 10, d = 16, one Transformer layer.

Also the tolerances every float comparison in tests/ is built from (issue 25): float_tol
(a rounding bound scaled to the magnitude and the number of rounding steps), forward_terms
and batch_terms (those steps for one model forward, and for a sum over a batch),
adam_param_tol (weights after Adam steps), assert_float_close, and clear_of_ties (the rows
whose ranking no rounding can change, so their metrics compare exactly).
"""

from __future__ import annotations

import os

# Before torch is imported: nothing may try the Hugging Face hub, and OpenMP worker
# threads must sleep rather than spin while waiting, or two threads on a 2-core
# machine shared with other jobs run tiny models ~20x slower (measured here).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hm4sr_core.config import ModelConfig, PreprocessConfig, SplitConfig, TrainConfig  # noqa: E402
from hm4sr_core.data.preprocess import preprocess  # noqa: E402
from hm4sr_core.data.schema import RawDataset, RawModality  # noqa: E402
from hm4sr_core.data.splits import build_split  # noqa: E402
from hm4sr_core.data.synthetic import make_synthetic_world  # noqa: E402
from hm4sr_core.sampling import StepSampler  # noqa: E402
from hm4sr_core.train import train  # noqa: E402

torch.set_num_threads(2)

TINY_T = 10  # sequence length of every tiny split and model
TINY_WORLD = dict(seed=3, n_users=60, n_items=40, mean_length=12, text_dim=8, image_dim=8)


FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7: the gap between 1.0 and the next float32
FLOAT64_EPS = float(np.finfo(np.float64).eps)  # 2**-52 ~ 2.2e-16
BF16_EPS = 2.0 ** -7  # bfloat16 keeps 8 significant bits: 0.0078


def float_tol(magnitude: float, terms: int = 1, eps: float = FLOAT32_EPS) -> float:
    """Absolute tolerance between two results of the same arithmetic rounded in different orders.

    Two runs of one float computation differ whenever something changes the order of its
    operations: the thread count, the CPU's vector width (AVX2, AVX-512, NEON) and the
    library kernels picked for it, a sum split over ranks, batches or chunks. Each rounding
    errs by at most eps/2 of the value it produces, and a sum of n terms whose absolute
    values add up to S is within (n - 1) * eps/2 * S of the exact sum (Higham, *Accuracy and
    Stability of Numerical Algorithms*, 2nd ed., section 4.2); so two orders of the same sum
    are within n * eps * S of each other. This returns that bound, ``terms * eps * magnitude``.

    magnitude: S, the size of the numbers summed. For a tensor result use its largest
    absolute value, for every element: an element near zero after cancellation still carries
    the rounding of the large terms that cancelled (issue 25: a gradient element 2.7e-7 off,
    one ulp of the tensor's scale of 3, failed an rtol meant for its own small size).
    terms: rounding steps on the longest path to one output: the length of each reduction it
    passes through (a dot product of width d, a sum over examples or positions), added over
    the layers, plus a few per elementwise function (exp, log, tanh, erf, rsqrt are vectorised
    to within a few ulp, with different code per instruction set). :func:`forward_terms`
    counts them for a model's forward pass, :func:`batch_terms` for a sum over a batch.
    eps: FLOAT64_EPS for a computation done in float64, BF16_EPS for bf16 autocast.

    This is a worst-case bound: rounding errors mostly cancel, and the gaps measured on any
    one CPU sit well below it. Each test that uses it keeps its signal (the change a real bug
    would make) far above it.
    """
    return terms * eps * magnitude


def widest_reduction(config: ModelConfig) -> int:
    """The longest sum in a model built from ``config``: max(4 streams x d, feed-forward
    width, T)."""
    return max(4 * config.hidden_size, config.inner_size, config.max_length)


def forward_terms(config: ModelConfig) -> int:
    """Rounding steps (:func:`float_tol`'s ``terms``) of one forward pass of a model built from
    ``config``, up to its scores: per Transformer layer about 6 reductions in a row (attention
    scores, attention mix, output projection, two feed-forward layers, LayerNorm statistics),
    plus about 4 outside the layers (input projections, the MoE mixes, the score's dot product
    over the streams), each at most :func:`widest_reduction` long; a few ulp per exp / erf /
    rsqrt stay within that."""
    return (4 + 6 * config.num_layers) * widest_reduction(config)


def batch_terms(examples: int, config: ModelConfig) -> int:
    """Rounding steps of a sum over ``examples`` of values each computed by a forward (and
    backward) pass: a loss averaged over a batch, a parameter's gradient. The pass's own
    steps, plus the sum's: ``examples`` additions, each on the absolute sum of the
    contributions, which exceeds the result's scale where they cancel; the test cannot see
    that sum, so each addition is counted :func:`widest_reduction` times as a margin."""
    return forward_terms(config) + examples * widest_reduction(config)


TINY_MODEL = ModelConfig(hidden_size=16, max_length=TINY_T, num_layers=1, num_heads=2, inner_size=32,
                         hidden_dropout=0.1, attention_dropout=0.1)
TINY_FORWARD_TERMS = forward_terms(TINY_MODEL)  # 640


@torch.no_grad()
def clear_of_ties(model, batches, terms: int = TINY_FORWARD_TERMS, top: int = 10) -> np.ndarray:
    """(rows,) bool over the rows of ``batches``: rows whose ranking no rounding can change.

    Evaluating in other batch shapes, thread counts or on another CPU rounds the scores in
    another order, each by up to float_tol(scale, terms) (scale: the row's largest |score|).
    A row is clear when its target's score, and each of its ``top`` + 1 best scores, differ
    from every other candidate's by more than twice that: its rank counts, so every per-user
    metric, and its top-``top`` list are then the same in any order, and comparing them
    exactly is sound. (Every real item is a candidate: evaluation without ``mask_history``.)
    """
    items = model.item_matrix()[1:]  # (N, K): real items only
    clear = []
    for batch in batches:
        scores = model.query(batch) @ items.T  # (B, N)
        rows, targets = torch.arange(batch.size), batch.targets - 1
        tol = 2 * float_tol(scores.abs().amax(1), terms)  # (B,)
        target = scores[rows, targets].clone()
        scores[rows, targets] = torch.inf  # not its own competitor
        target_clear = (scores - target[:, None]).abs().amin(1) > tol
        scores[rows, targets] = target
        best = scores.sort(1, descending=True).values[:, : top + 2]
        order_clear = (best[:, :-1] - best[:, 1:]).amin(1) > tol  # the top + 1 best keep their places
        clear.append((target_clear & order_clear).numpy())
    return np.concatenate(clear)


def adam_param_tol(steps: int, lr: float, terms: int) -> float:
    """Largest gap between the weights of two runs of ``steps`` Adam steps whose gradients
    differ only by rounding (``terms`` as in :func:`float_tol`, per step's gradient).

    Adam's update lr * m / (sqrt(v) + eps) does not depend on the gradient's scale, so a
    relative gradient error r = float_tol(1, terms) moves each step by at most ~lr * r, and
    ``steps`` steps by steps * lr * r. Elements whose gradient is itself rounding noise (the
    attention key bias: ~1e-15, mathematically 0) stay far below Adam's eps of 1e-8 and do
    not move in either run."""
    return steps * lr * float_tol(1.0, terms)


def step_forward(model, batch, seed: int | None = None, item_counts=None):
    """A training step's forward, ``model(batch, draws)``, with the draws the trainer's
    step makes (placeholder positions, then negatives) from a generator seeded with
    ``seed`` (torch's global generator when None)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return model(batch, StepSampler.for_model(model, item_counts)(batch, gen))


def assert_float_close(got, want, terms: int, *, magnitude: float | None = None, eps: float = FLOAT32_EPS,
                       msg: str | None = None) -> None:
    """``got`` equals ``want`` up to :func:`float_tol`; tensors or arrays of any float dtype.
    ``magnitude`` defaults to the largest absolute value of ``want``."""
    got, want = (x.detach().cpu().double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, np.float64))
                 for x in (got, want))
    if magnitude is None:
        magnitude = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=float_tol(magnitude, terms, eps), msg=msg)


@pytest.fixture(scope="session")
def tiny_raw() -> RawDataset:
    return make_synthetic_world(**TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_ds(tiny_raw):
    """The preprocessed tiny world: timestamps strictly increase within each user."""
    return preprocess(tiny_raw, PreprocessConfig(max_length=TINY_T))


@pytest.fixture(scope="session")
def tiny_split(tiny_ds):
    return build_split(tiny_ds, SplitConfig(kind="leave_one_out", max_length=TINY_T))


@pytest.fixture(scope="session")
def tiny_temporal_split(tiny_ds):
    return build_split(tiny_ds, SplitConfig(kind="temporal", max_length=TINY_T))


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    """HM4SR with every part on, shrunk: d 16, 1 layer, T 10, light dropout."""
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_train_config() -> TrainConfig:
    """Two epochs of ~3 dense batches each; evaluation in one batch."""
    return TrainConfig(epochs=2, dense_batch_size=32, eval_batch_size=64, seed=11, patience=10)


@pytest.fixture(scope="session")
def tiny_run(tiny_ds, tiny_split, tiny_model_config, tiny_train_config, tmp_path_factory):
    """One finished tiny training run with its folder (results.json, best.pt, ...)."""
    out = tmp_path_factory.mktemp("tiny_run")
    result = train(tiny_ds, tiny_model_config, tiny_train_config, out_dir=out, data_hash="tiny",
                   progress=False, split=tiny_split)
    return result, out


@pytest.fixture
def make_raw():
    """Factory for hand-written RawDatasets: rows of (user, item, timestamp)."""

    def _make(rows, *, items=None, modalities=(), name="hand") -> RawDataset:
        inter = pd.DataFrame(list(rows), columns=["user", "item", "timestamp"])
        if items is None:
            tokens = sorted({str(r[1]) for r in rows})
            items = pd.DataFrame({"item": tokens, "text": [f"title {t}" for t in tokens],
                                  "categories": [["c" + t[:1]] for t in tokens]})
        return RawDataset(name=name, source={"reader": "hand-written test rows"}, interactions=inter,
                          items=items, modalities=list(modalities), interactions_file=f"{name}.inter")

    return _make


@pytest.fixture
def make_modality():
    """Factory for precomputed modalities: row i is (i+1, i+1, ...) unless ``values`` is given."""

    def _make(tokens, dim=3, *, name="text", optional=False, available=None, values=None) -> RawModality:
        tokens = [str(t) for t in tokens]
        if values is None:
            values = np.repeat(np.arange(1, len(tokens) + 1, dtype=np.float32)[:, None], dim, axis=1)
        return RawModality(name=name, provenance={"encoder": "hand"}, features=np.asarray(values, np.float32),
                           feature_items=np.array(tokens, dtype=object), available=available,
                           optional=optional, source=f"{name}.npy")

    return _make
