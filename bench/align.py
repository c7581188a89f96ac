#!/usr/bin/python3
"""Alignment benchmark: tokens/s of one SFT and one DPO optimizer step
(forward + backward, no optimizer) of the C code against PyTorch, on the bench
config (bench/common.h), the same weights, records and threads, in one run.
Prints figures; never passes or fails.

  bench/align.py [--threads 2] [--iters 5] [--warmup 1] [--sft-records 16] [--dpo-pairs 8]
                 [--beta 0.1] [--bucket 4] [--seed 0] [--build build] [--keep DIR]

The model: common.h's bench config (written by build/bench/decode
--bench-config), a random fp32 checkpoint from `jetmoe init`. The records,
pre-tokenized, from --seed: SFT, records of 100-400 random tokens, the first
half of each masked (labels -100, a prompt) and the rest learned; DPO, pairs of
a 50-150-token prompt and two 50-250-token completions, with reference
log-probs precomputed (float64, by the PyTorch reference, from a perturbed copy
of the model made by tests/ref/align_ref.py perturb) and given to both sides.

Timed, each after --warmup untimed steps, the median of --iters (tokens/s, the
ratios) beside the fastest step ("best s": how far other work spread them):
  C                  build/bench/align: jm_sft_set_grads / jm_dpo_set_grads, the
                     step `jetmoe sft|dpo --dump-grad` runs (the sequences packed
                     into rows of max_len 2048, one micro-batch), after jm_zero_grad
  PyTorch reference  bench/align_torch.py: tests/ref/align_ref.py's own
                     sft_loss / dpo_loss + autograd backward, in float32 - the
                     straightforward reference (one forward per sequence), not
                     an optimized fused PyTorch trainer
  PyTorch padded     the same objective as one forward over a right-padded
                     [B, T] batch, masked
  PyTorch bucketed   the same in padded batches of --bucket sequences sorted
                     by length (little padding): with padded, the fairer figures
Both sides run in the same environment: OMP_NUM_THREADS and
OPENBLAS_NUM_THREADS = --threads, OMP_WAIT_POLICY=PASSIVE and a short OpenBLAS
spin (bench/forward_ref.py's), and a glibc malloc that keeps freed memory
(GLIBC_TUNABLES: PyTorch's CPU allocator would otherwise fault its big tensors
in afresh every step); values already in the environment are kept.
tokens/s counts every token of every sequence a step runs through the model
(prompts included, DPO's twice; padding not, though every side computes its
padding: C's packed rows are padded to the longest row). A C step includes
jm_zero_grad; a PyTorch step sets the gradients to None. The losses of all
four are printed with their relative differences to C's: the same computation
is measured.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from forward_ref import size_thread_pools  # noqa: E402
from run_bench import cpu_model, json_lines, load_note  # noqa: E402

PY = "/usr/bin/python3"
SHARED_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT",
              "OPENBLAS_CORETYPE", "GLIBC_TUNABLES")


def run(cmd, env):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    return json_lines(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True).stdout)


def write_jsonl(path, recs):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    return path


def make_records(a, vocab):
    g = random.Random(a.seed)

    def ids(lo, hi):
        return [g.randrange(vocab) for _ in range(g.randint(lo, hi))]

    sft = []
    for _ in range(a.sft_records):
        x = ids(100, 400)
        sft.append({"input_ids": x, "labels": [-100] * (len(x) // 2) + x[len(x) // 2:]})
    dpo = [{"prompt_input_ids": ids(50, 150), "chosen_input_ids": ids(50, 250), "rejected_input_ids": ids(50, 250)}
           for _ in range(a.dpo_pairs)]
    return sft, dpo


def rel(x, y):
    return abs(x - y) / max(abs(y), 1e-30)


WAYS = (("c", "C (jetmoe, packed rows)"), ("pytorch-reference", "PyTorch reference (align_ref)"),
        ("pytorch-padded", "PyTorch, one padded batch"), ("pytorch-bucketed", "PyTorch, length-bucketed"))


def report(what, rows, detail):
    """rows: impl -> its JSON result. Prints the table -> the summary's entry."""
    for r in rows.values():
        r["median"] = statistics.median(r["times"])
        r["tokens_per_s"] = r["tokens"] / r["median"]
    c = rows["c"]
    best = max((r for k, r in rows.items() if k != "c"), key=lambda r: r["tokens_per_s"])
    print(f"{what}: {detail}")
    print(f"  {'':32} {'tokens/s':>9} {'s/step':>8} {'best s':>8} {'C is':>7}  {'loss':>11}  {'vs C':>8}")
    for impl, name in WAYS:
        r = rows[impl]
        ratio = "" if r is c else f"{c['tokens_per_s'] / r['tokens_per_s']:6.2f}x"
        diff = "" if r is c else f"{rel(r['loss'], c['loss']):8.1e}"
        print(f"  {name:32} {r['tokens_per_s']:9.1f} {r['median']:8.3f} {min(r['times']):8.3f} {ratio:>7}  "
              f"{r['loss']:11.7f}  {diff:>8}")
    ratio = c["tokens_per_s"] / best["tokens_per_s"]
    print(f"  C / the fastest PyTorch way ({dict(WAYS)[best['impl']]}): {ratio:.2f}x", flush=True)
    out = {"what": what, "tokens": c["tokens"]}
    for impl, _ in WAYS:
        out[impl] = {"tokens_per_s": round(rows[impl]["tokens_per_s"], 1), "median_s": round(rows[impl]["median"], 4),
                     "times": rows[impl]["times"]}
        if impl != "c":
            out[impl]["loss_rel_diff"] = rel(rows[impl]["loss"], c["loss"])
    out["c_over_fastest_pytorch"] = round(ratio, 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sft-records", type=int, default=16)
    ap.add_argument("--dpo-pairs", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--bucket", type=int, default=4, help="sequences per padded batch of the length-bucketed way")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build", default="build")
    ap.add_argument("--keep", default="", help="write the model, records and reference log-probs here, and keep them")
    a = ap.parse_args()
    # one environment for both sides: the thread pools sized to --threads and waiting passively, as the
    # PyTorch peers want them (bench/forward_ref.py says why; under load, spinning OpenMP workers slow C ~1.7x too)
    size_thread_pools(a.threads)
    # glibc's malloc keeps what is freed (no mmap, no trim): PyTorch's CPU allocator otherwise maps and faults
    # in ~3 GB afresh every step here (a quarter to a third of its time in the kernel) - what a trainer avoids with
    # jemalloc or tcmalloc; C carves its arenas once and does not notice
    os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736")
    env = dict(os.environ)
    load_note()
    build = os.path.join(ROOT, a.build)
    with tempfile.TemporaryDirectory(prefix="jetmoe-align-") as td:
        d = a.keep or td
        os.makedirs(d, exist_ok=True)
        cfg_path, model, ref = (os.path.join(d, n) for n in ("config.json", "model", "ref_model"))
        # the config comes from bench/common.h by way of the C bench, so there is one copy of it
        subprocess.run([os.path.join(build, "bench", "decode"), "--bench-config", cfg_path], check=True)
        subprocess.run([os.path.join(build, "jetmoe"), "init", model, "--config", cfg_path, "--seed", "1",
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        with open(cfg_path) as f:
            cfg = json.load(f)
        sft, dpo = make_records(a, cfg["vocab_size"])
        data = {"sft": write_jsonl(os.path.join(d, "sft.jsonl"), sft),
                "dpo": write_jsonl(os.path.join(d, "dpo.jsonl"), dpo)}
        ref_logps = os.path.join(d, "ref_logps.txt")
        subprocess.run([PY, os.path.join(ROOT, "tests", "ref", "align_ref.py"), "perturb", model, "--out", ref,
                        "--scale", "0.05", "--seed", "2"], check=True)
        subprocess.run([PY, os.path.join(ROOT, "bench", "align_torch.py"), "ref-logps", ref, data["dpo"],
                        "--out", ref_logps, "--threads", str(a.threads)], check=True, env=env)
        common = ["--threads", str(a.threads), "--warmup", str(a.warmup), "--iters", str(a.iters)]
        dpo_flags = ["--ref-logps", ref_logps, "--beta", str(a.beta)]
        res = {}
        for what in ("sft", "dpo"):
            flags = common + (dpo_flags if what == "dpo" else [])
            rows = run([os.path.join(build, "bench", "align"), what, model, data[what]] + flags, env)
            rows += run([PY, os.path.join(ROOT, "bench", "align_torch.py"), what, model, data[what],
                         "--bucket", str(a.bucket)] + flags, env)
            res[what] = {r["impl"]: r for r in rows}
            if len({r["tokens"] for r in rows}) != 1:  # the same tokens on every side, or nothing is compared
                print(f"note: {what}: the sides count different tokens: {[r['tokens'] for r in rows]}")

    c, ref = res["sft"]["c"], res["sft"]["pytorch-reference"]
    print(f"bench/align: one optimizer step's forward + backward (no optimizer), fp32, {a.threads} threads; "
          f"median of {a.iters} after {a.warmup} warm-up")
    print(f"  CPU: {cpu_model()}; load average over the last 5 minutes {os.getloadavg()[1]:.1f} "
          f"(more than 0 is other work sharing the cores)")
    print("  both sides: " + ", ".join(f"{v}={env[v]}" for v in SHARED_ENV if v in env))
    print(f"  model: bench config (vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, "
          f"{cfg['num_hidden_layers']} layers, {cfg['num_key_value_heads']} KV heads x {cfg['kv_channels']}, "
          f"FFN {cfg['intermediate_size']}, {cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}), "
          f"random init")
    print(f"  C: {c['blas']} (OpenMP build), core {c['blas_core']}; the rest of the step our own loops "
          f"(-O3 -march=native)")
    print(f"  PyTorch {ref['torch']}: BLAS {ref['blas']}; ATen CPU kernels {ref['aten_cpu']}")
    print("  'PyTorch reference' is tests/ref/align_ref.py as written (one forward per sequence): the")
    print("  straightforward reference, not an optimized fused PyTorch trainer. 'one padded batch' is the")
    print("  same objective as one masked forward over a right-padded [B, T] batch; 'length-bucketed' the")
    print(f"  same in batches of {a.bucket} sequences sorted by length (little padding): the fairer figures.")

    def shape(r):
        n = sum(b * t for b, t in r["batches"])
        return f"{' + '.join('%dx%d' % tuple(b) for b in r['batches'])} ({1 - r['tokens'] / n:.0%} padding)"

    summary = []
    for what, title in (("sft", "SFT"), ("dpo", "DPO")):
        rows = res[what]
        c = rows["c"]
        if what == "sft":
            detail = f"{len(sft)} records, {c['tokens']} tokens ({c['loss_tokens']} learned)"
        else:
            detail = (f"{len(dpo)} pairs (beta {a.beta}), {c['tokens']} tokens in {c['sequences']} sequences "
                      f"({c['loss_tokens']} in completions), reference log-probs precomputed")
        detail += (f"; C packs them into {shape(dict(c, batches=[[c['rows'], c['row_len']]]))}; PyTorch padded "
                   f"{shape(rows['pytorch-padded'])}, bucketed {shape(rows['pytorch-bucketed'])}")
        summary.append(report(title, rows, detail))
    print(json.dumps({"bench": "align", "cpu": cpu_model(), "threads": a.threads, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
