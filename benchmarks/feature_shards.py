"""Cost of the sharded, resumable feature cache on MiniLM text encoding (issue 13).

Encodes N synthetic item texts on one CPU thread, each run in a fresh process with
the model loaded before the clock starts:

- ``one-shot``: today's path before sharding, :func:`cached` around one
  :func:`encode_texts` call (one .npy for everything);
- ``sharded``: :func:`encode_texts_cached` into an empty cache folder;
- ``killed``: the same, SIGKILLed once half of the shards are on disk;
- ``resumed``: the same call again on that folder (encodes only the missing shards);
- ``cached``: once more, everything loaded from shards.

Also times the cache's own work alone (hashing the inputs, writing and fsyncing the
files) with a free encoder that returns zeros: sharded vs one .npy.

    OMP_NUM_THREADS=1 python -m benchmarks.feature_shards --texts 20000
    OMP_NUM_THREADS=1 python -m benchmarks.feature_shards --abba 2 --texts 8192 --shard-size 1024

``--abba R``: instead, one process alternates one-shot and sharded encodings of the
same texts (fresh cache folders) in ABBA order R times and prints each time and the
median ratio: a shared host drifts by tens of percent between processes minutes apart.

Prints seconds and texts encoded per second for each run, the sharding overhead
(sharded / one-shot), the killed + resumed total, and checks that every run gave the
same floats. The work folder (a few hundred MB for 20,000 texts) is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COLOURS = ["red", "green", "blue", "black", "white", "grey", "silver", "navy", "olive", "teal"]
THINGS = ["kettle", "backpack", "lamp", "keyboard", "chair", "notebook", "jacket", "speaker", "mug"]
CATEGORIES = ["Home & Kitchen, Appliances", "Sports, Outdoor", "Electronics, Audio", "Office, Paper",
              "Clothing, Men", "Toys & Games, Puzzles"]


def synthetic_texts(n: int) -> list[str]:
    """n distinct item texts shaped like the readers' "title | category path | brand"."""
    return [f"{COLOURS[i % 10].title()} {THINGS[i * 7 % 9]} model {i} | {CATEGORIES[i * 5 % 6]} | Brand{i % 211}"
            for i in range(n)]


def child(mode: str, shard_size: int, texts_file: Path, cache: Path, out: Path, clock: Path) -> None:
    """One run in this process: load MiniLM, note the start time, encode, save the result."""
    import torch

    from hm4sr_core.data import features

    torch.set_num_threads(1)
    texts = json.loads(texts_file.read_text())
    features._text_model()
    start = time.perf_counter()
    clock.write_text(json.dumps({"start_wall": time.time()}))
    if mode == "one-shot":
        key = {"encoder": features.text_encoder_name(), "normalize": True, "texts": texts}
        result = features.cached("text-minilm", key, lambda: features.encode_texts(texts, progress=False), cache)
    else:
        result = features.encode_texts_cached(texts, cache_dir=cache, progress=False, shard_size=shard_size)
    seconds = time.perf_counter() - start
    np.save(out, result)
    clock.write_text(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=20000, help="number of synthetic texts (>= 2 shards)")
    parser.add_argument("--shard-size", type=int, default=None, help="texts per shard (default: SHARD_SIZE)")
    parser.add_argument("--abba", type=int, default=0, help="ABBA rounds of one-shot vs sharded in one process")
    parser.add_argument("--child", choices=["one-shot", "sharded"], help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs=4, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.shard_size, *args.files)
        return

    from hm4sr_core.data.features import SHARD_SIZE, TEXT_BATCH_SIZE, shard_rows

    shard_size = args.shard_size or SHARD_SIZE
    rows = shard_rows(shard_size, TEXT_BATCH_SIZE)
    shards = math.ceil(args.texts / rows)
    if shards < 2:
        raise ValueError(f"--texts must give at least 2 shards of {rows}, got {args.texts}")
    work = Path(tempfile.mkdtemp(prefix="feature-shards-"))
    try:
        if args.abba:
            abba(args.texts, shard_size, args.abba, work)
        else:
            run_all(args.texts, shard_size, rows, shards, work)
    finally:
        shutil.rmtree(work)


def abba(n: int, shard_size: int, rounds: int, work: Path) -> None:
    """One-shot (A) and sharded (B) in one process, ABBA order, each into a fresh cache folder."""
    import torch

    from hm4sr_core.data import features

    torch.set_num_threads(1)
    texts = synthetic_texts(n)
    features._text_model()
    seconds: dict[str, list[float]] = {"one-shot": [], "sharded": []}
    for run, mode in enumerate(["one-shot", "sharded", "sharded", "one-shot"] * rounds):
        cache = work / f"abba-{run}"
        start = time.perf_counter()
        if mode == "one-shot":
            key = {**features.text_cache_key(), "texts": texts}
            features.cached("text-minilm", key, lambda: features.encode_texts(texts, progress=False), cache)
        else:
            features.encode_texts_cached(texts, cache_dir=cache, progress=False, shard_size=shard_size)
        seconds[mode].append(time.perf_counter() - start)
        print(f"{mode:>9}: {seconds[mode][-1]:7.2f} s  {n / seconds[mode][-1]:7.1f} texts/s", flush=True)
    ratios = [b / a for a, b in zip(seconds["one-shot"], seconds["sharded"])]
    print(f"{n} texts, shards of {shard_size}, 1 thread: median sharded / one-shot = {statistics.median(ratios):.3f}"
          f" (pairs: {', '.join(f'{r:.3f}' for r in ratios)})")


