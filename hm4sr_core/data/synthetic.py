"""A planted synthetic world: sequences whose structure is known by construction.

Real data never says *why* a user picked an item, so nothing can confirm that a gate
"looks at time" for the right reason. This module generates a small data set in which
every effect the HM4SR model is built to exploit (paper Sections 3.2-3.4: the
Interactive MoE over ID / text / image, the Temporal MoE over gap and date, and the
category prediction task) is planted on purpose, and records what was planted so a
notebook or a test can compare what a model learned with the truth.

The world, in plain words (for a teacher)
-----------------------------------------
* There are ``n_categories`` categories ("Action", "Puzzle", ...) arranged on a ring,
  and ``n_items`` items, each in exactly one category.
* Every user is, at any moment, *interested in one category*. After a short pause
  (a minute to a day) the next item is usually from the same category (the user's
  personal "stay" probability, 0.70-0.90); otherwise the interest drifts to a
  neighbouring category on the ring, mostly forwards. So the *order* of the sequence
  carries information: the last items predict the next one.
* Sometimes (``long_gap_share`` of the pauses) the user is away for a long time, more
  than ``long_gap_days`` days. The return itself picks up where the user left off (one
  more item of the old interest); the *next* item jumps: its category is set by the
  calendar month of the return (a fixed "seasonal" table: every January means one
  category, every February another, ...) with probability ``regime_follow_prob``,
  otherwise it is a random category. So when the last item a model sees is a return,
  its gap *and* its date tell the next category; a model without time cannot know.
  (``return_lag=0`` puts the jump on the return itself: then the telling gap lies
  between the last input and the target, which HM4SR, like SASRec, never sees.)
* Inside a category some items are much more popular than others (a Zipf law), so a
  popularity prior helps, but it never tells which category comes next.
* Each item has a "text" vector: its category's prototype + an item-specific part +
  a little noise. So text knows the category.
* Each item has an "image" vector. Its first part is built like the text (another
  prototype per category + item part + noise); the rest is pure noise, drawn
  independently of everything else with the same spread, so only a model that learns
  to ignore those dimensions benefits from the image.
* A user's first category is uniformly random; an item may be picked again later
  (the same user can return to a favourite).

What this buys (seeds 2025-2027, defaults, count tables fitted on half the
transitions, scored on the other half): predicting the next category from the previous
one alone is right 67% of the time overall but 8-11% for the item after a return (24% of
transitions); knowing the return's gap and month lifts that to 89-92% for the item after a
return and 86-87% overall. A time-blind model even told where the returns are reaches 28-31%.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the
same interactions, features and truth; another seed gives another world.

Usage::

    raw = make_synthetic_world(seed=2025)
    truth = planted_truth(raw)                    # SyntheticTruth
    cats = planted_category_of(raw, raw.items["item"])  # (N,) int64 category index
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from hm4sr_core.data.schema import DataError, RawDataset, RawModality
from hm4sr_core.data.timeunits import SECONDS_PER_DAY

# Timestamps count seconds from here (2020-01-01T00:00:00Z), so dates are readable.
EPOCH_SECONDS = 1_577_836_800
# Users start at a uniformly random moment in these first two years, so every
# calendar month is visited and a month cannot be guessed from the position alone.
START_SPAN_DAYS = 730
# Short gaps are log-uniform in [1 minute, 1 day]: "minutes to hours".
SHORT_GAP_MIN_S = 60
SHORT_GAP_MAX_S = SECONDS_PER_DAY
# A long gap is long_gap_days * (1 + Exp(mean LONG_GAP_EXTRA)): always above the
# threshold, typically 1-2 threshold lengths, so a return lands in a later month.
LONG_GAP_EXTRA = 0.5
# Per-user probability of staying in the current category after a short gap.
STAY_PROB_RANGE = (0.70, 0.90)
# When interest drifts, how often it moves to the next category on the ring
# (rather than the previous one): a direction a sequence model can learn.
DRIFT_FORWARD_SHARE = 0.75
# Feature scales (standard deviations): prototypes dominate so features are
# category-informative; the item part makes items within a category distinct.
TEXT_PROTOTYPE_STD, TEXT_ITEM_STD, TEXT_NOISE_STD = 1.0, 0.5, 0.2
IMAGE_PROTOTYPE_STD, IMAGE_ITEM_STD, IMAGE_NOISE_STD = 1.0, 0.6, 0.2

_CATEGORY_NAMES = (
    "Action", "Puzzle", "Racing", "Sports", "Strategy", "Horror",
    "Music", "Family", "Arcade", "Simulation", "Adventure", "Shooter",
)


@dataclass
class SyntheticTruth:
    """What was planted. Only plain lists / ints / floats / strings / bools, so that
    ``to_dict()`` is JSON-serialisable and survives into manifests.

    Per-interaction lists are aligned with the rows of the ``RawDataset.interactions``
    frame that :func:`make_synthetic_world` returned (users in order u0, u1, ...,
    each user's rows oldest first); preprocessing may reorder rows, so join on
    (user, item, timestamp) rather than on position after that.
    """

    seed: int
    params: dict  # every argument of make_synthetic_world
    epoch_seconds: int  # timestamps are seconds; users start at or after this
    category_names: list  # (C,) str
    item_tokens: list  # (N,) str, "i<j>"
    item_category: list  # (N,) int: the one true category of each item
    item_popularity: list  # (N,) float: probability of the item within its category
    category_drift: list  # (C, C) float: where interest goes when it leaves a category (rows sum to 1, zero diagonal)
    users: list  # (U,) dict: user, start_timestamp, start_category, length, stay_prob
    regime_rule: dict  # the long-gap rule; see make_synthetic_world
    interaction_category: list  # (n,) int: the category the user was in (= item's category)
    interaction_after_long_gap: list  # (n,) bool: the gap before this row exceeded the threshold
    interaction_followed_rule: list  # (n,) bool: a post-return jump that used the seasonal table
    zero_gap_share: float  # share of within-user gaps that are 0 s (0.0: timestamps strictly increase)
    text: dict  # how the text vectors were made
    image: dict  # how the image vectors were made, including signal_dims and noise_dims
    interaction_jumped: list | None = None  # (n,) bool: the row where a return's jump landed (return_lag rows after it)

    def to_dict(self) -> dict:
        # Shallow on purpose: the fields are already plain JSON values, and
        # dataclasses.asdict's deep copy of ~30k list entries costs most of the runtime.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "SyntheticTruth":
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(values))
        if missing:
            raise DataError(f"planted synthetic truth: missing field(s) {missing}")
        return cls(**{k: values[k] for k in names})


def make_synthetic_world(
    seed: int = 2025,
    *,
    n_users: int = 300,
    n_items: int = 200,
    n_categories: int = 8,
    mean_length: int = 30,
    text_dim: int = 32,
    image_dim: int = 48,
    image_noise_share: float = 0.5,
    long_gap_days: float = 30.0,
    long_gap_share: float = 0.25,
    regime_follow_prob: float = 0.9,
    zipf_exponent: float = 0.8,
    return_lag: int = 1,
    name: str = "synthetic",
) -> RawDataset:
    """Generate the planted world described in this module's docstring.

    Args:
        seed: the only source of randomness (``numpy.random.default_rng(seed)``).
        n_users: U, users "u0".."u{U-1}".
        n_items: N, items "i0".."i{N-1}"; at least ``n_categories``.
        n_categories: C, at least 2.
        mean_length: mean interactions per user; lengths are 5 + Poisson(mean_length - 5),
            so every user has at least 5.
        text_dim: width of the text vectors.
        image_dim: width of the image vectors.
        image_noise_share: share of image dims (the *last* ones) that are pure noise.
        long_gap_days: a gap longer than this many days is "long" and triggers the
            regime change.
        long_gap_share: probability that a gap is long (share of transitions after a break).
        regime_follow_prob: probability that the jump ``return_lag`` interactions after a
            return goes to the category the seasonal table gives for the month of the return
            (else uniform over categories).
        zipf_exponent: within-category popularity ~ rank^-zipf_exponent.
        return_lag: how many interactions after a return the interest jumps. 1 (default):
            the user first picks one more item of the interest they left with, so the
            jump follows an input whose gap and date a model sees. 0: the jump lands on
            the return itself, whose gap lies between the last input and the target, so
            a model that reads only input timestamps (HM4SR, SASRec) cannot use it.
        name: the dataset's name.

    Returns:
        A RawDataset: ``interactions`` (n rows: user str, item str, timestamp int64 s),
        ``items`` (N rows: item, text, categories = [category name]), modalities
        ``text`` (N, text_dim) and ``image`` (N, image_dim) float32 with precomputed
        features, and ``source`` = {"reader": "synthetic", "seed", "params", "planted"}
        where "planted" is ``SyntheticTruth.to_dict()``.
    """
    params = dict(
        n_users=n_users, n_items=n_items, n_categories=n_categories,
        mean_length=mean_length, text_dim=text_dim, image_dim=image_dim,
        image_noise_share=image_noise_share, long_gap_days=long_gap_days,
        long_gap_share=long_gap_share, regime_follow_prob=regime_follow_prob,
        zipf_exponent=zipf_exponent, return_lag=return_lag, name=name,
    )
    _check_params(seed, params)
    rng = np.random.default_rng(seed)
    C = n_categories

    # --- items: balanced categories, shuffled so the item index says nothing ---
    item_category = rng.permutation(np.arange(n_items) % C)
    items_of = [np.flatnonzero(item_category == c) for c in range(C)]
    item_popularity = np.zeros(n_items)
    for c in range(C):
        # A random popularity rank inside the category, so popularity is not the index.
        ranks = rng.permutation(len(items_of[c])) + 1
        weights = ranks.astype(float) ** -zipf_exponent
        item_popularity[items_of[c]] = weights / weights.sum()
    pop_cum = [np.cumsum(item_popularity[items_of[c]]) for c in range(C)]

    # --- interest dynamics ---
    drift = np.zeros((C, C))
    for c in range(C):
        drift[c, (c + 1) % C] += DRIFT_FORWARD_SHARE
        drift[c, (c - 1) % C] += 1.0 - DRIFT_FORWARD_SHARE
    month_category = _seasonal_table(rng, C)
    threshold_s = long_gap_days * SECONDS_PER_DAY
    short_max_s = min(SHORT_GAP_MAX_S, threshold_s / 4)

    lengths = 5 + rng.poisson(mean_length - 5, size=n_users)
    starts = EPOCH_SECONDS + rng.integers(0, START_SPAN_DAYS * SECONDS_PER_DAY, size=n_users)
    stay_probs = rng.uniform(*STAY_PROB_RANGE, size=n_users)
    start_categories = rng.integers(0, C, size=n_users)

    total = int(lengths.sum())
    # All per-step randomness drawn at once (fixed order -> reproducible, and fast).
    is_long = rng.random(total) < long_gap_share
    short_gaps = np.exp(rng.uniform(math.log(SHORT_GAP_MIN_S), math.log(short_max_s), total))
    long_gaps = threshold_s * (1.0 + rng.exponential(LONG_GAP_EXTRA, total))
    u_follow = rng.random(total)
    random_jump = rng.integers(0, C, size=total)
    u_category = rng.random(total)
    u_item = rng.random(total)

    row_user = np.repeat(np.arange(n_users), lengths)
    first = np.zeros(total, dtype=bool)
    first[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    # The gap drawn at a user's first row is unused: the first row sits at the start time.
    is_long &= ~first
    gaps = np.where(is_long, long_gaps, short_gaps)
    gaps = np.maximum(np.rint(gaps), 1).astype(np.int64)  # >= 1 s: strictly increasing
    gaps[first] = 0
    timestamps = np.cumsum(gaps)
    # Restart the running sum at each user's start time.
    offsets = starts - timestamps[first]
    timestamps = timestamps + np.repeat(offsets, lengths)
    rule_category = month_category[utc_month(timestamps)]

    # The row whose category jumps: ``return_lag`` rows after each return (a row whose
    # gap was long), within the same user; the rule reads the month of the return.
    jump_from = np.full(total, -1, dtype=np.int64)
    returns = np.flatnonzero(is_long)
    landing = returns + return_lag
    same_user = landing < total
    same_user[same_user] = row_user[landing[same_user]] == row_user[returns[same_user]]
    jump_from[landing[same_user]] = returns[same_user]
    category = np.empty(total, dtype=np.int64)
    followed = np.zeros(total, dtype=bool)
    stay_cum = {}
    for r in range(total):
        u = row_user[r]
        if first[r]:
            c = int(start_categories[u])
        elif jump_from[r] >= 0:
            if u_follow[r] < regime_follow_prob:
                c = int(rule_category[jump_from[r]])
                followed[r] = True
            else:
                c = int(random_jump[r])
        elif is_long[r]:
            pass  # back from a break: one more item of the interest they left with
        else:
            cum = stay_cum.get(u)
            if cum is None:
                row = (1.0 - stay_probs[u]) * drift
                row[np.arange(C), np.arange(C)] = stay_probs[u]
                cum = stay_cum[u] = np.cumsum(row, axis=1)
            c = min(int(np.searchsorted(cum[c], u_category[r], side="right")), C - 1)
        category[r] = c
    item_index = np.empty(total, dtype=np.int64)
    for c in range(C):
        rows = np.flatnonzero(category == c)
        pick = np.minimum(np.searchsorted(pop_cum[c], u_item[rows], side="right"), len(items_of[c]) - 1)
        item_index[rows] = items_of[c][pick]

    # --- features ---
    text, text_info = _category_features(rng, item_category, C, text_dim, TEXT_PROTOTYPE_STD, TEXT_ITEM_STD, TEXT_NOISE_STD)
    n_signal = image_dim - int(round(image_noise_share * image_dim))
    image_signal, image_info = _category_features(
        rng, item_category, C, n_signal, IMAGE_PROTOTYPE_STD, IMAGE_ITEM_STD, IMAGE_NOISE_STD
    )
    # Noise dims get the same marginal spread as signal dims, so variance alone does
    # not reveal them: a model has to learn that they are irrelevant.
    noise_std = math.sqrt(IMAGE_PROTOTYPE_STD**2 + IMAGE_ITEM_STD**2 + IMAGE_NOISE_STD**2)
    image_noise = rng.normal(0.0, noise_std, size=(n_items, image_dim - n_signal))
    image = np.concatenate([image_signal, image_noise], axis=1).astype(np.float32)
    signal_dims = list(range(n_signal))
    noise_dims = list(range(n_signal, image_dim))
    image_info.update(signal_dims=signal_dims, noise_dims=noise_dims, noise_std=noise_std)

    # --- tables ---
    category_names = _category_names(C)
    item_tokens = np.array([f"i{j}" for j in range(n_items)], dtype=object)
    rank_in_category = np.empty(n_items, dtype=np.int64)
    for c in range(C):
        rank_in_category[items_of[c]] = np.arange(len(items_of[c]))
    items = pd.DataFrame({
        "item": item_tokens,
        "text": [
            f"Category {item_category[j]} item {rank_in_category[j]}: {category_names[item_category[j]]}"
            for j in range(n_items)
        ],
        "categories": [[category_names[item_category[j]]] for j in range(n_items)],
    })
    user_tokens = np.array([f"u{u}" for u in range(n_users)], dtype=object)
    interactions = pd.DataFrame({
        "user": user_tokens[row_user],
        "item": item_tokens[item_index],
        "timestamp": timestamps.astype(np.int64),
    })

    truth = SyntheticTruth(
        seed=int(seed),
        params=params,
        epoch_seconds=EPOCH_SECONDS,
        category_names=category_names,
        item_tokens=item_tokens.tolist(),
        item_category=item_category.tolist(),
        item_popularity=item_popularity.tolist(),
        category_drift=drift.tolist(),
        users=[
            {
                "user": user_tokens[u],
                "start_timestamp": int(starts[u]),
                "start_category": int(start_categories[u]),
                "length": int(lengths[u]),
                "stay_prob": float(stay_probs[u]),
            }
            for u in range(n_users)
        ],
        regime_rule={
            "kind": "seasonal",
            "description": (
                "a return is an interaction whose gap exceeds threshold_seconds; it keeps the "
                "user's category, and return_lag interactions later the category becomes "
                "month_category[UTC calendar month of the return, 0 = January] with "
                "probability follow_prob, else a uniformly random category; otherwise the "
                "category stays with the user's stay_prob or drifts along category_drift"
            ),
            "return_lag": int(return_lag),
            "threshold_seconds": float(threshold_s),
            "month_category": month_category.tolist(),
            "follow_prob": float(regime_follow_prob),
            "long_gap_share": float(long_gap_share),
            "long_gap_seconds": f"threshold_seconds * (1 + Exponential(mean {LONG_GAP_EXTRA}))",
            "short_gap_seconds": [float(SHORT_GAP_MIN_S), float(short_max_s)],
            "short_gap_distribution": "log-uniform",
            "drift_forward_share": DRIFT_FORWARD_SHARE,
            "stay_prob_range": list(STAY_PROB_RANGE),
        },
        interaction_category=category.tolist(),
        interaction_after_long_gap=is_long.tolist(),
        interaction_followed_rule=followed.tolist(),
        interaction_jumped=(jump_from >= 0).tolist(),
        zero_gap_share=0.0,
        text=text_info,
        image=image_info,
    )

    modalities = [
        RawModality(
            name="text",
            provenance={
                "encoder": "synthetic",
                "synthetic": True,
                "dimension": text_dim,
                "contents": "category prototype + item-specific component + noise (no real text was encoded)",
                **text_info,
            },
            features=text.astype(np.float32),
            feature_items=item_tokens.copy(),
        ),
        RawModality(
            name="image",
            provenance={
                "encoder": "synthetic",
                "synthetic": True,
                "dimension": image_dim,
                "contents": (
                    "dims signal_dims: category prototype + item-specific component + noise; "
                    "dims noise_dims: independent Gaussian noise (no real image was encoded)"
                ),
                **image_info,
            },
            features=image,
            feature_items=item_tokens.copy(),
        ),
    ]
    return RawDataset(
        name=name,
        source={
            "reader": "synthetic",
            "seed": int(seed),
            "params": dict(params),
            "planted": truth.to_dict(),
        },
        interactions=interactions,
        items=items,
        modalities=modalities,
        interactions_file=f"<synthetic seed={seed}>",
    )


def utc_month(timestamps) -> np.ndarray:
    """Calendar month (0 = January .. 11 = December, UTC) of int64 second timestamps.

    Args:
        timestamps: (n,) seconds since 1970-01-01 UTC.
    Returns:
        (n,) int64.
    """
    months = np.asarray(timestamps, dtype=np.int64).astype("datetime64[s]").astype("datetime64[M]")
    return months.astype(np.int64) % 12


def planted_truth(world) -> SyntheticTruth:
    """The :class:`SyntheticTruth` of a synthetic world.

    Args:
        world: a RawDataset or Dataset whose ``source`` came from make_synthetic_world,
            or that ``source`` dict itself.
    """
    source = world if isinstance(world, dict) else getattr(world, "source", None)
    if not isinstance(source, dict) or "planted" not in source:
        raise DataError(
            "planted truth: expected a dataset (or its source dict) made by "
            "make_synthetic_world, with source['planted']; got none"
        )
    return SyntheticTruth.from_dict(source["planted"])


def planted_category_of(world, item_tokens) -> np.ndarray:
    """The planted category index of each item token, e.g. to compare gates with the truth.

    Args:
        world: as for :func:`planted_truth`.
        item_tokens: (n,) item tokens ("i<j>"), e.g. ``Dataset.items["token"]``.
    Returns:
        (n,) int64 category indices into ``truth.category_names``.
    """
    truth = planted_truth(world)
    lookup = dict(zip(truth.item_tokens, truth.item_category))
    tokens = [str(t) for t in np.asarray(item_tokens, dtype=object).ravel()]
    unknown = [t for t in tokens if t not in lookup]
    if unknown:
        raise DataError(
            f"planted category: item token(s) {unknown[:5]} are not items of this synthetic "
            f"world (expected 'i0'..'i{len(truth.item_tokens) - 1}')"
        )
    return np.array([lookup[t] for t in tokens], dtype=np.int64)


def seasonal_category(world, timestamps) -> np.ndarray:
    """The category the regime rule points to for a return at each timestamp.

    Args:
        world: as for :func:`planted_truth`.
        timestamps: (n,) int64 seconds.
    Returns:
        (n,) int64 category indices.
    """
    truth = planted_truth(world)
    table = np.asarray(truth.regime_rule["month_category"], dtype=np.int64)
    return table[utc_month(timestamps)]


def _check_params(seed, p: dict) -> None:
    """Raise ValueError naming the parameter and its allowed range."""
    checks = [
        (isinstance(seed, (int, np.integer)) and seed >= 0, f"seed must be an int >= 0, got {seed!r}"),
        (p["n_users"] >= 1, f"n_users must be >= 1, got {p['n_users']}"),
        (p["n_categories"] >= 2, f"n_categories must be >= 2, got {p['n_categories']}"),
        (
            p["n_items"] >= p["n_categories"],
            f"n_items must be >= n_categories ({p['n_categories']}), got {p['n_items']}",
        ),
        (p["mean_length"] >= 5, f"mean_length must be >= 5, got {p['mean_length']}"),
        (p["text_dim"] >= 1, f"text_dim must be >= 1, got {p['text_dim']}"),
        (p["image_dim"] >= 1, f"image_dim must be >= 1, got {p['image_dim']}"),
        (
            0.0 <= p["image_noise_share"] < 1.0
            and p["image_dim"] - int(round(p["image_noise_share"] * p["image_dim"])) >= 1,
            f"image_noise_share must be in [0, 1) and leave >= 1 signal dim, got {p['image_noise_share']}",
        ),
        (p["long_gap_days"] > 0, f"long_gap_days must be > 0, got {p['long_gap_days']}"),
        (0.0 <= p["long_gap_share"] <= 1.0, f"long_gap_share must be in [0, 1], got {p['long_gap_share']}"),
        (
            0.0 <= p["regime_follow_prob"] <= 1.0,
            f"regime_follow_prob must be in [0, 1], got {p['regime_follow_prob']}",
        ),
        (p["zipf_exponent"] >= 0, f"zipf_exponent must be >= 0, got {p['zipf_exponent']}"),
        (isinstance(p["return_lag"], (int, np.integer)) and p["return_lag"] >= 0,
         f"return_lag must be an int >= 0, got {p['return_lag']!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"make_synthetic_world: {message}")


def _seasonal_table(rng: np.random.Generator, C: int) -> np.ndarray:
    """(12,) month -> category, as balanced as 12 months allow.

    Every category is some month's choice when C <= 12, and no category gets more
    months than another by more than one, so no category starves of interactions.
    """
    months = []
    while len(months) < 12:
        months.extend(rng.permutation(C)[: 12 - len(months)].tolist())
    return rng.permutation(np.asarray(months, dtype=np.int64))


def _category_features(rng, item_category, C, dim, proto_std, item_std, noise_std):
    """(N, dim) = prototype[category] + item part + noise; and a description of it."""
    prototypes = rng.normal(0.0, proto_std, size=(C, dim))
    item_part = rng.normal(0.0, item_std, size=(len(item_category), dim))
    noise = rng.normal(0.0, noise_std, size=(len(item_category), dim))
    info = {
        "prototype_std": proto_std,
        "item_std": item_std,
        "noise_std_within": noise_std,
        # Expected share of each signal dim's variance explained by the category.
        "category_variance_share": proto_std**2 / (proto_std**2 + item_std**2 + noise_std**2),
    }
    return prototypes[item_category] + item_part + noise, info


def _category_names(C: int) -> list:
    if C <= len(_CATEGORY_NAMES):
        return list(_CATEGORY_NAMES[:C])
    return [f"Genre {c}" for c in range(C)]
