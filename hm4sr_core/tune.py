"""Hyper-parameter search on validation only (``hm4sr tune``), with Optuna.

What a search does, in order:

1. **Study.** An Optuna study in an RDB storage: by default ``DIR/study.db`` (SQLite,
   embedded, nothing to start); ``--storage postgresql://...`` lets worker processes on
   several machines join one study. The study records the model, the data hash, the
   search space and the training settings it was created with; a later command that
   differs in any of them is refused (a study mixing spaces or data would be meaningless).
2. **Search.** A seeded TPE sampler proposes a configuration; the trial trains it with
   :func:`hm4sr_core.train.train` on a split whose test part is *sealed*
   (:class:`SealedPart`: every read of it raises :class:`TestSplitRead`), with
   ``test=False``, so nothing about the test targets can reach the search. After every
   epoch the trial reports its best validation NDCG@20 so far; the pruner stops trials
   that are behind (see :data:`PRUNER_NOTE`). The objective is the validation NDCG@20 of
   the trial's best epoch.
3. **Budget.** ``--trials N`` counts finished trials (completed or pruned) of the whole
   study, over every worker and every restart; a worker starts no trial once N are finished.
4. **Crash recovery.** Each trial records its worker (host, pid, process start time) and
   Optuna's heartbeat. A tune killed with ``kill -9`` continues with the same command:
   finished trials are kept, and a trial left RUNNING by a dead process of this host is
   marked FAIL at once (one on another host after the heartbeat's grace period). A failed
   trial is never the best one and never trained for the final runs.
5. **Final.** The best trial's configuration is written to ``DIR/best_config.yaml``
   (``hm4sr train --config`` reads it), trained with each of ``--final-seeds`` into
   ``DIR/<model>_tuned/seed-<S>/`` (run folders ``hm4sr compare`` reads) and scored on the
   test split once per seed; ``DIR/trials.csv`` and ``DIR/tune.json`` summarise the study.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import provenance
from .config import RELEASED_FIELDS, ModelConfig, SplitConfig, TrainConfig
from .data.splits import Split, SplitPart, build_split
from .data.store import load_dataset, read_manifest, write_json_atomic, write_text_atomic
from .experiments import (EXTRA_TABLE_MODELS, TABLE_MODELS, _cores, _finished, _worker_init,
                          table_model_config)
from .train import train

TUNE_EXTRA = 'pip install "hm4sr-workbench[tune]"'
OBJECTIVE = "ndcg@20"  # validation metric the search maximises (and the pruner watches)
DEFAULT_EPOCHS = 20  # epoch cap of every trial and of the final runs
DEFAULT_WARMUP = 3  # epochs before the pruner may stop a trial (successive halving's first rung)
DEFAULT_STARTUP = 5  # median pruner only: trials that must finish before it prunes any
HALVING_FACTOR = 3  # successive halving keeps the best third at each rung (epochs 3, 9, 27, ...)
PRUNERS = ("halving", "median", "none")
PRUNER_NOTE = (
    "Successive halving (Optuna's SuccessiveHalvingPruner, asynchronous) on the best validation NDCG@20 so far: "
    "rungs at the warm-up epoch (default 3) and every third multiple of it (9, 27, ...); a trial reaching a rung "
    "goes on only if its value is in the best third of the trials that reached that rung before it. Chosen "
    "over the median rule because the median rule, judging every epoch against the median, still let most "
    "trials run to a 15-epoch cap on ml-100k, where every curve is still rising: replayed on the unpruned "
    "SASRec study's own curves (python -m benchmarks.pruner_replay), the median rule (warm-up 4) trains 1.45x "
    "fewer epochs, halving from epoch 3 2.22x, and the best value it keeps (0.0963) is within seed noise of the "
    "best of all (0.0969). Hyperband's brackets are not used: with 30 trials each bracket holds a handful. "
    "--pruner median keeps the median rule (with --startup-trials), --pruner none trains every trial to the cap.")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ValueError(f"hm4sr tune needs Optuna: {TUNE_EXTRA}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ----------------------------------------------------------------------------- search spaces

# A range per key: {"low", "high", "log"} (int when the field is an int) or {"choices": [...]}.
# Keys are ModelConfig or TrainConfig fields. Each default range has its reason beside it
# (docs/guide.md, "Tuning", repeats them).
_SHARED: dict[str, dict] = {
    "lr": {"low": 3e-4, "high": 5e-3, "log": True,
           "reason": "Adam around the paper's 1e-3; on ml-100k 2e-3 and 3e-3 led 1e-3 at every epoch to 14 "
                     "(docs/performance.md), so the range reaches 5e-3; log scale: the effect is multiplicative"},
    "hidden_dropout": {"low": 0.1, "high": 0.6,
                       "reason": "the paper's 0.5 was set for sparse Amazon data; dense ml-100k may want less; "
                                 "above 0.6 the 64-wide layers lose most of their signal"},
    "attention_dropout": {"low": 0.1, "high": 0.6, "reason": "as hidden_dropout (paper: 0.5)"},
}
_HM4SR: dict[str, dict] = {
    **_SHARED,
    "w_id_contrastive": {"low": 0.0, "high": 1.0,
                         "reason": "from off (the no_id_contrastive ablation) to the paper's 1; w_rec stays 1 as "
                                   "the scale the other weights are measured against"},
    "w_category": {"low": 0.0, "high": 1.0, "reason": "from off (no_category) to the paper's 1"},
    "w_placeholder_contrastive": {"low": 0.0, "high": 1.0,
                                  "reason": "from off (no_placeholder_contrastive) to the paper's 1; the auxiliary "
                                            "losses slowed dense training on ml-100k (docs/results.md), so the "
                                            "search may turn them down"},
    "id_contrastive_temperature": {"low": 0.05, "high": 1.0, "log": True,
                                   "reason": "InfoNCE temperatures in use span 0.05-1 (paper: 0.2); log scale"},
    "placeholder_temperature": {"low": 0.1, "high": 2.0, "log": True,
                                "reason": "around the paper's 1.0, a decade down and a factor 2 up; log scale"},
    "num_experts": {"low": 2, "high": 8,
                    "reason": "experts per MoE level (paper: 4); 1 is no mixture, more than 8 outnumbers what "
                              "3 modalities and the time signals can route"},
    "placeholder_ratio": {"low": 0.1, "high": 0.5,
                          "reason": "share of positions replaced by time placeholders (paper: 0.3); above half the "
                                    "sequence is mostly placeholders"},
}
_SASREC: dict[str, dict] = dict(_SHARED)
# Keys an ablation fixes (it switches the part off): its space leaves them out.
_ABLATION_FIXES = {
    "no_interactive_moe": (),
    "no_temporal_moe": (),
    "no_id_contrastive": ("w_id_contrastive", "id_contrastive_temperature"),
    "no_category": ("w_category",),
    "no_placeholder_contrastive": ("w_placeholder_contrastive", "placeholder_temperature", "placeholder_ratio"),
    "id_only": (),
}


def default_space(model: str) -> dict[str, dict]:
    """The default search space of a model of the results table (hm4sr, sasrec,
    reference, an ablation or an extra row): key -> range, each with its ``reason``."""
    if model == "sasrec":
        return validate_space(_SASREC, "default space of sasrec")
    if model not in TABLE_MODELS and model not in EXTRA_TABLE_MODELS:
        raise ValueError(f"--model {model!r}: unknown; known: {', '.join([*TABLE_MODELS, *EXTRA_TABLE_MODELS])}")
    fixed = _ABLATION_FIXES.get(model, ())
    return validate_space({k: v for k, v in _HM4SR.items() if k not in fixed}, f"default space of {model}")


_RANGE_KEYS = {"low", "high", "log", "step", "reason"}


def validate_space(space: Any, source: str = "space") -> dict[str, dict]:
    """Check a search space; returns it normalised ({"low", "high", "log"[, "step"]} or
    {"choices"}). Raises ValueError naming ``source`` and the key for an unknown key, a
    range that is empty or reversed, a log range not above 0, or bounds the config refuses."""
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{source}: expected a mapping of KEY: {{low: .., high: ..}} with at least one key")
    model_fields = set(ModelConfig.setting_names())  # the released-code switches by their flat names
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, dict] = {}
    for key, spec in space.items():
        where = f"{source}: {key}"
        if key == "name" or (key not in model_fields and key not in train_fields):
            raise ValueError(f"{where}: unknown key; expected a ModelConfig or TrainConfig field "
                             f"(e.g. lr, hidden_dropout, num_experts, w_category)")
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
        default = getattr(ModelConfig().released if key in RELEASED_FIELDS else
                          ModelConfig() if key in model_fields else TrainConfig(), key)
        if "choices" in spec:
            extra = sorted(set(spec) - {"choices", "reason"})
            if extra:
                raise ValueError(f"{where}: unknown field(s) {extra} beside 'choices'")
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: choices must be a non-empty list")
            if len(set(map(repr, choices))) != len(choices):
                raise ValueError(f"{where}: choices repeat a value: {choices}")
            norm = {"choices": list(choices)}
            bounds = choices
        else:
            extra = sorted(set(spec) - _RANGE_KEYS)
            if extra:
                raise ValueError(f"{where}: unknown field(s) {extra}; a range has low, high and optionally "
                                 f"log, step")
            if "low" not in spec or "high" not in spec:
                raise ValueError(f"{where}: a range needs both low and high")
            low, high = spec["low"], spec["high"]
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                raise ValueError(f"{where}: {type(default).__name__} field; give choices: [..] instead of a range")
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
            if not numeric or (isinstance(default, int) and not all(isinstance(v, int) for v in (low, high))):
                kind = "integers" if isinstance(default, int) else "numbers"
                raise ValueError(f"{where}: low and high must be {kind}, got {low!r}, {high!r}")
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"{where}: low and high must be finite, got {low}, {high}")
            if low > high:
                raise ValueError(f"{where}: reversed range: low {low} > high {high}")
            if low == high:
                raise ValueError(f"{where}: empty range: low = high = {low} (fix the value with --set instead)")
            log = bool(spec.get("log", False))
            if not isinstance(spec.get("log", False), bool):
                raise ValueError(f"{where}: log must be true or false, got {spec['log']!r}")
            if log and low <= 0:
                raise ValueError(f"{where}: a log range needs low > 0, got {low}")
            norm = {"low": int(low) if isinstance(default, int) else float(low),
                    "high": int(high) if isinstance(default, int) else float(high), "log": log}
            if "step" in spec:
                step = spec["step"]
                if log or not isinstance(step, (int, float)) or step <= 0 or step > high - low:
                    raise ValueError(f"{where}: step must be > 0, at most high - low, and not with log; got {step!r}")
                norm["step"] = step
            bounds = [low, high]
        for value in bounds:  # the configs' own checks, at both ends of the range
            try:
                if key in model_fields:
                    ModelConfig.hm4sr(**{key: value})
                else:
                    TrainConfig(**{key: value})
            except (ValueError, TypeError) as error:
                raise ValueError(f"{where}: {value!r} is refused by the configuration: {error}") from None
        if "reason" in spec:
            norm["reason"] = str(spec["reason"])
        out[key] = norm
    return out


def read_space(path: str | Path) -> dict[str, dict]:
    """A YAML (or JSON) search-space file, validated (:func:`validate_space`)."""
    import yaml
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise FileNotFoundError(f"--space {path}: {error.strerror}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"--space {path}: not valid YAML: {str(error).splitlines()[0]}") from None
    return validate_space(loaded, f"--space {path}")


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    """One value per key of a validated space, drawn by the trial's sampler."""
    params = {}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec["log"],
                                            step=int(spec.get("step", 1)))
        else:
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"],
                                              step=spec.get("step"))
    return params


