"""Typed, frozen configuration for every stage of the workbench.

Every field has a default (the paper's where the paper has one) and a one-line
reason; invalid values raise ``ValueError`` at construction naming the allowed range.
Configs are saved in every manifest, checkpoint and result record via ``to_dict``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


class _Config:
    """Shared helpers: dict round trip and ``key=value`` overrides with type checks."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                v = values[f.name]
                if isinstance(v, list):
                    v = tuple(v)
                kwargs[f.name] = v
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def parse_value(cls, key: str, text: str) -> Any:
        """Parse the string ``text`` for field ``key`` into the field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise ValueError(f"unknown {cls.__name__} key {key!r}; known: {sorted(fields)}")
        default = getattr(cls(), key)
        try:
            if isinstance(default, bool):
                low = text.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            if isinstance(default, int):
                return int(text)
            if isinstance(default, float):
                return float(text)
            if isinstance(default, tuple):
                parts = [p for p in text.split(",") if p.strip()]
                inner = type(default[0]) if default else str
                return tuple(inner(p.strip()) for p in parts)
            if default is None:
                low = text.strip().lower()
                if low in ("none", "null", ""):
                    return None
                try:
                    return float(text)
                except ValueError:
                    return text
            return text
        except ValueError:
            raise ValueError(
                f"{cls.__name__}.{key}: cannot read {text!r} as {type(default).__name__}"
            ) from None


DEDUP_CHOICES = ("none", "exact", "first")
TRAIN_MODES = ("dense", "prefix")


@dataclass(frozen=True)
class PreprocessConfig(_Config):
    """How raw interactions become a dataset (paper: RecBole 1.2 defaults)."""

    dedup: str = "exact"  # "none" | "exact" (drop identical user,item,timestamp rows) | "first" (keep a user's first interaction with an item)
    user_core: int = 5  # iterative k-core on users (paper: 5)
    item_core: int = 5  # iterative k-core on items (paper: 5)
    max_length: int = 50  # T: sequences are left-truncated to the last T items (paper: 50)

    def __post_init__(self) -> None:
        _check(self.dedup in DEDUP_CHOICES,
               f"dedup must be 'none', 'exact' or 'first', got {self.dedup!r}")
        _check(self.user_core >= 0, f"user_core must be >= 0, got {self.user_core}")
        _check(self.item_core >= 0, f"item_core must be >= 0, got {self.item_core}")
        _check(2 <= self.max_length <= 1024, f"max_length must be in [2, 1024], got {self.max_length}")


@dataclass(frozen=True)
class SplitConfig(_Config):
    """How a dataset is split into training, validation and test examples."""

    kind: str = "leave_one_out"  # "leave_one_out" (paper) | "temporal" (one global cut-off)
    valid_quantile: float = 0.8  # temporal: validation cut-off at this quantile of interaction times
    test_quantile: float = 0.9  # temporal: test cut-off at this quantile of interaction times
    max_length: int = 50  # T of the built tensors (paper: 50)

    def __post_init__(self) -> None:
        _check(self.kind in ("leave_one_out", "temporal"),
               f"split kind must be 'leave_one_out' or 'temporal', got {self.kind!r}")
        _check(0.0 < self.valid_quantile < self.test_quantile < 1.0,
               f"need 0 < valid_quantile < test_quantile < 1, got {self.valid_quantile}, {self.test_quantile}")
        _check(2 <= self.max_length <= 1024, f"max_length must be in [2, 1024], got {self.max_length}")


@dataclass(frozen=True)
class ReleasedCode(_Config):
    """Switches that reproduce the authors' released code (docs/model.md, section 4, and the
    released behaviours found on a later read). Each default is this project's choice; the
    other value is the released code's, kept so a notebook or an ablation can show what the
    difference does. ``ModelConfig.released`` holds one; :meth:`reference` is the set of the
    four defects the ``reference`` preset reproduces."""

    train_temporal_experts: bool = True  # False = released code (experts in a plain list: frozen random)
    normalise_time: bool = True  # absolute time in days since the dataset's first interaction; False = raw seconds (released code)
    mask_same_target: bool = True  # drop same-target pairs from contrastive denominators; False = released code (logit 0)
    reference_init: bool = False  # True = released code: modules built after the init pass keep PyTorch defaults
    category_columns: int = 0  # width of the category target; 0 = the dataset's count, more = zero-padded (released code: 192 whatever the data)
    feature_width: int = 0  # 0 = each modality's own width; > 0 = every feature table fitted to it (released code: 768): zero-padded, or cut to its leading singular directions
    gap_buckets: str = "separate"  # "separate": padding and first item get interval buckets of their own; "released": both share the zero-gap bucket, as the released code
    interactive_gate_bias: str = "zero"  # Interactive-MoE gate biases at init: "zero" | "uniform" (nn.Linear's default U(-1/sqrt(d), 1/sqrt(d)), as the released code's gates)
    timestamps: str = "exact"  # how the model reads time: "exact" integer seconds | "float32" (rounded as RecBole stores them: 64 s steps at ml-100k's 1997-98 seconds, 128 s at today's) | "minmax" (scaled to [0, 1] over the data set: RecBole's normalize_all; needs normalise_time=false)
    padding_row: str = "zero"  # ID padding row: "zero" (kept at zero, never a candidate) | "trained" (initialised like the others, trained, and a column of the training softmax: released code)

    def __post_init__(self) -> None:
        for f in ("train_temporal_experts", "normalise_time", "mask_same_target", "reference_init"):
            _check(isinstance(getattr(self, f), bool), f"{f} must be true or false, got {getattr(self, f)!r}")
        _check(self.category_columns >= 0, f"category_columns must be >= 0, got {self.category_columns}")
        _check(self.feature_width >= 0, f"feature_width must be >= 0, got {self.feature_width}")
        _check(self.gap_buckets in ("separate", "released"),
               f"gap_buckets must be 'separate' or 'released', got {self.gap_buckets!r}")
        _check(self.interactive_gate_bias in ("zero", "uniform"),
               f"interactive_gate_bias must be 'zero' or 'uniform', got {self.interactive_gate_bias!r}")
        _check(self.timestamps in ("exact", "float32", "minmax"),
               f"timestamps must be 'exact', 'float32' or 'minmax', got {self.timestamps!r}")
        _check(not (self.timestamps == "minmax" and self.normalise_time),
               "timestamps='minmax' scales time to [0, 1] as RecBole's normalize_all does; it needs "
               "normalise_time=false (days since the first interaction of a [0, 1] clock mean nothing)")
        _check(self.padding_row in ("zero", "trained"),
               f"padding_row must be 'zero' or 'trained', got {self.padding_row!r}")

    @classmethod
    def reference(cls, **changes) -> "ReleasedCode":
        """The released code's behaviour for the four defects that keep a switch (rows 1, 2, 5
        and 9 of docs/model.md's table); the released behaviours found later stay as ours."""
        return cls(**{**dict(train_temporal_experts=False, normalise_time=False, mask_same_target=False,
                             reference_init=True), **changes})


