#!/usr/bin/python3
"""Evaluation benchmark: examples/s of multiple-choice scoring (`jetmoe eval --task`) in C,
with and without prefix reuse, against PyTorch doing the same scoring, on the bench config
(bench/common.h), the same weights, task and threads. Prints figures; never passes or fails.

  bench/eval.py [--threads 2] [--examples 64] [--iters 3] [--warmup 1] [--torch-iters 1] [--seed 0]
                [--build build] [--keep DIR]

The model: common.h's bench config (vocab 32000; written by build/bench/decode --bench-config),
a random fp32 checkpoint from `jetmoe init`. The tokenizer: Llama-2's (../shared/fixtures) when
present, else one of 8000 pieces trained on /usr/share/common-licenses. The task: --examples
generic multiple-choice records of 4 choices, each context ~110 words of license prose
(~150 tokens), each choice 4-11 words (~5-15 tokens), from --seed.

Timed, all fp32: C the median of --iters after --warmup whole passes; PyTorch the median of
--torch-iters after a warm-up pass over 4 examples:
  C default          build/bench/eval: jm_eval_run as `jetmoe eval` calls it: each context
                     prefilled once, the choices read it from the cache, 4 slots side by side
  C one-by-one       jm_eval_run with one_by_one: every (context, choice) from an empty cache
  jetmoe eval (CLI)  the command's wall time, opening the model and the tokenizer included
  PyTorch reference  tests/ref/eval_ref.py's score(): one jetmoe_ref.forward per (context,
                     choice) - the straightforward way
  PyTorch padded     an example's 4 choices as one right-padded forward
  PyTorch cached     the context once into a KV cache (bench/decode_ref.py's CachedDecoder), each
                     choice's tokens in one call after it: the fairest peer of C default
PyTorch's tokenization is done before its timing; C's is inside jm_eval_run (all of it).
The summed log-likelihood of all choices is printed beside each: the same work is measured.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from forward_ref import size_thread_pools  # noqa: E402
from run_bench import cpu_model, json_lines, load_note  # noqa: E402

PY = "/usr/bin/python3"
LLAMA2 = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "llama2-tokenizer", "tokenizer.model")


def prose_words():
    lic = "/usr/share/common-licenses"
    text = "".join(open(os.path.join(lic, f), errors="replace").read() for f in sorted(os.listdir(lic))
                   if os.path.isfile(os.path.join(lic, f)))
    return "".join(c if " " <= c <= "~" else " " for c in text).split()


def make_task(words, n, seed):
    g = random.Random(seed)

    def span(k):
        i = g.randrange(len(words) - k)
        return " ".join(words[i:i + k])

    return [{"context": span(110) + (" " if i % 3 == 0 else ""), "choices": [
        (" " if i % 3 else "") + span(g.randint(4, 11)) for _ in range(4)], "gold": g.randrange(4)} for i in range(n)]


def run(cmd, env):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    return json_lines(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True).stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--torch-iters", type=int, default=1, help="PyTorch passes timed (each a minute or more)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build", default="build")
    ap.add_argument("--keep", default="", help="write the model, tokenizer and task here, and keep them")
    a = ap.parse_args()
    size_thread_pools(a.threads)  # one environment for both sides (bench/align.py says why)
    os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736")
    env = dict(os.environ)
    load_note()
    build = os.path.join(ROOT, a.build)
    jetmoe = os.path.join(build, "jetmoe")
    with tempfile.TemporaryDirectory(prefix="jetmoe-eval-") as td:
        d = a.keep or td
        os.makedirs(d, exist_ok=True)
        cfg_path, model = os.path.join(d, "config.json"), os.path.join(d, "model")
        subprocess.run([os.path.join(build, "bench", "decode"), "--bench-config", cfg_path], check=True)
        subprocess.run([jetmoe, "init", model, "--config", cfg_path, "--seed", "1", "--overwrite"], check=True,
                       stdout=subprocess.DEVNULL)
        words = prose_words()
        if os.path.exists(LLAMA2):
            tok, tok_name = LLAMA2, "Llama-2's tokenizer.model (32000 pieces)"
        else:
            text = os.path.join(d, "prose.txt")
            with open(text, "w") as f:
                f.write(" ".join(words))
            tok, tok_name = os.path.join(d, "tok"), "a tokenizer of 8000 pieces trained on the licenses"
            subprocess.run([jetmoe, "tokenizer", "train", "--input", text, "--vocab-size", "8000", "--out", tok,
                            "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        task = os.path.join(d, "task.jsonl")
        recs = make_task(words, a.examples, a.seed)
        with open(task, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs))
        # token counts, by the rule: enc(context without trailing spaces), enc(context + choice)
        texts = [t for r in recs for t in [r["context"].rstrip(" ")] + [r["context"] + c for c in r["choices"]]]
        enc = subprocess.run([jetmoe, "tokenizer", "encode", "--json", "--model", tok], check=True, text=True,
                             capture_output=True, input="".join(json.dumps(t) + "\n" for t in texts)).stdout
        lens = [len(l.split()) for l in enc.splitlines()]
        ctx_tok = [lens[i * 5] for i in range(len(recs))]
        cont_tok = [lens[i * 5 + 1 + j] - lens[i * 5] for i in range(len(recs)) for j in range(4)]

        common = ["--threads", str(a.threads), "--warmup", str(a.warmup), "--iters", str(a.iters)]
        rows = {r["impl"]: r for r in run([os.path.join(build, "bench", "eval"), model, tok, task] + common, env)}
        cli_times = []
        for i in range(a.warmup + a.iters):
            t0 = time.perf_counter()
            subprocess.run([jetmoe, "eval", model, "--task", task, "--tokenizer", tok, "--threads", str(a.threads),
                            "--quiet"], check=True, stdout=subprocess.DEVNULL, env=env)
            if i >= a.warmup:
                cli_times.append(time.perf_counter() - t0)
        med = statistics.median(cli_times)
        rows["cli"] = {"impl": "cli", "median_s": med, "examples_per_s": len(recs) / med, "times": cli_times}
        for r in run([PY, os.path.join(ROOT, "bench", "eval_torch.py"), model, tok, task, "--jetmoe", jetmoe,
                      "--threads", str(a.threads), "--warmup", "1", "--iters", str(a.torch_iters)], env):
            rows[r["impl"]] = r

    c = rows["c-default"]
    print(f"bench/eval: multiple-choice scoring, fp32, {a.threads} threads; C: median of {a.iters} after {a.warmup} "
          f"warm-up; PyTorch: median of {a.torch_iters}")
    print(f"  CPU: {cpu_model()}; load average over the last 5 minutes {os.getloadavg()[1]:.1f} "
          f"(more than 0 is other work sharing the cores)")
    print(f"  model: bench config (bench/common.h), random init; tokenizer: {tok_name}")
    print(f"  task: {len(recs)} examples x 4 choices; context {min(ctx_tok)}-{max(ctx_tok)} tokens "
          f"(mean {statistics.mean(ctx_tok):.0f}), continuation {min(cont_tok)}-{max(cont_tok)} "
          f"(mean {statistics.mean(cont_tok):.1f}); one sequence alone reads ~"
          f"{1 + statistics.mean(ctx_tok) + statistics.mean(cont_tok):.0f} tokens")
    names = [("c-default", "C default (prefix reuse, 4 slots)"), ("c-one_by_one", "C one-by-one (empty cache)"),
             ("cli", "jetmoe eval (CLI wall, with load)"), ("pytorch-reference", "PyTorch reference (eval_ref)"),
             ("pytorch-padded", "PyTorch, choices padded"), ("pytorch-cached", "PyTorch, context cached")]
    print(f"  {'':36} {'examples/s':>10} {'s':>8} {'C default is':>12}  {'loglik sum':>14} {'vs C':>8}")
    out = []
    for key, name in names:
        r = rows.get(key)
        if not r:
            continue
        ratio = "" if r is c else f"{c['examples_per_s'] / r['examples_per_s']:11.2f}x"
        ll = f"{r['loglik_sum']:14.4f}" if "loglik_sum" in r else ""
        diff = f"{abs(r['loglik_sum'] - c['loglik_sum']) / abs(c['loglik_sum']):8.1e}" \
            if "loglik_sum" in r and r is not c else ""
        print(f"  {name:36} {r['examples_per_s']:10.2f} {r['median_s']:8.3f} {ratio:>12}  {ll:>14} {diff:>8}")
        out.append({"impl": key, "examples_per_s": round(r["examples_per_s"], 3), "median_s": round(r["median_s"], 4),
                    "times": r["times"]})
    print(f"  prefix reuse: C default / C one-by-one = "
          f"{c['examples_per_s'] / rows['c-one_by_one']['examples_per_s']:.2f}x; C default / the fastest PyTorch "
          f"= {c['examples_per_s'] / max(r['examples_per_s'] for k, r in rows.items() if k.startswith('pytorch')):.2f}x")
    print(json.dumps({"bench": "eval", "cpu": cpu_model(), "threads": a.threads, "examples": len(recs),
                      "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