def apply_params(model_config: ModelConfig, train_config: TrainConfig,
                 params: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """The two configs with a trial's parameters set (model fields first, as ``--set``)."""
    model_names = set(ModelConfig.setting_names())
    model_over = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k in model_names}
    train_over = {k: v for k, v in params.items() if k not in model_names}
    return model_config.replace(**model_over), train_config.replace(**train_over)


# ----------------------------------------------------------------------------- the sealed test part


class TestSplitRead(RuntimeError):
    """Raised when anything reads the test part of a search's split."""

    __test__ = False  # not a pytest class


class SealedPart:
    """Stands in for a split's test part during a search: every read raises
    :class:`TestSplitRead`, except ``users`` (which users have a test example: the
    ranking's history needs the user count, not the targets) and ``len``."""

    def __init__(self, users: np.ndarray):
        object.__setattr__(self, "_users", np.asarray(users, np.int64))

    @property
    def users(self) -> np.ndarray:
        return self._users

    def __len__(self) -> int:
        return len(self._users)

    def __getattr__(self, name: str):
        raise TestSplitRead(f"the test split was read during a search (attribute {name!r}); a search may read "
                            f"training and validation examples only")

    def __setattr__(self, name, value):
        raise TestSplitRead(f"the test split is sealed during a search (setting {name!r})")

    def digest(self, h) -> None:
        raise TestSplitRead("the test split was read during a search (hashing it)")


