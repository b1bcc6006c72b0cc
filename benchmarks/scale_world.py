"""A synthetic catalogue of any size, built in memory in seconds, for the scale benchmark.

``make_scale_world(num_items)`` returns a :class:`hm4sr_core.data.schema.Dataset` as
:func:`hm4sr_core.data.preprocess.preprocess` would (dense ids, sorted by user, time,
item; row 0 of every item table is padding) without going through strings, k-core or
encoders, which at 10^7 interactions would cost minutes and gigabytes before the first
step. It carries no planted structure (``hm4sr_core.data.synthetic`` does that, for small
worlds): it exists to measure what a step, an evaluation and memory cost as the
catalogue grows, so what matters is the shapes a real catalogue has:

* about ``interactions_per_item`` interactions per item: every item once (so the whole
  catalogue is in the data, as after an item k-core) and the rest drawn from a power law
  (Zipf exponent ``popularity_exponent`` over a random order of the items);
* user sequences of ``min_length`` + a geometric tail, mean ``mean_length`` (Amazon
  2023 categories after a 5-core: 8 to 15), so dense windows and evaluation users scale
  with the interactions;
* strictly increasing timestamps per user (log-uniform gaps of a minute to a week from
  a start in 2020-2021), so no tie-break is ever needed;
* one category per item out of ``num_categories``, and two small feature modalities
  ("text", "image") of ``feature_dim`` float32 columns: the category's prototype plus
  item noise. Small on purpose: a 1280-wide image table (EfficientNet) for 10^6 items is
  alone 5 GB of float32 and would measure the feature table, not the model; the model
  projects every modality to ``hidden_size`` first, so the width only changes that one
  projection's cost.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same arguments give the
same arrays. 10^6 items (10^7 interactions) build in about 10 s here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hm4sr_core.data.preprocess import compute_stats
from hm4sr_core.data.schema import Dataset, ModalityFeatures

START_SECONDS = 1_577_836_800  # 2020-01-01T00:00:00Z: dates stay readable
START_SPAN_S = 730 * 86_400  # users start in a two-year window
GAP_RANGE_S = (60.0, 7 * 86_400.0)  # log-uniform gaps: a minute to a week
MEAN_LENGTH = 15.0  # default mean sequence length (Amazon 2023 categories after a 5-core: 8 to 15)


def make_scale_world(num_items: int, *, interactions_per_item: float = 10.0, mean_length: float = MEAN_LENGTH,
                     min_length: int = 5, popularity_exponent: float = 0.8, num_categories: int = 20,
                     feature_dim: int = 32, seed: int = 0) -> Dataset:
    """A :class:`Dataset` of ``num_items`` items and about ``num_items * interactions_per_item``
    interactions (see the module docstring for the shapes). Raises ValueError naming the
    argument and its allowed range."""
    if num_items < 10:
        raise ValueError(f"num_items must be >= 10, got {num_items}")
    if interactions_per_item < 1:
        raise ValueError(f"interactions_per_item must be >= 1 (every item appears once), got {interactions_per_item}")
    if min_length < 3:
        raise ValueError(f"min_length must be >= 3 (a training, a validation and a test target), got {min_length}")
    if mean_length <= min_length:
        raise ValueError(f"mean_length must be > min_length ({min_length}), got {mean_length}")
    if popularity_exponent < 0:
        raise ValueError(f"popularity_exponent must be >= 0, got {popularity_exponent}")
    if not 1 <= num_categories <= num_items:
        raise ValueError(f"num_categories must be in [1, num_items], got {num_categories}")
    if feature_dim < 1:
        raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
    rng = np.random.default_rng(seed)
    n_target = int(round(num_items * interactions_per_item))

    # Sequence lengths: min_length + geometric tail, users added until the target is reached.
    p = 1.0 / (mean_length - min_length + 1.0)
    n_users_guess = int(n_target / mean_length * 1.2) + 16
    lengths = min_length - 1 + rng.geometric(p, size=n_users_guess).astype(np.int64)
    total = np.cumsum(lengths)
    n_users = int(np.searchsorted(total, n_target)) + 1
    if n_users > n_users_guess:  # the guess is 20% over the mean: reaching here means a tiny world
        n_users = n_users_guess
    lengths = lengths[:n_users]
    n = int(lengths.sum())

    # Items: each item once (the whole catalogue is used), the rest from a Zipf law over a
    # random order of the items, then the positions shuffled together.
    rank_weight = np.arange(1, num_items + 1, dtype=np.float64) ** -popularity_exponent
    cdf = np.cumsum(rank_weight)
    cdf /= cdf[-1]
    order = rng.permutation(num_items) + 1  # order[r] = item id of popularity rank r
    drawn = order[np.minimum(np.searchsorted(cdf, rng.random(max(n - num_items, 0))), num_items - 1)]
    items = np.concatenate([rng.permutation(num_items) + 1, drawn])[:n]
    rng.shuffle(items)

    # Timestamps: per user a start, then cumulative log-uniform gaps (strictly increasing).
    user = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    lo, hi = np.log(GAP_RANGE_S[0]), np.log(GAP_RANGE_S[1])
    gaps = np.exp(rng.uniform(lo, hi, size=n)).astype(np.int64)
    offsets = np.cumsum(lengths) - lengths
    gaps[offsets] = START_SECONDS + rng.integers(0, START_SPAN_S, size=n_users)  # a user's first "gap" is its start
    running = np.cumsum(gaps)
    base = np.repeat(running[offsets] - gaps[offsets], lengths)  # what the cumsum carried from earlier users
    timestamps = running - base
    del gaps, running, base
    interactions = pd.DataFrame({"user": user, "item": items.astype(np.int64), "timestamp": timestamps})
    del user, items, timestamps

    # Items table: one category each (categories is a list per item as the schema says; the
    # lists are shared per category, read-only by contract, so 10^6 items cost no 10^6 lists).
    names = [f"c{j:02d}" for j in range(num_categories)]
    item_category = rng.integers(0, num_categories, size=num_items)
    shared = [[name] for name in names]
    tokens = np.char.add("i", np.arange(1, num_items + 1).astype(str))
    items_table = pd.DataFrame({"item": np.arange(1, num_items + 1, dtype=np.int64), "token": tokens,
                                "text": tokens, "categories": [shared[c] for c in item_category]})
    categories = np.zeros((num_items + 1, num_categories), np.float32)
    categories[np.arange(1, num_items + 1), item_category] = 1.0

    modalities = {}
    for name in ("text", "image"):
        prototypes = rng.standard_normal((num_categories, feature_dim), dtype=np.float32)
        features = np.empty((num_items + 1, feature_dim), np.float32)
        features[0] = 0.0
        features[1:] = rng.standard_normal((num_items, feature_dim), dtype=np.float32)
        features[1:] *= 0.5
        features[1:] += prototypes[item_category]
        available = np.ones(num_items + 1, bool)
        available[0] = False
        modalities[name] = ModalityFeatures(features, available, {
            "encoder": "synthetic", "dim": feature_dim, "synthetic": True,
            "made": "category prototype N(0,1) + item noise N(0, 0.5^2)", "available_items": num_items})

    params = {"num_items": num_items, "interactions_per_item": interactions_per_item, "mean_length": mean_length,
              "min_length": min_length, "popularity_exponent": popularity_exponent,
              "num_categories": num_categories, "feature_dim": feature_dim, "seed": seed}
    return Dataset(name=f"scale-{num_items}", interactions=interactions, items=items_table,
                   user_tokens=np.char.add("u", np.arange(n_users).astype(str)),
                   category_names=names, categories=categories, modalities=modalities,
                   preprocessing={"generator": "benchmarks.scale_world.make_scale_world", **params,
                                  "tie_break": "none needed: timestamps strictly increase per user"},
                   source={"reader": "benchmarks.scale_world", "synthetic": True, **params},
                   stats=compute_stats(interactions, num_items))
