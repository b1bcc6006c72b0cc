"""Several seeds, several models: mean +- std tables and paired significance tests
(evaluation.md 5-6). Reads run folders written by :func:`hm4sr_core.train.train`."""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import provenance
from .config import ModelConfig, SplitConfig, TrainConfig
from .data.splits import build_split
from .data.store import load_dataset, read_manifest, write_json_atomic, write_text_atomic
from .evaluate import evaluate
from .runs import load_checkpoint, model_from_checkpoint, per_user_frame
from .significance import mean_std, paired_test
from .train import item_popularity, train


class RunsFailed(RuntimeError):
    """Some runs of a table failed; the finished ones are kept."""


@dataclass
class RunGroup:
    """All seeds of one model configuration."""

    label: str
    folders: list[Path]
    records: list[dict]  # results.json of each seed
    per_user: pd.DataFrame  # per-user test metrics averaged over seeds, indexed by user


def load_group(path: str | Path, label: str | None = None) -> RunGroup:
    """A run folder (results.json) or a folder whose seed-*/ sub-folders are runs."""
    path = Path(path)
    folders = [path] if (path / "results.json").exists() else sorted(
        p for p in path.glob("seed-*") if (p / "results.json").exists())
    if not folders:
        raise FileNotFoundError(f"{path}: no results.json, nor seed-*/results.json")
    records = [json.loads((f / "results.json").read_text()) for f in folders]
    hashes = {r["data_hash"] for r in records}
    if len(hashes) > 1:
        raise ValueError(f"{path}: runs were trained on different data ({len(hashes)} data hashes)")
    frames = [pd.read_parquet(f / "per_user_test.parquet").set_index("user") for f in folders]
    per_user = sum(frames) / len(frames)
    return RunGroup(label or path.name, folders, records, per_user)


