#!/usr/bin/python3
"""PyTorch peers of bench/eval: multiple-choice scoring of a generic task file in fp32.

  bench/eval_torch.py MODEL TOKENIZER TASK.jsonl --jetmoe BIN [--threads 2] [--warmup 1] [--iters 1]
                      [--ways reference,padded,cached]
(a warm-up pass scores the first 4 examples only)

The texts are tokenized once, before any timing (tests/ref/eval_ref.py's token rule through
`jetmoe tokenizer encode --json`); each way then times only the model and the log-softmax:
  reference  tests/ref/eval_ref.py's score() as written: one jetmoe_ref.forward per
             (context, choice) sequence, the context recomputed for every choice
  padded     the same function, an example's choices right-padded into one [choices, T]
             forward (the context still computed once per choice, in one batch)
  cached     the context once: [BOS] + context but its last token prefilled into a KV cache
             (bench/decode_ref.py's CachedDecoder, the reference's math), then per choice the
             last context token + the continuation in one call at that position, every row's
             logits - what jm_eval_run does on one slot
One JSON line per way: examples/s of the median, the times, and the summed log-likelihood of
every choice (the driver compares it with C's).
"""

import argparse
import json
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from forward_ref import size_thread_pools  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("tokenizer")
    ap.add_argument("task")
    ap.add_argument("--jetmoe", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--ways", default="reference,padded,cached")
    a = ap.parse_args()
    size_thread_pools(a.threads)
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(BENCH, "..", "tests", "ref"))
    import decode_ref
    import eval_ref
    import jetmoe_ref
    decode_ref.torch, decode_ref.F, decode_ref.ref = torch, F, jetmoe_ref  # its globals, set by its main()
    torch.set_num_threads(a.threads)

    class Scorer(decode_ref.CachedDecoder):
        def rows(self, tokens, pos):
            """CachedDecoder.infer with every row's logits: (n, V)."""
            c, P, eps, k = self.cfg, self.P, self.cfg["rms_norm_eps"], self.cfg["num_experts_per_tok"]
            x = self.emb.index_select(0, tokens)
            for i in range(c["num_hidden_layers"]):
                p = "model.layers.%d." % i
                h = jetmoe_ref.rmsnorm(x, P[p + "input_layernorm.weight"], eps)
                idx, gates = decode_ref.route(h, P[p + "self_attention.experts.router.layer.weight"], k)
                x = x + self.moa(i, p, h, idx, gates, pos)
                h = jetmoe_ref.rmsnorm(x, P[p + "post_attention_layernorm.weight"], eps)
                idx, gates = decode_ref.route(h, P[p + "mlp.router.layer.weight"], k)
                Fw = c["intermediate_size"]
                u = decode_ref.per_slot(h, idx, P[p + "mlp.input_linear.weight"])
                x = x + decode_ref.combine(F.silu(u[:, :Fw]) * u[:, Fw:], idx, gates,
                                           P[p + "mlp.output_linear.weight"]) + P[p + "mlp.bias"]
            return decode_ref.linear(jetmoe_ref.rmsnorm(x, P["model.norm.weight"], eps), self.lm_head)

    cfg, params = jetmoe_ref.load_checkpoint(a.model)
    ex = eval_ref.read_task(a.task)
    bos = cfg["bos_token_id"]
    texts = sorted({t for e in ex for ch in e["choices"] for t in
                    (lambda c, x: (c, c + x))(*eval_ref.split_pair(e["context"], ch))})
    ids = dict(zip(texts, eval_ref.Tokenizer(a.jetmoe, a.tokenizer).encode(texts)))

    def encode(ts):
        return [ids[t] for t in ts]

    pairs = eval_ref._all_pairs(ex, encode)
    longest = max(1 + len(c) + len(x) for row in pairs for c, x in row)

    def cached(ex, pairs):
        dec = Scorer(cfg, params, longest)
        total = 0.0
        for row in pairs:
            prompt = [bos] + row[0][0]
            assert all(c == row[0][0] for c, _ in row), "one context per example"
            dec.rows(torch.tensor(prompt[:-1]), 0)
            for _, cont in row:
                lg = dec.rows(torch.tensor(prompt[-1:] + cont[:-1]), len(prompt) - 1)
                total += float(torch.log_softmax(lg, dim=-1)[torch.arange(len(cont)), torch.tensor(cont)].sum())
        return total

    def by_score(way):
        return lambda ex, pairs: sum(sum(r["loglik"]) for r in eval_ref.score(cfg, params, ex, encode, bos,
                                                                                dtype=torch.float32, way=way))

    fns = {"reference": by_score("one"), "padded": by_score("padded"), "cached": cached}
    for way in a.ways.split(","):
        with torch.inference_mode():
            for _ in range(a.warmup):  # on the first 4 examples: warm, without paying a whole pass
                fns[way](ex[:4], pairs[:4])
            times, total = [], 0.0
            for _ in range(a.iters):
                t0 = time.perf_counter()
                total = fns[way](ex, pairs)
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(json.dumps({"impl": "pytorch-" + way, "examples": len(ex), "choices": sum(len(r) for r in pairs),
                          "threads": a.threads, "median_s": med, "examples_per_s": len(ex) / med,
                          "loglik_sum": total, "times": times, "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
