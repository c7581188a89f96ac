#!/usr/bin/python3
"""Runs the benchmarks and prints ratios: the C model against the PyTorch
reference on the same config and threads, and against the machine's fp32
GEMM peak measured in the same run. Prints figures; never passes or fails.

Usage: bench/run_bench.py [--threads 2] [--batch 8] [--seq 256] [--iters 5]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def json_lines(text):
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def cpu_model():
    """lscpu's "Model name" with the family and model numbers (a VM may show only
    "AMD EPYC": the numbers say which generation), and the CPU count."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, env=dict(os.environ, LC_ALL="C")).stdout
    except OSError:
        return "unknown CPU (no lscpu)"
    f = dict(l.split(":", 1) for l in out.splitlines() if ":" in l)
    f = {k.strip(): v.strip() for k, v in f.items()}
    return "%s (family %s, model %s), %s CPUs" % (f.get("Model name", "?"), f.get("CPU family", "?"),
                                                  f.get("Model", "?"), f.get("CPU(s)", "?"))


def load_note():
    """The figures assume the cores are ours: a line saying when they were not."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: load average {load:.1f} before starting: other work on this machine skews every figure",
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--build", default="build")
    ap.add_argument("--only", choices=("forward", "train"), default=None)
    a = ap.parse_args()
    common = ["--threads", str(a.threads), "--batch", str(a.batch), "--seq", str(a.seq), "--iters", str(a.iters)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))

    print(f"config: vocab 32000, hidden 256, 4 layers, 4 KV heads x 64, FFN 704, 8 experts top-2; "
          f"batch {a.batch} x {a.seq} tokens, {a.threads} threads, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; CPU: {cpu_model()}")
    for what in ("forward", "train"):
        if a.only and a.only != what:
            continue
        c = subprocess.run([os.path.join(ROOT, a.build, "bench", what)] + common, capture_output=True, text=True,
                           env=env, check=True)
        py = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "bench", "forward_ref.py")] + common +
                            (["--train"] if what == "train" else []), capture_output=True, text=True, env=env,
                            check=True)
        rows = json_lines(c.stdout) + json_lines(py.stdout)
        peak = next(r for r in rows if r.get("what") == "gemm_peak")
        cf = next(r for r in rows if r.get("impl") == "c" and r.get("what") == what)
        pf = next(r for r in rows if r.get("impl") == "pytorch")
        pt_gflops = cf["gflop_per_iter"] / pf["seconds_per_iter"]
        print(f"bench/{what}:")
        print(f"  fp32 SGEMM peak (2048^3, OpenBLAS, same process): {peak['gflops']:.1f} GFLOP/s")
        print(f"  C       {cf['tokens_per_s']:9.1f} tokens/s  {cf['gflops']:6.1f} GFLOP/s "
              f"= {cf['gflops'] / peak['gflops']:.0%} of GEMM peak")
        print(f"  PyTorch {pf['tokens_per_s']:9.1f} tokens/s  {pt_gflops:6.1f} GFLOP/s "
              f"= {pt_gflops / peak['gflops']:.0%} of GEMM peak")
        print(f"  ratio C / PyTorch: {cf['tokens_per_s'] / pf['tokens_per_s']:.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