def sealed_split(dataset, max_length: int, kind: str = "leave_one_out"):
    """The dataset's split with its test part replaced by a :class:`SealedPart`."""
    split = build_split(dataset, SplitConfig(kind=kind, max_length=max_length))
    test = split._parts["test"]
    if isinstance(test, SplitPart):
        users = test.users
    else:  # a recipe: users from the row ends, without building (or reading) items or targets
        ends, _ = test.windows(0, len(test))
        users = test.users[ends]
    parts = {k: split._parts[k] for k in ("train_prefix", "train_dense", "valid")}
    return Split(split.kind, parts["train_prefix"], parts["train_dense"], parts["valid"], SealedPart(users),
                 split.cutoffs, split.max_length)


# ----------------------------------------------------------------------------- settings


@dataclass
class TuneSettings:
    """Everything a search needs; the identity part (:meth:`identity`) must match a study resumed."""

    data: str
    model: str
    trials: int
    out: Path
    space: dict[str, dict]
    train: TrainConfig
    study: str = ""
    storage: str = ""
    jobs: int = 1
    seed: int = 2025
    timeout: float | None = None
    pruner: str = "halving"  # one of PRUNERS
    warmup: int = DEFAULT_WARMUP
    startup: int = DEFAULT_STARTUP
    final_seeds: tuple = (2025, 2026, 2027)
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {self.trials}")
        if self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {self.jobs}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.warmup < 0 or self.startup < 0:
            raise ValueError(f"--warmup-epochs and --startup-trials must be >= 0, got {self.warmup}, {self.startup}")
        if self.pruner == "halving" and self.warmup < 1:
            raise ValueError(f"--warmup-epochs must be >= 1 with --pruner halving (it is the first rung: the "
                             f"epoch at which trials are first compared), got {self.warmup}")
        if self.train.valid_metric != OBJECTIVE:
            raise ValueError(f"valid_metric={self.train.valid_metric!r}: the search maximises validation "
                             f"{OBJECTIVE} (leave valid_metric at its default)")
        if not self.study:
            self.study = f"{self.model}-{Path(self.data).name}"
        if not self.storage:
            self.storage = f"sqlite:///{(self.out / 'study.db').resolve()}"

    def base_model(self) -> ModelConfig:
        return table_model_config(self.model).replace(**self.model_overrides)

    def identity(self, data_hash: str) -> dict:
        """What a study is: resumed only with all of it equal."""
        plain = lambda cfg: json.loads(json.dumps(cfg.to_dict()))  # noqa: E731 - tuples as lists
        train = {k: v for k, v in plain(self.train).items() if k not in ("threads", "device", "eval_batch_size")}
        space = {k: {kk: vv for kk, vv in v.items() if kk != "reason"} for k, v in self.space.items()}
        return {"model": self.model, "data_hash": data_hash, "space": space, "train": train,
                "model_config": plain(self.base_model()), "pruner": self.pruner, "warmup": self.warmup,
                "startup": self.startup, "objective": f"valid {OBJECTIVE}"}


