"""Time and peak memory of preparing a large Amazon file, stage by stage (issue 13).

Runs what ``hm4sr prepare amazon<version>`` runs, in this order, in one fresh process:
read (reviews, then metadata of the reviewed items) -> preprocess (dedup, 5-core, dense
ids, item table) -> both split hashes -> save to a temporary folder (deleted after). The
text modality (MiniLM over every surviving item) is taken out before preprocessing and not
measured: it is the feature step, cached and timed on its own (docs/performance.md).

Prints one JSON object: wall and CPU (user + system) seconds per stage, the process's resident memory after each stage
and its peak (``ru_maxrss``), metadata reading apart, and the row counts.

    python -m benchmarks.prepare_large --path benchmarks/_work/amazon10m
    PYTHONPATH=/tmp/old python benchmarks/prepare_large.py --path ...   # another checkout's package

Only public functions present since the reader was written are used, so the same file
measures an older checkout's package put first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    """User + system CPU time of this process: steadier than wall time on a shared host."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(path: str, version: str, user_core: int, item_core: int) -> dict:
    import hm4sr_core
    from hm4sr_core.config import PreprocessConfig, SplitConfig
    from hm4sr_core.data.preprocess import preprocess
    from hm4sr_core.data.readers import amazon
    from hm4sr_core.data.splits import build_split
    from hm4sr_core.data.store import save_dataset

    out: dict = {"package": str(Path(hm4sr_core.__file__).parent), "rss_start_mb": _rss_mb()}
    meta_timing: dict = {}
    read_meta = amazon.read_meta

    def timed_read_meta(*args, **kwargs):
        # Wrapped only to time the metadata pass inside read_amazon; the call is unchanged.
        before, start, cpu_start = _rss_mb(), time.perf_counter(), _cpu_seconds()
        result = read_meta(*args, **kwargs)
        meta_timing.update(meta_seconds=time.perf_counter() - start, meta_cpu_seconds=_cpu_seconds() - cpu_start,
                           rss_before_meta_mb=before,
                           rss_after_meta_mb=_rss_mb(), peak_after_meta_mb=_peak_mb())
        return result

    reviews, meta = amazon.locate_amazon(path, version=version)
    stages, cpu = {}, {}
    amazon.read_meta = timed_read_meta
    try:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        raw = amazon.read_amazon(reviews, meta, version=version)
        stages["read"], cpu["read"] = time.perf_counter() - start, _cpu_seconds() - cpu_start
    finally:
        amazon.read_meta = read_meta
    out.update(meta_timing, rss_after_read_mb=_rss_mb(), peak_after_read_mb=_peak_mb(),
               reviews=int(raw.source["reviews"]), items_read=int(len(raw.items)))
    raw.modalities = [m for m in raw.modalities if m.name != "text"]

    config = PreprocessConfig(user_core=user_core, item_core=item_core)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    ds = preprocess(raw, config)
    stages["preprocess"], cpu["preprocess"] = time.perf_counter() - start, _cpu_seconds() - cpu_start
    del raw
    out.update(rss_after_preprocess_mb=_rss_mb(), peak_after_preprocess_mb=_peak_mb(),
               rows_after_dedup=ds.preprocessing["rows_after_dedup"], interactions=ds.stats["interactions"],
               users=ds.stats["users"], items=ds.stats["items"], categories=len(ds.category_names))

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    hashes = {kind: build_split(ds, SplitConfig(kind=kind, max_length=config.max_length)).hash()
              for kind in ("leave_one_out", "temporal")}
    stages["splits"], cpu["splits"] = time.perf_counter() - start, _cpu_seconds() - cpu_start
    out.update(rss_after_splits_mb=_rss_mb(), peak_after_splits_mb=_peak_mb())

    with tempfile.TemporaryDirectory() as folder:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        save_dataset(ds, Path(folder) / "ds", extra={"split_hashes": hashes})
        stages["save"], cpu["save"] = time.perf_counter() - start, _cpu_seconds() - cpu_start
    out.update(stages={k: round(v, 1) for k, v in stages.items()}, total_seconds=round(sum(stages.values()), 1),
               cpu_seconds={k: round(v, 1) for k, v in cpu.items()}, total_cpu_seconds=round(sum(cpu.values()), 1),
               peak_rss_mb=round(_peak_mb()), split_hashes=hashes)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="folder (or reviews file) of one Amazon category")
    parser.add_argument("--version", default="2023", choices=("2014", "2018", "2023"))
    parser.add_argument("--user-core", type=int, default=5)
    parser.add_argument("--item-core", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.path, args.version, args.user_core, args.item_core), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