def compare_runs(paths: list[str | Path], metrics: list[str], test: str = "wilcoxon") -> pd.DataFrame:
    """One row per group: mean, std over seeds for each metric, and the paired p-value of
    each metric against the first group (per-user test metrics averaged over seeds)."""
    groups = [load_group(p) for p in paths]
    hashes = {g.records[0]["data_hash"] for g in groups}
    if len(hashes) > 1:
        raise ValueError("the runs to compare were trained on different data; compare like with like")
    base = groups[0]
    rows = []
    for g in groups:
        row = {"model": g.label, "seeds": len(g.records)}
        for m in metrics:
            values = [r["test"][m] for r in g.records if m in r["test"]]
            if len(values) != len(g.records):
                raise ValueError(f"{g.label}: metric {m!r} missing from a results.json")
            row[f"{m} mean"], row[f"{m} std"] = mean_std(values)
            if g is not base and m in g.per_user.columns:
                users = base.per_user.index.intersection(g.per_user.index)
                row[f"{m} p"] = paired_test(g.per_user.loc[users, m].to_numpy(),
                                            base.per_user.loc[users, m].to_numpy(), method=test)["p_value"]
            else:
                row[f"{m} p"] = np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame, metrics: list[str]) -> str:
    """Markdown: mean +- std per metric, p-value against the first row in brackets."""
    head = "| model | seeds | " + " | ".join(metrics) + " |"
    sep = "|---|---:|" + "---:|" * len(metrics)
    lines = [head, sep]
    for _, r in table.iterrows():
        cells = []
        for m in metrics:
            cell = f"{r[f'{m} mean']:.4f} +- {r[f'{m} std']:.4f}"
            if not np.isnan(r[f"{m} p"]):
                cell += f" (p={r[f'{m} p']:.3g})"
            cells.append(cell)
        lines.append(f"| {r['model']} | {int(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The models of the results table: name -> (preset, overrides). Each is one config switch
# away from HM4SR's defaults (evaluation.md section 5).
TABLE_MODELS: dict[str, tuple[str, dict]] = {
    "hm4sr": ("hm4sr", {}),
    "sasrec": ("sasrec", {}),
    "reference": ("reference", {}),
    "no_interactive_moe": ("hm4sr", {"use_interactive_moe": False}),
    "no_temporal_moe": ("hm4sr", {"use_temporal_moe": False}),
    "no_id_contrastive": ("hm4sr", {"w_id_contrastive": 0.0}),
    "no_category": ("hm4sr", {"w_category": 0.0}),
    "no_placeholder_contrastive": ("hm4sr", {"w_placeholder_contrastive": 0.0}),
    "id_only": ("hm4sr", {"modalities": ("none",)}),
}
# Rows trained only when named in ``--models``: questions about our defaults, not part of the
# results table (whether centring the features helps: docs/guide.md, "Presets and --set").
EXTRA_TABLE_MODELS: dict[str, tuple[str, dict]] = {
    "hm4sr_centred": ("hm4sr", {"feature_transform": "centre"}),
    "hm4sr_standardised": ("hm4sr", {"feature_transform": "standardise"}),
    "hm4sr_pca": ("hm4sr", {"feature_transform": "pca"}),
}
TIME_CONTROLS = ("shuffled", "zeroed")
TABLE_SEEDS = (2025, 2026, 2027)  # the paper's seed and the next two


def table_model_config(name: str):
    """The ModelConfig of a results-table row."""
    known = {**TABLE_MODELS, **EXTRA_TABLE_MODELS}
    if name not in known:
        raise ValueError(f"unknown table model {name!r}; known: {', '.join(known)}")
    preset, over = known[name]
    factory = {"hm4sr": ModelConfig.hm4sr, "sasrec": ModelConfig.sasrec, "reference": ModelConfig.reference}[preset]
    return factory(**{**over, "name": name})


def _train_table_run(data, name: str, train_config, folder: Path, data_hash: str,
                     progress: bool, threads: int = 0) -> float:
    """One (model, seed) run of the table; a top-level function so that worker processes
    can run it. ``data`` is a loaded Dataset, or its name/folder (loaded here, in a worker).

    A run a killed table left unfinished (``last.pt``, no ``results.json``) is resumed from
    its last epoch when its data and settings match (``train(resume=True)`` reaches the
    uninterrupted result); otherwise it is trained from scratch. Returns wall seconds."""
    if threads and not train_config.threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    dataset = load_dataset(data) if isinstance(data, (str, Path)) else data
    resume = (folder / "last.pt").exists() and not (folder / "results.json").exists()
    if resume:
        print(f"[table] {folder}: resuming the unfinished run from last.pt", flush=True)
    run = dict(out_dir=folder, data_hash=data_hash, progress=progress)
    try:
        train(dataset, table_model_config(name), train_config, resume=resume, **run)
    except ValueError as error:
        if not (resume and "last.pt" in str(error)):  # its data, settings or format differ
            raise
        print(f"[table] {folder}: {error}; training from scratch instead", flush=True)
        train(dataset, table_model_config(name), train_config, **run)
    return time.perf_counter() - t0


def run_table(data: str, out: str | Path, *, seeds=TABLE_SEEDS, models=tuple(TABLE_MODELS),
              train_overrides: dict | None = None, progress: bool = True, jobs: int = 1) -> Path:
    """Train every model of ``models`` with every seed into ``out/<model>/seed-<S>/``
    (runs already finished are kept), score the time controls on HM4SR's checkpoints
    into ``out/hm4sr_time_<control>/``, and write ``out/table.md``. Returns the table path.

    ``jobs`` > 1 trains that many runs at once in worker processes (spawned, so CUDA works
    in them), each with ``cores // workers`` torch threads unless ``threads`` is set. There,
    a run that raises does not stop the others: the failures are raised together at the end
    (:class:`RunsFailed`), before the table is written. A worker that dies outright (out of
    memory, a crash) breaks the pool and every run not yet finished is reported failed. With
    ``jobs`` = 1 the first error stops the table. Finished runs are kept in every case."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out = Path(out)
    manifest = read_manifest(data)
    dataset = load_dataset(data)
    base = TrainConfig(**(train_overrides or {}))
    todo = [(name, seed, out / name / f"seed-{seed}") for seed in seeds for name in models
            if not _finished(out / name / f"seed-{seed}", manifest["data_hash"], table_model_config(name),
                             base.replace(seed=seed))]
    if jobs == 1 or len(todo) <= 1:
        for name, seed, folder in todo:
            _train_table_run(dataset, name, base.replace(seed=seed), folder, manifest["data_hash"], progress)
    else:
        workers = min(jobs, len(todo))
        _train_parallel(data, todo, base, manifest["data_hash"], workers, max(1, _cores() // workers))
    if "hm4sr" in models:
        for control in TIME_CONTROLS:
            for seed in seeds:
                src, dst = out / "hm4sr" / f"seed-{seed}", out / f"hm4sr_time_{control}" / f"seed-{seed}"
                if (dst / "results.json").exists() and \
                        (dst / "results.json").stat().st_mtime >= (src / "results.json").stat().st_mtime:
                    continue
                rescore(src, dst, dataset, eval_time=control)
    groups = [out / m for m in models] + ([out / f"hm4sr_time_{c}" for c in TIME_CONTROLS] if "hm4sr" in models else [])
    metrics = ["ndcg@10", "ndcg@20", "hr@10", "hr@20", "mrr@10", "coverage@10", "popularity@10"]
    table = compare_runs(groups, metrics)
    devices: dict[str, int] = {}
    for m in models:  # the same seed-*/ folders compare_runs read, their results.json only
        for path in sorted((out / m).glob("seed-*/results.json")):
            device = json.loads(path.read_text()).get("config", {}).get("train", {}).get("device", "cpu")
            devices[device] = devices.get(device, 0) + 1
    trained_on = ", ".join(f"{n} on {d}" for d, n in sorted(devices.items()))
    text = (f"Dataset {dataset.name} ({manifest['data_hash'][:12]}), {len(seeds)} seeds, test split, "
            f"full ranking, ties by expected rank, history not masked; p: paired Wilcoxon on per-user "
            f"metrics (averaged over seeds) against the first row. Runs trained: {trained_on}.\n\n"
            + format_table(table, metrics))
    write_text_atomic(out / "table.md", text + "\n")
    return out / "table.md"


def _cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker_init(parent: int) -> None:
    """Worker initializer. Ctrl-C is the table process's to handle (it cancels the queue
    and ends the workers); on Linux the kernel ends the worker when the table process
    dies, so a killed ``hm4sr table`` leaves no worker training on into the run folders."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    try:
        refused = ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM)) != 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        refused = True
    if refused:
        print(f"[table] worker {os.getpid()}: the kernel refused to tie it to the table process; "
              f"if the table is killed, end this worker by hand", file=sys.stderr, flush=True)
    elif os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _train_parallel(data: str, todo: list, base, data_hash: str, jobs: int, threads: int) -> None:
    """Run the table's ``todo`` (name, seed, folder) with ``jobs`` worker processes; print
    one line per finished run; raise one error naming every failed run at the end. On
    Ctrl-C (or any error here) the queued runs are cancelled and the workers ended."""
    failures = []
    print(f"[table] {len(todo)} runs to train, {jobs} at a time ({threads} torch thread(s) each)", flush=True)
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if base.device.startswith("cuda") and not (pipe / "control").exists():
        print("[table] hint: workers sharing one GPU ran several times faster under NVIDIA MPS here; start "
              "its daemon first with `nvidia-cuda-mps-control -d` (docs/guide.md, 'On a GPU')", flush=True)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_train_table_run, data, name, base.replace(seed=seed), folder, data_hash,
                               False, threads): (name, seed) for name, seed, folder in todo}
        for done, future in enumerate(as_completed(futures), 1):
            name, seed = futures[future]
            try:
                seconds = future.result()
            except Exception as error:  # noqa: BLE001 - reported with the run's name below
                failures.append(f"{name} seed {seed}: {type(error).__name__}: {error}")
                print(f"[table] {done}/{len(todo)} FAILED {name} seed {seed}: {error}", flush=True)
            else:
                print(f"[table] {done}/{len(todo)} {name} seed {seed} trained in {seconds:.0f} s", flush=True)
    except BaseException:
        workers = list(getattr(pool, "_processes", {}).values())  # no public handle on the workers
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        raise
    pool.shutdown()
    if failures:
        raise RunsFailed("these runs failed (finished ones are kept; run again to retry):\n  "
                         + "\n  ".join(failures))


