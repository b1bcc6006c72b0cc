"""MKL's two code paths on this CPU, product by product: time, and whether the bits agree.

On an AMD CPU ``hm4sr_core.runtime.configure_process`` loads a one-line library that lets
MKL pick its kernels by the CPU's features (its AVX-512 ones on a Zen 4 EPYC) instead of its
generic path (docs/performance.md, "MKL's code paths on an AMD CPU"). This tool takes the
matrix products of a prefix-mode training step (51,200 rows = batch 1024 x 50 positions;
layers 64 -> 192 (q, k, v), 64 -> 64, 64 -> 256 and 256 -> 64; forward, input gradient and
weight gradient) and, in fresh processes with the library and without it
(``HM4SR_MKL_INTEL_PATHS=0``), at 1 and 2 threads, times each (median of ``--repeats``) and
hashes its result. It prints per product the milliseconds on each path, their ratio, whether
both paths give the same bits, and whether each path gives the same bits at 1 and 2 threads.

    python -m benchmarks.mkl_paths              # about a minute here
    python -m benchmarks.mkl_paths --repeats 9 --out /tmp/mkl_paths.json

On a CPU where the library is not loaded (Intel, ARM, no C compiler) both columns are the
same path and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = 51_200
LAYERS = ((64, 192), (64, 64), (64, 256), (256, 64))


def measure(threads: int, repeats: int, rows: int = ROWS) -> dict:
    """In this process (settings applied by the benchmarks package): every product's median
    seconds and the md5 of its result, and MKL's state."""
    import hashlib

    import torch

    from hm4sr_core import provenance, runtime
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    out = {"mkl_intel_paths": runtime.mkl_state(), "mkl_code_path": provenance.mkl_code_path(), "products": {}}
    for k, n in LAYERS:
        x = torch.randn(rows, k, generator=gen)
        w = torch.randn(k, n, generator=gen)
        b = torch.randn(n, generator=gen)
        g = torch.randn(rows, n, generator=gen)
        products = {"forward": lambda: torch.addmm(b, x, w), "input_gradient": lambda: g @ w.T,
                    "weight_gradient": lambda: x.T @ g}
        for name, product in products.items():
            result = product()  # warm-up, and the value hashed
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                product()
                times.append(time.perf_counter() - t)
            out["products"][f"{k}->{n} {name}"] = {"seconds": statistics.median(times),
                                                     "md5": hashlib.md5(result.numpy().tobytes()).hexdigest()}
    return out


def _child(library: bool, threads: int, repeats: int, rows: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("LD_PRELOAD", None)
    env["HM4SR_MKL_INTEL_PATHS"] = os.environ.get("HM4SR_MKL_INTEL_PATHS", "") if library else "0"
    done = subprocess.run([sys.executable, "-m", "benchmarks.mkl_paths", "--child", str(threads), "--repeats",
                           str(repeats), "--rows", str(rows)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.mkl_paths: the measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mkl_paths", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each product (default 5; median)")
    p.add_argument("--rows", type=int, default=ROWS, help=f"rows of each product (default {ROWS:,})")
    p.add_argument("--out", type=Path, help="also write the figures here as JSON")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # a measuring process at this many threads
    args = p.parse_args()
    if args.repeats < 1 or args.rows < 1:
        p.error(f"--repeats and --rows must be >= 1, got {args.repeats} and {args.rows}")
    if args.child:
        print(json.dumps(measure(args.child, args.repeats, args.rows)))
        return
    runs = {}
    for threads in (2, 1):
        for library in (False, True):
            print(f"[mkl_paths] {threads} thread(s), library {'on' if library else 'off'} ...", file=sys.stderr,
                  flush=True)
            runs[(library, threads)] = _child(library, threads, args.repeats, args.rows)
    on, off = runs[(True, 2)], runs[(False, 2)]
    print(f"library: {on['mkl_intel_paths']['why']} (MKL code path {off['mkl_code_path']} without it, "
          f"{on['mkl_code_path']} with it)")
    print(f"{f'product ({args.rows:,} rows)':<28} {'generic ms':>10} {'library ms':>10} {'ratio':>6}  "
          f"{'same bits':>9}  {'1 = 2 threads (generic, library)':>32}")
    rows = []
    for name in off["products"]:
        a, b = off["products"][name], on["products"][name]
        same = a["md5"] == b["md5"]
        threads_same = (runs[(False, 1)]["products"][name]["md5"] == a["md5"],
                        runs[(True, 1)]["products"][name]["md5"] == b["md5"])
        rows.append({"product": name, "generic_seconds": a["seconds"], "library_seconds": b["seconds"],
                     "ratio": b["seconds"] / a["seconds"], "same_bits": same,
                     "same_bits_1_and_2_threads": {"generic": threads_same[0], "library": threads_same[1]}})
        print(f"{name:<28} {a['seconds'] * 1e3:>10.2f} {b['seconds'] * 1e3:>10.2f} {b['seconds'] / a['seconds']:>6.3f}"
              f"  {'yes' if same else 'no':>9}  {'yes' if threads_same[0] else 'no':>15}, "
              f"{'yes' if threads_same[1] else 'no':<15}")
    total = sum(r["library_seconds"] for r in rows) / sum(r["generic_seconds"] for r in rows)
    print(f"all products at 2 threads: {total:.3f} of the generic path's time")
    if args.out:
        from hm4sr_core.data.store import write_json_atomic
        from hm4sr_core.provenance import cpu
        write_json_atomic(args.out, {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "cpu_model": cpu()["cpu_model"], "repeats": args.repeats, "rows": args.rows,
                                     "library": on["mkl_intel_paths"], "mkl_code_path": {
                                         "generic": off["mkl_code_path"], "library": on["mkl_code_path"]},
                                     "total_ratio": total, "products": rows})


if __name__ == "__main__":
    main()
