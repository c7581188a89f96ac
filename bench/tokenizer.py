#!/usr/bin/python3
"""Tokenizer encode throughput: `jetmoe tokenizer encode` against Debian's
`spm_encode --output_format=id` on the same >= 10 MB input in the same run
(best of N each), with the outputs checked identical. Prints MB/s of each, the
ratio jetmoe/spm (> 1 = jetmoe faster) and one JSON line. Never fails on speed;
exits non-zero only when a tool fails or the outputs differ.

Input: tests/tokenizer_corpus.py with successive seeds, concatenated until --mb.
Model: the Llama-2 fixture (../shared/fixtures/llama2-tokenizer/tokenizer.model)
when present, else an 8000-piece model trained with `jetmoe tokenizer train`.

Usage: bench/tokenizer.py [--jetmoe build/jetmoe] [--model M] [--mb 10] [--repeat 3]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import tokenizer_corpus  # noqa: E402

LLAMA2 = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "llama2-tokenizer", "tokenizer.model")


def build_input(mb):
    parts, total, seed = [], 0, tokenizer_corpus.SEED
    while total < mb * 1e6:
        for _, l in tokenizer_corpus.generate(seed):
            parts.append(l + b"\n")
            total += len(l) + 1
        seed += 1
    return b"".join(parts)


def timed(cmd, path, repeat):
    """Best wall time of repeat runs of cmd < path; returns (seconds, stdout of the last run)."""
    best, out = None, None
    for _ in range(repeat):
        with open(path, "rb") as f:
            t0 = time.perf_counter()
            p = subprocess.run(cmd, stdin=f, capture_output=True)
            dt = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"{cmd[0]} failed (exit {p.returncode}): {p.stderr.decode('utf-8', 'replace').strip()[-500:]}")
        best = dt if best is None else min(best, dt)
        out = p.stdout
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jetmoe", default=os.path.join(ROOT, "build", "jetmoe"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--mb", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="jetmoe-tokbench-")
    try:
        t0 = time.time()
        data = build_input(a.mb)
        inp = os.path.join(tmp, "input.txt")
        with open(inp, "wb") as f:
            f.write(data)
        nlines = data.count(b"\n")
        print(f"# input: {len(data) / 1e6:.2f} MB, {nlines} lines (built in {time.time() - t0:.1f}s)", flush=True)

        model, model_name = a.model, None
        if model is None and os.path.isfile(LLAMA2):
            model, model_name = LLAMA2, "llama2"
        if model is None:
            out = os.path.join(tmp, "v8000")
            train = os.path.join(tmp, "train.txt")
            with open(train, "wb") as f:
                f.write(tokenizer_corpus.training_text(tokenizer_corpus.generate(), "big"))
            p = subprocess.run([a.jetmoe, "tokenizer", "train", "--input", train, "--vocab-size", "8000",
                                "--out", out], capture_output=True)
            if p.returncode != 0:
                sys.exit(f"jetmoe tokenizer train failed: {p.stderr.decode('utf-8', 'replace').strip()[-500:]}")
            model, model_name = os.path.join(out, "tokenizer.model"), "trained_v8000_bf"
        model_name = model_name or os.path.basename(model)
        print(f"# model: {model}", flush=True)

        spm_s, spm_out = timed(["spm_encode", "--model", model, "--output_format=id"], inp, a.repeat)
        jm_s, jm_out = timed([a.jetmoe, "tokenizer", "encode", "--model", model], inp, a.repeat)
        mb = len(data) / 1e6
        same = spm_out == jm_out
        ntok = spm_out.count(b" ") + sum(1 for l in spm_out.split(b"\n") if l)
        row = {"what": "tokenizer_encode", "model": model_name, "mb": round(mb, 3), "lines": nlines,
               "tokens": ntok, "repeat": a.repeat, "spm_s": round(spm_s, 4), "jetmoe_s": round(jm_s, 4),
               "spm_mb_s": round(mb / spm_s, 3), "jetmoe_mb_s": round(mb / jm_s, 3),
               "ratio_jetmoe_over_spm": round(spm_s / jm_s, 3), "identical": same}
        print(f"spm_encode            {mb / spm_s:8.2f} MB/s  ({spm_s:.3f}s best of {a.repeat})")
        print(f"jetmoe tokenizer enc. {mb / jm_s:8.2f} MB/s  ({jm_s:.3f}s best of {a.repeat})")
        print(f"ratio jetmoe/spm      {spm_s / jm_s:8.2f}x  (throughput; > 1 = jetmoe faster)")
        if not same:
            a_l, b_l = spm_out.split(b"\n"), jm_out.split(b"\n")
            i = next((i for i, (x, y) in enumerate(zip(a_l, b_l)) if x != y), min(len(a_l), len(b_l)))
            print(f"OUTPUTS DIFFER: first at line {i + 1} "
                  f"(spm {a_l[i][:200] if i < len(a_l) else None!r} | jetmoe {b_l[i][:200] if i < len(b_l) else None!r})")
        print(json.dumps(row), flush=True)
        sys.exit(0 if same else 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