# Settings that change how fast a run goes, or where, never what it computes. A run
# trained on CUDA is reused on a CPU machine: the same model and protocol, though not the
# same numbers as a CPU run of its seed (other kernels and another dropout stream, so in
# effect another seed); table.md says how many runs each device trained.
_SPEED_ONLY = ("threads", "eval_batch_size", "log_every", "device", "recompute")


def _finished(folder: Path, data_hash: str, model_config, train_config) -> bool:
    """True when ``folder`` holds a finished run of exactly this data, model configuration
    and training configuration (settings in ``_SPEED_ONLY`` aside); a run of other data (a
    regenerated world) or other settings is trained again."""
    path = folder / "results.json"
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    config = record.get("config", {})

    def plain(cfg) -> dict:  # JSON's view of a config (tuples become lists)
        return json.loads(json.dumps(cfg.to_dict()))

    try:  # through from_dict: a run saved before a setting existed has that setting's default
        got_model = plain(type(model_config).from_dict(config.get("model", {})))
        got_train = plain(type(train_config).from_dict(config.get("train", {})))
    except (TypeError, ValueError):
        got_model, got_train = None, None
    else:
        got_train = {k: v for k, v in got_train.items() if k not in _SPEED_ONLY}
    want_train = {k: v for k, v in plain(train_config).items() if k not in _SPEED_ONLY}
    same = (record.get("data_hash") == data_hash and got_model == plain(model_config)
            and got_train == want_train)
    if not same:
        print(f"[table] {folder}: finished run of other data or settings; training again", flush=True)
    return same


def rescore(run: Path, dest: Path, dataset, **eval_overrides) -> dict:
    """Re-evaluate a run's best checkpoint with changed evaluation settings (a control);
    writes results.json and per_user_test.parquet into ``dest``."""
    payload = load_checkpoint(run / "best.pt")
    cfg = TrainConfig.from_dict(payload["train_config"]).replace(**eval_overrides)
    model = model_from_checkpoint(payload, dataset)
    split = build_split(dataset, SplitConfig(kind=cfg.split, max_length=model.config.max_length))
    kw = dict(history=split.train_history(), popularity=item_popularity(split, dataset.num_items),
              time_origin=int(dataset.stats["first_timestamp"]))
    valid, test = evaluate(model, split.valid, cfg, **kw), evaluate(model, split.test, cfg, **kw)
    record = json.loads((run / "results.json").read_text())
    # The record keeps the training run's environment; the rescoring's own is beside it.
    record.update(valid=valid.metrics, test=test.metrics, rescored_from=str(run), eval_overrides=eval_overrides,
                  rescored_environment=provenance.environment())
    dest.mkdir(parents=True, exist_ok=True)
    per_user_frame(test).to_parquet(dest / "per_user_test.parquet", index=False)
    write_json_atomic(dest / "results.json", record)
    return record