# ----------------------------------------------------------------------------- storage and recovery


def open_storage(url: str, *, heartbeat: bool = True):
    """Optuna's RDB storage for ``url`` (sqlite:///..., postgresql://..., mysql://...),
    with a heartbeat so trials of dead workers on other hosts are failed after a grace period."""
    optuna = _optuna()
    kwargs: dict = {"heartbeat_interval": 30, "grace_period": 120} if heartbeat else {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers wait on each other's writes
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except ImportError as error:  # a driver missing (psycopg2 for postgresql://)
            raise ValueError(f"--storage {_redact(url)}: the database driver is missing ({error}); "
                             f"{TUNE_EXTRA}") from None
        except Exception as error:  # noqa: BLE001 - sqlalchemy's errors: one line naming the storage
            # Workers started together on a new database race to create Optuna's tables: the
            # loser sees a duplicate key; the tables exist when it tries again.
            text = str(error)
            if attempt < 4 and ("duplicate key" in text or "already exists" in text or "locked" in text):
                time.sleep(0.5 + attempt + (os.getpid() % 10) / 10)
                continue
            raise ValueError(f"--storage: cannot open {_redact(url)}: {text.splitlines()[0]}") from None
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    """The storage URL with any password left out."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, cred = head.partition("://")
    user, colon, _ = cred.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{tail}"


def _process_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot ('' when unknown): with the pid,
    it tells a live worker from a new process that reused a dead worker's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


def worker_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def _alive(worker: str) -> bool | None:
    """Whether a worker of this host still runs (None: another host's, unknown here)."""
    host, _, rest = worker.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or _process_start(pid) == start


UNCLAIMED_S = 30.0  # a live worker names itself on its new trial within milliseconds


def fail_dead_trials(study, *, report: bool = True) -> list[int]:
    """Mark FAIL every RUNNING trial whose worker is dead: one whose worker process on this
    host is gone (killed), and one no worker ever claimed (its process died between
    creating the trial and naming itself on it) once it is ``UNCLAIMED_S`` old. Trials of
    other hosts' workers are left to the heartbeat. Returns the numbers of the trials failed."""
    optuna = _optuna()
    failed = []
    now = datetime.datetime.now()  # Optuna stamps datetime_start with the local naive time
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        if worker:
            if _alive(worker) is not False:
                continue
            reason = f"its worker {worker} died (killed) while it ran"
        else:
            if t.datetime_start is None or (now - t.datetime_start).total_seconds() < UNCLAIMED_S:
                continue
            reason = f"no worker claimed it within {UNCLAIMED_S:g} s of its start: its process died before it began"
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except RuntimeError:  # it finished meanwhile
            continue
        failed.append(t.number)
    if failed and report:
        print(f"[tune] trial(s) {', '.join(map(str, failed))} of a killed run marked failed (never reported)",
              flush=True)
    return failed


def wait_for_running(study, poll: float = 2.0) -> None:
    """Wait until no trial of the study runs: other workers' last trials decide the best.
    Trials of dead workers are failed meanwhile (this host's at once, others' after the
    heartbeat's grace period), so the wait ends."""
    optuna = _optuna()
    said = False
    while True:
        fail_dead_trials(study)
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:
            return
        if not said:
            print(f"[tune] waiting for {len(running)} running trial(s) of other workers "
                  f"({', '.join(str(t.number) for t in running)})", flush=True)
            said = True
        time.sleep(poll)


def finished(study) -> int:
    optuna = _optuna()
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED)))