RELEASED_FIELDS = tuple(f.name for f in dataclasses.fields(ReleasedCode))
LOSS_NAMES = ("rec", "id_contrastive", "category", "placeholder_contrastive")


@dataclass(frozen=True)
class ModelConfig(_Config):
    """HM4SR hyper-parameters (paper's Games configuration) and ablation switches.

    ``ModelConfig.sasrec()`` and ``ModelConfig.reference()`` give the two presets.
    """

    name: str = "hm4sr"  # label only: "hm4sr", "sasrec", "reference", an ablation's name
    hidden_size: int = 64  # d
    max_length: int = 50  # T, size of the position table
    num_experts: int = 4  # E, experts per MoE level
    num_layers: int = 2  # Transformer layers per stream
    num_heads: int = 2  # attention heads
    inner_size: int = 256  # feed-forward width
    hidden_dropout: float = 0.5  # dropout on embeddings and sub-layer outputs (paper: 0.5)
    attention_dropout: float = 0.5  # dropout on attention probabilities (paper: 0.5)
    layer_norm_eps: float = 1e-12  # as RecBole
    interval_scale: float = 100.0  # s in bucket = floor(s * log2(gap_seconds + 1))
    modalities: tuple = ()  # feature modalities to use; () = every modality the dataset has
    use_interactive_moe: bool = True  # first level: experts mix the modalities of each item
    use_temporal_moe: bool = True  # second level: time-gated gains on every stream
    lambda_init: tuple = (0.0, 1.0, 1.0)  # Interactive-MoE output scale per stream (id, then modalities; the last value repeats)
    w_rec: float = 1.0  # weight of the next-item cross-entropy
    w_id_contrastive: float = 1.0  # weight of IDCL (0 = off)
    w_category: float = 1.0  # weight of category prediction (0 = off)
    w_placeholder_contrastive: float = 1.0  # weight of PCL (0 = off)
    id_contrastive_temperature: float = 0.2  # IDCL temperature
    placeholder_temperature: float = 1.0  # PCL temperature
    placeholder_ratio: float = 0.3  # share of positions replaced by time placeholders in PCL
    placeholder_min_length: int = 4  # sequences shorter than this get no placeholders (paper: n <= 3 -> none)
    initializer_range: float = 0.02  # std of the normal init of weights
    dense_auxiliary: str = "every_position"  # dense mode: auxiliary losses at "every_position" (each position an example, as each prefix in prefix mode) or the "last_position" of each window
    rec_loss: str = "full"  # next-item loss: "full" softmax over the catalogue (paper) | "sampled" softmax with logQ correction (large catalogues: a step's item side grows with batch + num_negatives, not with N)
    num_negatives: int = 1024  # sampled: K negatives drawn per step with replacement, shared by every example of the batch
    negative_proposal: str = "uniform"  # sampled: Q, "uniform" over items 1..N | "popularity" (training counts, smoothed by popularity_exponent)
    popularity_exponent: float = 0.75  # popularity proposal: Q(i) proportional to (count_i + 1) ** this (1 = raw counts + 1, 0 = uniform); +1 keeps unseen items drawable
    feature_transform: str = "none"  # feature tables before use: "none" (as given, released code) | "centre" (mean over items removed) | "standardise" (centred, every column to unit variance) | "pca" (centred, rotated onto its principal axes, nothing dropped) | "l2" (every item's row to unit length); statistics over the items that have the modality
    feature_transform_modalities: tuple = ()  # modalities feature_transform applies to; () = every modality
    released: ReleasedCode = ReleasedCode()  # the released code's behaviours, each a switch (defaults: this project's fixes)

    def __post_init__(self) -> None:
        _check(self.hidden_size >= 2 and self.hidden_size % 2 == 0, f"hidden_size must be even >= 2, got {self.hidden_size}")
        _check(self.hidden_size % self.num_heads == 0, f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        _check(1 <= self.max_length <= 1024, f"max_length must be in [1, 1024], got {self.max_length}")
        _check(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        _check(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        _check(self.inner_size >= 1, f"inner_size must be >= 1, got {self.inner_size}")
        for f in ("hidden_dropout", "attention_dropout"):
            v = getattr(self, f)
            _check(0.0 <= v < 1.0, f"{f} must be in [0, 1), got {v}")
        _check(self.interval_scale > 0, f"interval_scale must be > 0, got {self.interval_scale}")
        _check(len(self.lambda_init) >= 1, "lambda_init needs at least one value")
        for f in ("w_rec", "w_id_contrastive", "w_category", "w_placeholder_contrastive"):
            _check(getattr(self, f) >= 0, f"{f} must be >= 0, got {getattr(self, f)}")
        _check(self.w_rec > 0, "w_rec must be > 0: the model is trained for next-item prediction")
        for f in ("id_contrastive_temperature", "placeholder_temperature"):
            _check(getattr(self, f) > 0, f"{f} must be > 0, got {getattr(self, f)}")
        _check(0.0 <= self.placeholder_ratio < 1.0, f"placeholder_ratio must be in [0, 1), got {self.placeholder_ratio}")
        _check(self.initializer_range > 0, f"initializer_range must be > 0, got {self.initializer_range}")
        _check(self.dense_auxiliary in ("every_position", "last_position"),
               f"dense_auxiliary must be 'every_position' or 'last_position', got {self.dense_auxiliary!r}")
        _check(self.rec_loss in ("full", "sampled"), f"rec_loss must be 'full' or 'sampled', got {self.rec_loss!r}")
        _check(self.num_negatives >= 1, f"num_negatives must be >= 1, got {self.num_negatives}")
        _check(self.negative_proposal in ("uniform", "popularity"),
               f"negative_proposal must be 'uniform' or 'popularity', got {self.negative_proposal!r}")
        _check(0.0 <= self.popularity_exponent <= 1.0,
               f"popularity_exponent must be in [0, 1], got {self.popularity_exponent}")
        _check(self.feature_transform in ("none", "centre", "standardise", "pca", "l2"),
               f"feature_transform must be 'none', 'centre', 'standardise', 'pca' or 'l2', got {self.feature_transform!r}")
        _check(not self.feature_transform_modalities or self.feature_transform != "none",
               f"feature_transform_modalities={self.feature_transform_modalities} needs a feature_transform "
               f"('centre', 'standardise', 'pca' or 'l2'), got 'none'")
        _check(isinstance(self.released, ReleasedCode),
               f"released must be a ReleasedCode, got {type(self.released).__name__} (ModelConfig.from_dict reads "
               f"a dict, flat or nested)")
        _check(not (self.released.padding_row == "trained" and self.rec_loss == "sampled"),
               "padding_row='trained' keeps the padding column in the full softmax; the sampled "
               "softmax never draws padding (use rec_loss=full)")

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"rec": self.w_rec, "id_contrastive": self.w_id_contrastive,
                "category": self.w_category, "placeholder_contrastive": self.w_placeholder_contrastive}

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """Every name ``--set``, :meth:`replace` and :meth:`from_dict` accept: the fields, with
        the released-code switches by their own (flat) names instead of ``released``."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "released") + RELEASED_FIELDS

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """The config of a saved dict: nested (``{"released": {...}}``, as :meth:`to_dict`
        writes) or flat (checkpoints and results written before the switches were grouped
        kept them beside the other fields); both at once only for different switches."""
        values = dict(values)
        flat = {k: values.pop(k) for k in RELEASED_FIELDS if k in values}
        nested = values.pop("released", None)
        if isinstance(nested, ReleasedCode):
            nested = nested.to_dict()
        if nested is not None and not isinstance(nested, dict):
            raise ValueError(f"ModelConfig: 'released' must be a mapping of {', '.join(RELEASED_FIELDS)}, "
                             f"got {nested!r}")
        twice = sorted(set(flat) & set(nested or {}))
        if twice:
            raise ValueError(f"ModelConfig: {twice} given both at the top level and under 'released'")
        values["released"] = ReleasedCode.from_dict({**(nested or {}), **flat})
        return super().from_dict(values)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes``; a released-code switch may be named flat
        (``replace(normalise_time=False)``) or given as ``released=ReleasedCode(...)``."""
        flat = {k: changes.pop(k) for k in RELEASED_FIELDS if k in changes}
        if flat:
            changes["released"] = dataclasses.replace(changes.get("released", self.released), **flat)
        return dataclasses.replace(self, **changes)

    @classmethod
    def parse_value(cls, key: str, text: str) -> Any:
        """:meth:`_Config.parse_value`, a released-code switch by its flat name included."""
        if key in RELEASED_FIELDS:
            return ReleasedCode.parse_value(key, text)
        if key == "released":
            raise ValueError("ModelConfig.released: set its switches by name (e.g. normalise_time=false), "
                             f"one of {', '.join(RELEASED_FIELDS)}")
        return super().parse_value(key, text)

    @classmethod
    def hm4sr(cls, **changes) -> "ModelConfig":
        """This project's defaults with ``changes`` (released-code switches by their flat names too)."""
        return cls().replace(**changes)

    @classmethod
    def sasrec(cls, **changes) -> "ModelConfig":
        """SASRec with full cross-entropy: the ID stream alone, no MoE, no time, no auxiliary task."""
        return cls(name="sasrec", modalities=("none",), use_interactive_moe=False, use_temporal_moe=False,
                   w_id_contrastive=0.0, w_category=0.0, w_placeholder_contrastive=0.0).replace(**changes)

    @classmethod
    def reference(cls, **changes) -> "ModelConfig":
        """The authors' released behaviour for the defects that keep a switch (docs/model.md, section 4)."""
        return cls(name="reference", released=ReleasedCode.reference()).replace(**changes)


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Optimisation and evaluation settings (paper: Adam 1e-3, batch 1024, patience 10 on NDCG@20)."""

    mode: str = "dense"  # "dense" (one window per user, loss at every position) | "prefix" (paper: one example per prefix)
    epochs: int = 100  # upper bound; early stopping usually ends sooner
    batch_size: int = 1024  # prefix mode: prefix examples per step (paper: 1024)
    dense_batch_size: int = 32  # dense mode: windows per step; 32 windows ~ 1,300 positions ~ the paper's 1,024 examples
    eval_batch_size: int = 2048  # users per evaluation batch
    lr: float = 1e-3  # Adam learning rate (the peak when a schedule is set)
    lr_schedule: str = "constant"  # "constant" | "cosine": after the warm-up, lr decays as a half cosine to 0 at the end of lr_decay_epochs, where training ends
    warmup_epochs: float = 0.0  # linear warm-up of the learning rate from lr / (warm-up steps) to lr over this many epochs (0 = none)
    lr_decay_epochs: int = 0  # cosine schedule's length in epochs, counted from the start (0 = epochs); training stops at its end
    weight_decay: float = 0.0  # Adam L2 (paper: 0)
    grad_clip: float = 0.0  # max gradient norm, 0 = no clipping (paper: none)
    patience: int = 10  # epochs without validation improvement before stopping
    valid_metric: str = "ndcg@20"  # model selection metric (validation only)
    eval_every: int = 1  # epochs between validation runs
    seed: int = 2025  # seeds torch, numpy and the batch order
    split: str = "leave_one_out"  # "leave_one_out" | "temporal"
    tie_policy: str = "expected"  # rank ties: "expected" (random tie-break) | "pessimistic" | "optimistic"
    mask_history: bool = False  # exclude each user's training items from the ranking (off, as the paper's code)
    eval_time: str = "real"  # timestamps at evaluation: "real" | "shuffled" (within each sequence) | "zeroed"
    threads: int = 0  # torch CPU threads, 0 = leave torch's default
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    amp: bool = False  # bf16 autocast of training steps (CUDA, or a CPU with bf16 units: AVX-512 BF16 / AMX); parameters, optimiser and evaluation stay float32
    bucket_by_length: bool = True  # batches of similar lengths (less padding work); False = uniformly random batches as the released code
    log_every: int = 1  # steps between history rows
    max_steps_per_epoch: int = 0  # 0 = full epochs; > 0 caps steps (smoke runs, benchmarks)
    recompute: bool = False  # keep only each encoder layer's input and recompute the rest in the backward: same results, less memory, slower (docs/performance.md)
    micro_batches: int = 1  # prefix mode: run the encoders on this many parts of each batch (the losses still see the whole batch: gradient caching); less memory, one more forward (docs/performance.md)

    def __post_init__(self) -> None:
        _check(self.mode in TRAIN_MODES, f"mode must be 'dense' or 'prefix', got {self.mode!r}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.dense_batch_size >= 1, f"dense_batch_size must be >= 1, got {self.dense_batch_size}")
        _check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.lr_decay_epochs >= 0, f"lr_decay_epochs must be >= 0, got {self.lr_decay_epochs}")
        _check(self.lr_schedule == "cosine" or self.lr_decay_epochs == 0,
               f"lr_decay_epochs={self.lr_decay_epochs} needs lr_schedule 'cosine'")
        horizon = min(self.lr_decay_epochs or self.epochs, self.epochs) if self.lr_schedule == "cosine" else self.epochs
        _check(self.warmup_epochs < horizon,
               f"warmup_epochs={self.warmup_epochs} must be shorter than the run ({horizon} epochs"
               f"{', the cosine schedule' if self.lr_schedule == 'cosine' else ''}): the rate would never reach lr")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        _check(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        kind, _, k = self.valid_metric.partition("@")
        _check(kind in ("ndcg", "hr", "mrr") and k.isdigit() and int(k) in (5, 10, 20, 50),
               f"valid_metric must be ndcg|hr|mrr @ 5|10|20|50, got {self.valid_metric!r}")
        _check(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        _check(self.split in ("leave_one_out", "temporal"), f"split must be 'leave_one_out' or 'temporal', got {self.split!r}")
        _check(self.tie_policy in ("expected", "pessimistic", "optimistic"),
               f"tie_policy must be expected|pessimistic|optimistic, got {self.tie_policy!r}")
        _check(self.eval_time in ("real", "shuffled", "zeroed"), f"eval_time must be real|shuffled|zeroed, got {self.eval_time!r}")
        _check(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        _check(self.device == "cpu" or self.device.startswith("cuda"), f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        _check(self.max_steps_per_epoch >= 0, f"max_steps_per_epoch must be >= 0, got {self.max_steps_per_epoch}")
        _check(self.micro_batches >= 1, f"micro_batches must be >= 1, got {self.micro_batches}")
        _check(self.micro_batches == 1 or self.mode == "prefix",
               f"micro_batches > 1 needs mode 'prefix' (dense batches are small already), got mode {self.mode!r}")

    def check_distributed(self, world: int) -> None:
        """For data-parallel training in ``world`` processes (DDP ranks): refuse
        ``micro_batches > 1``, which splits one process's batch, while each rank already holds
        1/world of it. The one check the CLI makes before it starts processes and
        :func:`hm4sr_core.train.train` makes in each rank."""
        _check(self.micro_batches == 1,
               f"micro_batches > 1 is for one process: with {world} ranks each already holds 1/{world} of a "
               f"batch (set micro_batches=1, got {self.micro_batches})")
