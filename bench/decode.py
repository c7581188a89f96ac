#!/usr/bin/python3
"""Decode benchmarks: KV-cached greedy decoding of the C model against the
PyTorch peer on the small bench config, and on JetMoE-8B's layout (random
weights) in BF16, Q8 and Q4 against the memory-bandwidth roofline. Prints
figures; never passes or fails.

  bench/decode.py [--threads 2] [--synthetic DIR] [--skip-8b] [--build build]

Small config (bench/common.h): `jetmoe init` writes a random fp32 checkpoint
to a temporary directory; build/bench/decode and bench/decode_ref.py decode
it with the same prompt (128 tokens, then 64 new) and threads; the ratios
C / PyTorch of prefill and decode tokens/s are printed, and whether the two
greedy decodes agree.

8B layout: DIR (default build/synthetic-8b) gets bf16/ from bench/make_synthetic
and q8/, q4/ from `jetmoe quantize` when they are absent (about 17 + 9 + 5 GB;
the first run takes some minutes), then build/bench/decode runs on each with a
512-token prompt and 16 new tokens. A token reads ~4.7 GB of active BF16
weights (2.3B parameters: k of E experts), so there decode is bound by memory
bandwidth to a few tokens/s, and a 512-token prefill takes about a minute.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from run_bench import json_lines, load_note  # noqa: E402


def run(cmd, env):
    """Runs a bench (its progress and summary go to our stderr) -> its JSON result."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True).stdout
    return json_lines(out)[-1]