def make_pruner(settings: TuneSettings):
    optuna = _optuna()
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    if settings.pruner == "halving":
        # Rungs at warm-up x 3^k epochs; no bootstrap: the first trial at a rung goes on.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings.warmup,
                                                      reduction_factor=HALVING_FACTOR, min_early_stopping_rate=0)
    return optuna.pruners.MedianPruner(n_startup_trials=settings.startup, n_warmup_steps=settings.warmup,
                                       interval_steps=1)


def _nested_model_config(identity: dict) -> dict:
    """A study's saved identity with its model_config read as ModelConfig.from_dict reads it:
    a study created before the released-code switches were grouped (ModelConfig.released)
    saved them at the top level, and resumes all the same."""
    try:
        config = ModelConfig.from_dict(identity.get("model_config") or {})
    except (TypeError, ValueError):
        return identity
    return dict(identity, model_config=json.loads(json.dumps(config.to_dict())))


def open_study(settings: TuneSettings, data_hash: str, *, worker: int = 0):
    """Create or load the study; refuse one created with other settings. The TPE sampler
    is seeded with (seed, worker, trials already in the study), so a resumed or added
    worker draws new configurations instead of repeating the first ones."""
    optuna = _optuna()
    storage = open_storage(settings.storage)
    identity = settings.identity(data_hash)
    study = optuna.create_study(study_name=settings.study, storage=storage, direction="maximize",
                                load_if_exists=True, pruner=make_pruner(settings))
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
        study.set_user_attr("created_by", f"hm4sr tune --data {settings.data} --model {settings.model}")
    elif _nested_model_config(saved) != identity:
        saved = _nested_model_config(saved)
        diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        raise ValueError(f"study {settings.study!r} in {_redact(settings.storage)} was created with other "
                         f"{', '.join(diff)}; resume it with the same options, or pass --study NAME for a new one")
    n = len(study.get_trials(deepcopy=False))
    seed = (settings.seed * 1_000_003 + worker * 7919 + n) % (2**31)
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(settings.trials // 3, 1)),
                                               constant_liar=True)
    return study