def bookkeeping_seconds(texts: list[str], shard_size: int, work: Path) -> dict[str, float]:
    """The cache's own cost with an encoder that costs nothing: one .npy vs shard files."""
    from hm4sr_core.data.features import TEXT_BATCH_SIZE, TEXT_DIM, cached, encode_sharded, text_cache_key

    def zeros(start: int, stop: int) -> np.ndarray:
        return np.zeros((stop - start, TEXT_DIM), np.float32)

    start = time.perf_counter()
    cached("text-minilm", {**text_cache_key(), "texts": texts}, lambda: zeros(0, len(texts)), work / "free-one")
    one = time.perf_counter() - start
    start = time.perf_counter()
    encode_sharded("text-minilm", text_cache_key(), texts, zeros, dim=TEXT_DIM, batch_size=TEXT_BATCH_SIZE,
                   shard_size=shard_size, cache_dir=work / "free-sharded", progress=False)
    sharded = time.perf_counter() - start
    start = time.perf_counter()
    encode_sharded("text-minilm", text_cache_key(), texts, zeros, dim=TEXT_DIM, batch_size=TEXT_BATCH_SIZE,
                   shard_size=shard_size, cache_dir=work / "free-sharded", progress=False)
    return {"one .npy": one, "shards": sharded, "shards, all cached": time.perf_counter() - start}


def run_all(n: int, shard_size: int, rows: int, shards: int, work: Path) -> None:
    """Every run in order, then the report."""
    texts = synthetic_texts(n)
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))

    def start(mode: str, run: str, cache: str) -> tuple[subprocess.Popen, Path]:
        clock = work / f"{run}.clock"
        files = [texts_file, work / cache, work / f"{run}.npy", clock]
        command = [sys.executable, "-m", "benchmarks.feature_shards", "--child", mode,
                   "--shard-size", str(shard_size), "--files", *map(str, files)]
        return subprocess.Popen(command, stderr=subprocess.DEVNULL), clock

    def finish(mode: str, run: str, cache: str) -> float:
        process, clock = start(mode, run, cache)
        if process.wait() != 0:
            raise RuntimeError(f"{run} run failed (exit {process.returncode})")
        return json.loads(clock.read_text())["seconds"]

    seconds = {"one-shot": finish("one-shot", "one-shot", "one"), "sharded": finish("sharded", "sharded", "full")}

    # Kill once half of the shards are written (the clock starts when the model is loaded).
    process, clock = start("sharded", "killed", "resume")
    target = shards // 2
    while len(list((work / "resume").glob("text-minilm-*.npy"))) < target:
        if process.poll() is not None:
            raise RuntimeError("the run to be killed ended first")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    killed_at = time.time()
    process.wait()
    seconds["killed"] = killed_at - json.loads(clock.read_text())["start_wall"]
    written = len(list((work / "resume").glob("text-minilm-*.npy")))
    seconds["resumed"] = finish("sharded", "resumed", "resume")
    seconds["cached"] = finish("sharded", "cached", "resume")

    reference = np.load(work / "one-shot.npy")
    same = {run: bool(np.array_equal(np.load(work / f"{run}.npy"), reference))
            for run in ("sharded", "resumed", "cached")}
    reused = min(written * rows, n)
    encoded = {"one-shot": n, "sharded": n, "killed": reused, "resumed": n - reused, "cached": 0}
    print(f"{n} texts, {shards} shards of {rows}, 1 thread; killed after {written} shards "
          f"({reused} texts) were written")
    for run, value in seconds.items():
        rate = f"{encoded[run] / value:8.1f} texts/s" if encoded[run] else ""
        print(f"{run:>9}: {value:8.2f} s  {encoded[run]:6d} texts encoded  {rate}"
              + ("  (kept on disk; then SIGKILL)" if run == "killed" else ""))
    print(f"sharding overhead (sharded / one-shot): {seconds['sharded'] / seconds['one-shot']:.3f}")
    total = seconds["killed"] + seconds["resumed"]
    print(f"killed + resumed: {total:.2f} s = {total / seconds['sharded']:.3f} x uninterrupted sharded")
    print(f"same floats as one-shot: {same}")
    for label, value in bookkeeping_seconds(texts, shard_size, work).items():
        print(f"cache work alone (free encoder), {label}: {value:.3f} s")


if __name__ == "__main__":
    main()