def leading_agreement(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def small(a, env):
    decode = os.path.join(ROOT, a.build, "bench", "decode")
    common = ["--threads", str(a.threads), "--prompt", "128", "--new", "64"]
    with tempfile.TemporaryDirectory(prefix="jetmoe-decode-") as td:
        cfg_path, model = os.path.join(td, "config.json"), os.path.join(td, "model")
        # the config comes from bench/common.h by way of the C bench, so there is one copy of it
        subprocess.run([decode, "--bench-config", cfg_path], check=True)
        subprocess.run([os.path.join(ROOT, a.build, "jetmoe"), "init", model, "--config", cfg_path, "--seed", "1"],
                       check=True, stdout=subprocess.DEVNULL)
        with open(cfg_path) as f:
            cfg = json.load(f)
        c = run([decode, model] + common, env)
        py = run(["/usr/bin/python3", os.path.join(ROOT, "bench", "decode_ref.py"), model, "--check"] + common, env)

    print(f"small config: vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"{cfg['num_key_value_heads']} KV heads x {cfg['kv_channels']}, FFN {cfg['intermediate_size']}, "
          f"{cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}; random fp32; "
          f"prompt {c['prompt']}, {c['new']} new, {a.threads} threads")
    print(f"  {'':12} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/token':>9}")
    for name, r in (("C", c), ("PyTorch", py)):
        print(f"  {name:12} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} {1e3 / r['decode_tok_s']:9.2f}")
    print(f"  {'C / PyTorch':12} {c['prefill_tok_s'] / py['prefill_tok_s']:13.2f}x "
          f"{c['decode_tok_s'] / py['decode_tok_s']:12.2f}x")
    print(f"  C roofline: {c['bandwidth_gbs']:.1f} GB/s / {c['active_weight_bytes'] / 1e6:.1f} MB per token "
          f"= {c['roofline_tok_s']:.0f} tokens/s; C decodes at {c['ratio']:.0%} of it "
          f"({c['weight_type']} weights, {c['kernels']} kernels)")
    n, total = leading_agreement(c["ids"], py["ids"]), len(c["ids"])
    print("  greedy ids: C and PyTorch agree on " + (f"all {total}" if n == total else f"the first {n} of {total}")
          + f"; PyTorch cached vs uncached reference: max |logits diff| {py['check_max_abs_diff']:.1e}"
          + ("" if py["check_greedy_agrees"] else " (its greedy ids differ!)"), flush=True)


def checkpoint_complete(d):
    """config.json and every file the index names (each is written whole, then renamed)."""
    if not os.path.exists(os.path.join(d, "config.json")):
        return False
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return True
    try:
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            files = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all(os.path.exists(os.path.join(d, fn)) for fn in files)


def read_through(d):
    """Reads a checkpoint's files once, so its pages are in the page cache when
    the bench maps them: the three variants (~30 GB) do not fit in RAM together,
    and a decode that waits on the disk measures the disk. -> GB/s read."""
    t0, n = time.time(), 0
    for fn in sorted(os.listdir(d)):
        with open(os.path.join(d, fn), "rb") as f:
            while True:
                b = f.read(64 << 20)
                if not b:
                    break
                n += len(b)
    return n / 1e9 / max(time.time() - t0, 1e-9)


def big(a, env):
    """-> the number of variants that could not be prepared or run."""
    jetmoe = os.path.join(ROOT, a.build, "jetmoe")
    bf16 = os.path.join(a.synthetic, "bf16")
    # make_synthetic skips the shards that are already complete, so a rerun costs nothing
    subprocess.run([os.path.join(ROOT, "bench", "make_synthetic"), bf16], check=True)
    rows, failed = [], 0
    for name in ("bf16", "q8", "q4"):
        d = os.path.join(a.synthetic, name)
        try:
            if name != "bf16" and not checkpoint_complete(d):
                print(f"$ jetmoe quantize {bf16} --to {name} --out {d}", file=sys.stderr, flush=True)
                subprocess.run([jetmoe, "quantize", bf16, "--to", name, "--out", d], check=True, env=env)
            print(f"{name}: read through the page cache at {read_through(d):.1f} GB/s", file=sys.stderr, flush=True)
            rows.append((name, run([os.path.join(ROOT, a.build, "bench", "decode"), d, "--threads", str(a.threads),
                                    "--prompt", str(a.prompt_8b), "--new", str(a.new_8b)], env)))
        except subprocess.CalledProcessError as e:
            print(f"{name}: {' '.join(e.cmd[:2])} failed (exit {e.returncode}); skipping it", file=sys.stderr)
            failed += 1
    print(f"JetMoE-8B layout (random weights, {a.synthetic}): prompt {a.prompt_8b}, {a.new_8b} new, "
          f"{a.threads} threads")
    print(f"  {'weights':8} {'kernels':9} {'MB/token':>9} {'GB/s':>6} {'roofline':>9} {'decode':>8} {'ratio':>6} "
          f"{'prefill':>8} {'open s':>7} {'RSS GB':>7}")
    print(f"  {'':8} {'':9} {'':>9} {'':>6} {'tok/s':>9} {'tok/s':>8} {'':>6} {'tok/s':>8}")
    for name, r in rows:
        print(f"  {r['weight_type']:8} {r['kernels']:9} {r['active_weight_bytes'] / 1e6:9.0f} "
              f"{r['bandwidth_gbs']:6.1f} {r['roofline_tok_s']:9.3f} {r['decode_tok_s']:8.3f} {r['ratio']:6.0%} "
              f"{r['prefill_tok_s']:8.2f} {r['open_s']:7.1f} {r['peak_rss_mb'] / 1024:7.1f}")
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build", default="build")
    ap.add_argument("--synthetic", default=os.path.join(ROOT, "build", "synthetic-8b"),
                    help="where the 8B-layout checkpoints live (bf16/, q8/, q4/)")
    ap.add_argument("--skip-8b", action="store_true", help="only the small config against PyTorch")
    ap.add_argument("--prompt-8b", type=int, default=512)
    ap.add_argument("--new-8b", type=int, default=16)
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    load_note()
    small(a, env)
    return 1 if not a.skip_8b and big(a, env) else 0


if __name__ == "__main__":
    sys.exit(main())