# ----------------------------------------------------------------------------- the search


def _objective(settings: TuneSettings, dataset, split, on_trial=None):
    optuna = _optuna()
    base_model = settings.base_model()

    def objective(trial) -> float:
        trial.set_user_attr("worker", worker_id())
        params = suggest(trial, settings.space)
        model_cfg, train_cfg = apply_params(base_model, settings.train, params)
        best = -math.inf

        def on_epoch(row: dict) -> None:
            nonlocal best
            value = row.get(f"valid_{OBJECTIVE}")
            if value is None:
                return
            best = max(best, float(value))
            trial.report(best, int(row["epoch"]))
            trial.set_user_attr("epochs", int(row["epoch"]))
            if int(row["epoch"]) < train_cfg.epochs and trial.should_prune():  # at the cap it has run anyway
                raise optuna.TrialPruned(f"pruned after epoch {row['epoch']} (best {best:.4f})")

        t0 = time.perf_counter()
        try:
            result = train(dataset, model_cfg, train_cfg, split=split, test=False, progress=False, on_epoch=on_epoch)
        finally:
            trial.set_user_attr("train_seconds", time.perf_counter() - t0)
        trial.set_user_attr("best_epoch", int(result.best_epoch))
        return float(result.valid.metrics[OBJECTIVE])

    return objective


def search(settings: TuneSettings, *, worker: int = 0, dataset=None) -> None:
    """One worker's part of the search: trials until the study holds ``settings.trials``
    finished ones (or ``settings.timeout`` seconds have passed)."""
    optuna = _optuna()

    manifest = read_manifest(settings.data)
    dataset = dataset if dataset is not None else load_dataset(settings.data)
    if settings.train.threads:
        torch.set_num_threads(settings.train.threads)
    study = open_study(settings, manifest["data_hash"], worker=worker)
    fail_dead_trials(study)
    split = sealed_split(dataset, settings.base_model().max_length, settings.train.split)
    bar = None
    if settings.progress and settings.jobs == 1:
        bar = tqdm(total=settings.trials, initial=min(finished(study), settings.trials), desc="trials", unit="trial")
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout

    def after(study, trial) -> None:
        state = trial.state.name.lower()
        value = "" if trial.value is None else f" value {trial.value:.4f}"
        epochs = trial.user_attrs.get("epochs", 0)
        msg = (f"[tune] trial {trial.number} {state} after {epochs} epoch(s){value}; "
               f"{finished(study)}/{settings.trials} finished")
        if bar is not None:
            bar.update(1 if trial.state.is_finished() and state != "fail" else 0)
            bar.write(msg)
        else:
            print(msg, flush=True)
        if worker == 0:
            write_trials_table(study, settings.out / "trials.csv")
        if finished(study) >= settings.trials:
            study.stop()

    objective = _objective(settings, dataset, split)
    try:
        while finished(study) < settings.trials:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                print(f"[tune] --timeout {settings.timeout:g} s reached: no new trial started", flush=True)
                break
            # one trial per call: the budget is checked against the whole study before each trial
            study.optimize(objective, n_trials=1, callbacks=[after], catch=(), gc_after_trial=True)
    finally:
        if bar is not None:
            bar.close()


def _search_worker(settings: TuneSettings, worker: int) -> None:
    """Entry of a ``--jobs`` worker process (spawned)."""
    _worker_init(os.getppid())
    search(settings, worker=worker)


def run_search(settings: TuneSettings) -> None:
    """The search with ``settings.jobs`` worker processes on the one study (one: in this process)."""
    settings.out.mkdir(parents=True, exist_ok=True)
    if settings.jobs == 1:
        search(settings)
        return

    threads = settings.train.threads or max(1, _cores() // settings.jobs)
    worker_settings = dataclasses.replace(settings, train=settings.train.replace(threads=threads), progress=False)
    # open (create) the study once before the workers race to create it
    open_study(worker_settings, read_manifest(settings.data)["data_hash"])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_search_worker, args=(worker_settings, w), name=f"tune-worker-{w}")
             for w in range(settings.jobs)]
    print(f"[tune] {settings.jobs} worker processes, {threads} torch thread(s) each", flush=True)
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"tune worker(s) {', '.join(failed)} failed (see their messages above)")


