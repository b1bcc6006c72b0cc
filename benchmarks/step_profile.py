"""Where a prefix-mode training step spends its CPU time, by kind of work: a profile to
compare two CPUs with.

Runs prefix-mode HM4SR training steps (ml-100k, batch 1024, 2 threads, the first batches of
epoch 1 in training order) under Linux perf record (cpu-clock sampling, so it works in a
virtual machine without hardware counters; sampling only the timed steps, not the set-up)
and sums the samples by kind of work: BLAS GEMM micro-kernels, BLAS operand packing, other
BLAS routines, tensor copies, elementwise kernels, reductions, normalisation and softmax,
OpenMP waiting, the OS kernel (page faults), Python and its garbage collector. It prints the
seconds per step, the shares and the ten heaviest symbols, and writes them as JSON with --out.

    python -m benchmarks.step_profile                    # 12 steps, under a minute; needs perf (Debian: linux-perf)
    python -m benchmarks.step_profile --steps 6 --out /tmp/profile.json
    python -m benchmarks.step_profile --no-perf          # seconds and page faults per step only

torch's own profiler is not used for this: on these machines it reported large elementwise
kernels (GELU on 51,200 x 256) at 24-30 ms a call where a stopwatch inside the same step
read 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (kind, pattern): the first match wins, so the specific kinds come first. The OS kernel's own
# symbols (its memcpy, csum_partial) are matched on the library name before any symbol pattern.
KINDS = (
    ("os_kernel", re.compile(r"^\[kernel|^\[k\]")),
    # MKL's "nocopy" kernels multiply unpacked operands: GEMM work, not packing.
    ("gemm_packing", re.compile(r"mkl_blas_\w*(scopy|(?<!no)copy|pack)|brgemm_copy|gemm_pack|jit_\w*copy_[ab]")),
    ("gemm_kernel", re.compile(r"sgemm_kernel|gemm\w*_kernel|brgemm|jit_avx\w*gemm")),
    # Code generated at run time (MKL's and oneDNN's JIT kernels), which perf cannot name.
    ("jit_unnamed", re.compile(r"^\[JIT\]")),
    ("gemm_other", re.compile(r"mkl_blas_|mkl_serv|dnnl|mkldnn")),
    ("copy", re.compile(r"copy_kernel|memmove|memcpy|memset|cat_serial|CatArray|index_select|gather|scatter|stack")),
    ("norm_softmax", re.compile(r"LayerNorm|layer_norm|RowwiseMoments|softmax|Softmax")),
    ("reduction", re.compile(r"_sum\b|\bsum_|_sum_|\bsum\b|reduce|Reduce|_mean|norm_kernel")),
    ("elementwise", re.compile(r"VectorizedLoop|cpu_kernel|vectorized|Sleef|unary|binary|where|gelu|fill|addcmul")),
    ("openmp_wait", re.compile(r"libgomp")),
    ("python_gc", re.compile(r"gc_collect|visit_decref|visit_reachable|subtract_refs|move_unreachable")),
    ("python", re.compile(r"libpython|python3")),
)
LINE = re.compile(r"\s*([\d.]+)%\s+(.+?)\s+(\[.\])\s+(.*\S)")  # share, library (may hold spaces), [.] or [k], symbol
PERF_TIMEOUT = 900  # seconds for the profiled steps; 12 take under a minute here


def run_steps(steps: int, threads: int) -> dict:
    """``steps`` timed prefix-mode steps after one warm-up step; seconds per step."""
    import benchmarks  # noqa: F401  (the runtime settings, as make bench has them)
    import torch
    from benchmarks.run import _dataset
    from hm4sr_core.config import ModelConfig, SplitConfig, TrainConfig
    from hm4sr_core.data.splits import build_split, iterate_batches
    from hm4sr_core.model import build_model
    from hm4sr_core.sampling import StepSampler
    from hm4sr_core.train import _epoch_generator

    torch.set_num_threads(threads)
    ds, _ = _dataset()
    config, train_config = ModelConfig(), TrainConfig(mode="prefix")
    split = build_split(ds, SplitConfig(max_length=config.max_length))
    torch.manual_seed(train_config.seed)
    model = build_model(config, ds)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr)
    sampler = StepSampler.for_model(model)
    batches = []
    for batch in iterate_batches(split.train("prefix"), train_config.batch_size, shuffle=True,
                                 generator=_epoch_generator(train_config.seed, 1), bucket=True):
        batches.append(batch)
        if len(batches) == steps + 1:
            break
    if len(batches) < steps + 1:
        raise SystemExit(f"--steps {steps}: an epoch has {len(batches)} batches, so at most {len(batches) - 1} "
                         "steps after the warm-up")
    draws = torch.Generator().manual_seed(0)

    def step(batch):
        out = model(batch, sampler(batch, draws))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    step(batches[0])
    _perf_control(b"enable")  # perf samples the timed steps only, not the set-up
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for batch in batches[1:]:
        t = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t)
    _perf_control(b"disable")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"seconds_per_step_median": statistics.median(times), "seconds_all": times,
            "page_faults_per_step": faults / len(times),
            "widths": [int(b.items.shape[1]) for b in batches[1:]], "threads": threads}


def _perf_control(command: bytes) -> None:
    """Send ``command`` to the perf record that runs this process (``perf record --control``),
    and wait for its acknowledgement; nothing when not run that way."""
    fifos = os.environ.get("HM4SR_PERF_CONTROL")
    if fifos:
        ctl, ack = fifos.split(",")
        with open(ctl, "wb", buffering=0) as f:
            f.write(command + b"\n")
        with open(ack, "rb") as f:
            f.read(5)


def kinds_of(report: str) -> tuple[dict[str, float], list[tuple[float, str, str]]]:
    """Shares (percent of samples) by kind, and the symbols (share, name, kind), from ``perf report --stdio``
    lines such as ``  12.34%  libtorch_cpu.so  [.] mkl_blas_def_sgemm_kernel_0_zen``."""
    shares: dict[str, float] = {kind: 0.0 for kind, _ in KINDS}
    shares["other"] = 0.0
    symbols = []
    for line in report.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        share, dso, mark, symbol = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        text = f"{'[k]' if mark == '[k]' else dso} {symbol}"
        kind = next((k for k, pattern in KINDS if pattern.search(text)), "other")
        shares[kind] += share
        symbols.append((share, f"{dso} {symbol}"[:160], kind))
    return shares, symbols


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="timed steps after one warm-up step (default 12)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the bench's)")
    p.add_argument("--no-perf", action="store_true", help="only time the steps (and count page faults), without perf")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the process perf samples
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.child or args.no_perf:
        result = run_steps(args.steps, args.threads)
        if args.child:
            print(json.dumps(result))
            return
        print(f"{result['seconds_per_step_median']:.3f} s per step (median of {args.steps}; widths {result['widths']}); "
              f"{result['page_faults_per_step']:.0f} page faults per step")
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("perf is not installed (Debian: apt-get install linux-perf); --no-perf times the steps only")
    with tempfile.TemporaryDirectory(prefix="hm4sr-perf-") as folder:
        data, ctl, ack = Path(folder) / "perf.data", Path(folder) / "ctl", Path(folder) / "ack"
        os.mkfifo(ctl), os.mkfifo(ack)
        # Started with sampling off (-D -1); the child turns it on around the timed steps.
        cmd = [perf, "record", "-q", "-e", "cpu-clock", "-F", "499", "-D", "-1", "--control", f"fifo:{ctl},{ack}",
               "-o", str(data), "--",
               sys.executable, "-m", "benchmarks.step_profile", "--child", "--steps", str(args.steps),
               "--threads", str(args.threads)]
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PERF_TIMEOUT,
                                  env=dict(os.environ, HM4SR_PERF_CONTROL=f"{ctl},{ack}"))
        except subprocess.TimeoutExpired:
            raise SystemExit(f"perf record ran past {PERF_TIMEOUT} s and was stopped") from None
        if done.returncode != 0 or not done.stdout.strip():
            raise SystemExit(f"perf record failed (exit {done.returncode}); its output ends:\n{done.stderr[-3000:]}\n"
                             "(perf needs --control and -D, Linux 5.10 or later, and a perf_event_paranoid "
                             "of 2 or less for a non-root user; --no-perf times the steps without it)")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        report = subprocess.run([perf, "report", "-i", str(data), "--no-children", "--sort", "dso,symbol",
                                 "--stdio", "--percent-limit", "0"], capture_output=True, text=True)
        if report.returncode != 0:
            raise SystemExit(f"perf report failed:\n{report.stderr[-3000:]}")
    shares, symbols = kinds_of(report.stdout)
    from hm4sr_core import provenance
    result.update(cpu_model=provenance.cpu()["cpu_model"], shares_percent={k: round(v, 2) for k, v in shares.items()},
                  top_symbols=[[round(s, 2), name, kind] for s, name, kind in sorted(symbols, reverse=True)[:10]],
                  top_symbols_by_kind={k: [[round(s, 2), name] for s, name, kind in sorted(symbols, reverse=True)
                                           if kind == k][:5] for k in shares},
                  measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  note="profiled steps (perf sampling adds a little); time them with --no-perf")
    print(f"{result['cpu_model']}: {result['seconds_per_step_median']:.3f} s per prefix step under perf "
          f"(median of {args.steps}; widths {result['widths']})")
    for kind, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:14s} {share:5.1f}%")
    print("heaviest symbols:")
    for share, name, kind in sorted(symbols, reverse=True)[:10]:
        print(f"  {share:5.2f}%  {kind:12s}  {name}")
    if args.out:
        from hm4sr_core.data.store import write_json_atomic
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