# ----------------------------------------------------------------------------- outputs


def write_trials_table(study, path: Path) -> Path:
    """One row per trial: number, state, validation value, epochs run, seconds, the
    parameters, and why a trial failed. Written atomically."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else np.nan
        row = {"number": t.number, "state": t.state.name, f"valid_{OBJECTIVE}": t.value,
               "epochs": t.user_attrs.get("epochs", len(t.intermediate_values)),
               "best_epoch": t.user_attrs.get("best_epoch"), "seconds": seconds,
               "worker": t.user_attrs.get("worker", ""), "fail_reason": t.user_attrs.get("fail_reason", "")}
        row.update({f"param_{k}": v for k, v in t.params.items()})
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, pd.DataFrame(rows).to_csv(index=False))
    return path


def best_trial(study):
    """The completed trial with the highest validation value (failed and pruned ones never)."""
    optuna = _optuna()
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise ValueError(f"study {study.study_name!r}: no completed trial yet (all pruned or failed); "
                         f"run more trials")
    return max(done, key=lambda t: (t.value, -t.number))


def write_config(path: Path, model_config: ModelConfig, train_config: TrainConfig, header: str = "") -> Path:
    """A configuration file ``hm4sr train --config`` reads (YAML: model and train fields)."""
    import yaml

    payload = {"model": json.loads(json.dumps(model_config.to_dict())),
               "train": json.loads(json.dumps(train_config.to_dict()))}
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(payload, sort_keys=False)
    write_text_atomic(path, text)
    return path


def read_config(path: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """A configuration file: ``{model: {...}, train: {...}}`` in YAML or JSON (the
    ``config`` of a results.json too). Unknown or bad fields raise ValueError naming the file."""
    import yaml
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as error:
        raise FileNotFoundError(f"--config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if isinstance(loaded, dict) and "config" in loaded and "model" not in loaded:
        loaded = loaded["config"]  # a results.json
    if not isinstance(loaded, dict) or set(loaded) - {"model", "train"} or "model" not in loaded:
        raise ValueError(f"--config {path}: expected a mapping with 'model' (and optionally 'train'), got "
                         f"{sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__}")
    try:
        return ModelConfig.from_dict(loaded["model"] or {}), TrainConfig.from_dict(loaded.get("train") or {})
    except (ValueError, TypeError) as error:
        raise ValueError(f"--config {path}: {error}") from None


def final_runs(settings: TuneSettings, study) -> dict:
    """Train the best configuration with each final seed into ``out/<model>_tuned/seed-S``
    (finished seeds kept, unfinished resumed) and score test once per seed."""
    trial = best_trial(study)
    model_cfg, train_cfg = apply_params(settings.base_model(), settings.train, trial.params)
    header = (f"hm4sr tune: best of study {settings.study!r} ({finished(study)} finished trials), trial "
              f"{trial.number}, validation {OBJECTIVE} {trial.value:.4f}\n"
              f"hm4sr train --data {settings.data} --config THIS_FILE --seeds "
              f"{','.join(map(str, settings.final_seeds)) or '2025'} --out DIR")
    write_config(settings.out / "best_config.yaml", model_cfg, train_cfg, header)
    manifest = read_manifest(settings.data)
    runs = settings.out / f"{settings.model}_tuned"
    dataset = None
    for seed in settings.final_seeds:
        folder = runs / f"seed-{seed}"
        cfg = train_cfg.replace(seed=seed)
        if _finished(folder, manifest["data_hash"], model_cfg, cfg):
            continue
        dataset = dataset if dataset is not None else load_dataset(settings.data)
        resume = (folder / "last.pt").exists() and not (folder / "results.json").exists()
        print(f"[tune] final run seed {seed} -> {folder}", flush=True)
        result = train(dataset, model_cfg, cfg, out_dir=folder, data_hash=manifest["data_hash"], resume=resume,
                       progress=settings.progress)
        m = result.test.metrics
        print(f"[tune] seed {seed}: best epoch {result.best_epoch}, test ndcg@10 {m['ndcg@10']:.4f} "
              f"ndcg@20 {m['ndcg@20']:.4f} hr@20 {m['hr@20']:.4f}", flush=True)
    return {"trial": trial.number, "value": trial.value, "params": trial.params, "runs": str(runs)}


def default_runs(settings: TuneSettings) -> Path:
    """The untuned configuration (the model's preset, ``--set`` overrides, the same epoch
    cap) trained with each final seed into ``out/<model>_default/seed-S``: the baseline the
    tuned runs are compared with (same seeds, same budget). Finished seeds are kept."""
    manifest = read_manifest(settings.data)
    runs = settings.out / f"{settings.model}_default"
    model_cfg, dataset = settings.base_model(), None
    for seed in settings.final_seeds:
        folder, cfg = runs / f"seed-{seed}", settings.train.replace(seed=seed)
        if _finished(folder, manifest["data_hash"], model_cfg, cfg):
            continue
        dataset = dataset if dataset is not None else load_dataset(settings.data)
        train(dataset, model_cfg, cfg, out_dir=folder, data_hash=manifest["data_hash"], progress=settings.progress)
    return runs


def summary(settings: TuneSettings, study, final: dict | None) -> dict:
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and t.datetime_complete and t.datetime_start]
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)  # one worker's hours
    out: dict = {"study": settings.study, "storage": _redact(settings.storage), "model": settings.model,
                 "data": settings.data, "objective": f"valid {OBJECTIVE} (best epoch)", "trials": counts,
                 "epochs_trained": int(sum(t.user_attrs.get("epochs", 0) for t in done)),
                 "trial_seconds": busy, "trials_per_hour": 3600 * len(done) / busy if busy else None,
                 "pruner": settings.pruner, "warmup_epochs": settings.warmup, "epoch_cap": settings.train.epochs,
                 "pruner_note": PRUNER_NOTE, "environment": provenance.environment()}  # trials per hour: on what CPU
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = best_trial(study)
        out["best"] = {"trial": best.number, "value": best.value, "params": best.params,
                       "epochs": best.user_attrs.get("epochs"), "best_epoch": best.user_attrs.get("best_epoch")}
    if final is not None:
        runs = Path(final["runs"])
        out["runs"] = str(runs)
        seeds = []
        for seed in settings.final_seeds:
            path = runs / f"seed-{seed}" / "results.json"
            if path.exists():
                record = json.loads(path.read_text())
                seeds.append({"seed": seed, "test": record["test"], "valid": record["valid"],
                              "best_epoch": record["best_epoch"]})
        out["final"] = seeds
    return out


def tune(settings: TuneSettings) -> dict:
    """Search, then the final runs; writes the trials table, best_config.yaml, the run
    folders and tune.json into ``settings.out``. Returns tune.json's payload."""
    settings.out.mkdir(parents=True, exist_ok=True)
    run_search(settings)
    study = open_study(settings, read_manifest(settings.data)["data_hash"])
    wait_for_running(study)
    write_trials_table(study, settings.out / "trials.csv")
    final = final_runs(settings, study) if settings.final_seeds else None
    payload = summary(settings, study, final)
    write_json_atomic(settings.out / "tune.json", payload)
    return payload


def format_summary(payload: dict) -> str:
    t = payload["trials"]
    lines = [f"study {payload['study']} ({payload['storage']}): {t.get('complete', 0)} complete, "
             f"{t.get('pruned', 0)} pruned, {t.get('fail', 0)} failed; "
             f"{payload['epochs_trained']} epochs trained in {payload['trial_seconds']:.0f} s"]
    if "best" in payload:
        b = payload["best"]
        lines.append(f"best trial {b['trial']}: valid {OBJECTIVE} {b['value']:.4f}  "
                     + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items()))
    for s in payload.get("final", []):
        m = s["test"]
        lines.append(f"  seed {s['seed']}: test ndcg@10 {m['ndcg@10']:.4f} ndcg@20 {m['ndcg@20']:.4f} "
                     f"hr@20 {m['hr@20']:.4f}")
    if "runs" in payload:
        lines.append(f"run folders: {payload['runs']} (hm4sr compare reads them)")
    return "\n".join(lines)
