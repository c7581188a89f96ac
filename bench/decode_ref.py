#!/usr/bin/python3
"""Benchmark peer of bench/decode: KV-cached greedy decoding in PyTorch.

  python3 bench/decode_ref.py DIR [--threads 2] [--prompt 512] [--new 32] [--warmup 32] [--check]

Loads DIR in fp32 with the reference's loader (tests/ref/jetmoe_ref.py) and
decodes exactly as bench/decode does: the same prompt ids, a short warm-up
prefill, one timed prefill pass that fills the cache, then --new greedy steps
of one token each that reuse the cached K and V. Prints a summary on stderr
and one JSON line on stdout, with the greedy ids so that the driver can
compare them with the C decode. --check also compares the cached decode's
logits with the reference's full (uncached) forward of the same sequence.
"""

import argparse
import json
import math
import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def bench_tokens(n, vocab):
    """bench/common.h's prompt: (i * 2654435761) mod 2^32 mod vocab."""
    return [(i * 2654435761) % (1 << 32) % vocab for i in range(n)]


class CachedDecoder:
    """The spec's forward over n new tokens at positions pos..pos+n-1, with
    the keys (after RoPE) and values of earlier positions from the cache.
    The math is the reference's (its rmsnorm, apply_rope, rope tables and
    expert grouping); only the order of work differs."""

    def __init__(self, cfg, params, ctx):
        self.cfg, self.P = cfg, params
        L, Hkv, D = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["kv_channels"]
        self.cos, self.sin = ref.rope_cos_sin(ctx, D, cfg["rope_theta"], torch.float32)
        self.k_cache = torch.zeros(L, Hkv, ctx, D)
        self.v_cache = torch.zeros(L, Hkv, ctx, D)
        self.emb = params["model.embed_tokens.weight"]
        self.lm_head = self.emb if cfg["tie_word_embeddings"] else params["lm_head.weight"]

    def infer(self, tokens, pos):
        """tokens: LongTensor (n,) -> the last token's logits (V,)."""
        c, P, eps, k = self.cfg, self.P, self.cfg["rms_norm_eps"], self.cfg["num_experts_per_tok"]
        x = self.emb.index_select(0, tokens)
        for i in range(c["num_hidden_layers"]):
            p = "model.layers.%d." % i
            a = ref.rmsnorm(x, P[p + "input_layernorm.weight"], eps)
            idx, gates = route(a, P[p + "self_attention.experts.router.layer.weight"], k)
            x = x + self.moa(i, p, a, idx, gates, pos)
            b = ref.rmsnorm(x, P[p + "post_attention_layernorm.weight"], eps)
            idx, gates = route(b, P[p + "mlp.router.layer.weight"], k)
            Fw = c["intermediate_size"]
            u = per_slot(b, idx, P[p + "mlp.input_linear.weight"])
            h = F.silu(u[:, :Fw]) * u[:, Fw:]
            x = x + combine(h, idx, gates, P[p + "mlp.output_linear.weight"]) + P[p + "mlp.bias"]
        h = ref.rmsnorm(x[-1:], P["model.norm.weight"], eps)
        return linear(h, self.lm_head)[0]

    def moa(self, layer, p, a, idx, gates, pos):
        c, P = self.cfg, self.P
        n, k = idx.shape
        Hkv, D = c["num_key_value_heads"], c["kv_channels"]
        A, T = Hkv * D, pos + n
        cos, sin = self.cos[pos:T], self.sin[pos:T]                  # (n, D/2)
        kv = linear(a, P[p + "self_attention.kv_proj.weight"])       # (n, 2A)
        K = ref.apply_rope(kv[:, :A].reshape(n, Hkv, D), cos[:, None], sin[:, None])
        self.k_cache[layer, :, pos:T] = K.transpose(0, 1)
        self.v_cache[layer, :, pos:T] = kv[:, A:].reshape(n, Hkv, D).transpose(0, 1)
        Q = per_slot(a, idx, P[p + "self_attention.experts.input_linear.weight"])  # (n*k, A)
        Q = ref.apply_rope(Q.reshape(n, k, Hkv, D), cos[:, None, None], sin[:, None, None])
        # query head (j, h) attends with KV head h: slots fold into the query axis
        Qh = Q.permute(2, 1, 0, 3).reshape(Hkv, k * n, D)            # row j*n + t
        s = torch.matmul(Qh, self.k_cache[layer, :, :T].transpose(1, 2)) * (1.0 / math.sqrt(D))
        if n > 1:  # query t (position pos+t) sees keys s <= pos+t
            future = torch.arange(T)[None, :] > (pos + torch.arange(n))[:, None]
            s = s.masked_fill(future.repeat(k, 1), float("-inf"))
        O = torch.matmul(torch.softmax(s, dim=-1), self.v_cache[layer, :, :T])  # (Hkv, k*n, D)
        O = O.reshape(Hkv, k, n, D).permute(2, 1, 0, 3).reshape(n * k, A)       # row t*k + j
        return combine(O, idx, gates, P[p + "self_attention.experts.output_linear.weight"]) + \
            P[p + "self_attention.experts.bias"]


def linear(x, w):
    """x (n, in) @ w (out, in)^T. One row goes through torch.mv (BLAS gemv):
    F.linear on one row is a GEMM and measured 2-6x slower here."""
    return torch.mv(w, x[0])[None] if x.shape[0] == 1 else F.linear(x, w)


def route(a, w, k):
    """ref.route without the logits: top-k (ties to the lower index) and softmax gates."""
    z = linear(a, w)
    idx = torch.sort(-z, dim=-1, stable=True)[1][:, :k]
    return idx, torch.softmax(torch.gather(z, 1, idx), dim=-1)


def per_slot(x, idx, w):
    """x (n, in), idx (n, k), w (E, out, in) -> (n*k, out): row t*k+j = w[idx[t, j]] x[t]."""
    n, k = idx.shape
    if n == 1:  # a decode step: k matrix-vector products, no grouping
        return torch.stack([torch.mv(w[e], x[0]) for e in idx[0].tolist()])
    out = x.new_empty(n * k, w.shape[1])
    for e, pos, tok in ref._groups(idx, w.shape[0]):  # one GEMM per expert
        out[pos] = F.linear(x.index_select(0, tok), w[e])
    return out


def combine(y, idx, gates, w):
    """y (n*k, in) rows t*k+j -> (n, out): sum over j of gates[t, j] * w[idx[t, j]] y[t*k+j]."""
    n, k = idx.shape
    if n == 1:
        return sum(g * torch.mv(w[e], y[j]) for j, (e, g) in enumerate(zip(idx[0].tolist(), gates[0])))[None]
    out = y.new_zeros(n, w.shape[1])
    g = gates.reshape(-1)
    for e, pos, tok in ref._groups(idx, w.shape[0]):
        out.index_add_(0, tok, F.linear(y.index_select(0, pos), w[e]) * g.index_select(0, pos)[:, None])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--check", action="store_true", help="compare with the uncached reference forward")
    a = ap.parse_args()

    # Thread pools are sized when the libraries load; see bench/forward_ref.py for
    # why OpenMP waits passively and OpenBLAS spins only briefly.
    sys.path.insert(0, BENCH_DIR)
    from forward_ref import size_thread_pools
    size_thread_pools(a.threads)
    global torch, F, ref
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(BENCH_DIR, "..", "tests", "ref"))
    import jetmoe_ref as ref
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    cfg, params = ref.load_checkpoint(a.dir)
    open_s = time.perf_counter() - t0
    V = cfg["vocab_size"]
    prompt = torch.tensor(bench_tokens(a.prompt, V), dtype=torch.long)
    with torch.inference_mode():
        dec = CachedDecoder(cfg, params, a.prompt + a.new)
        if a.warmup:
            dec.infer(prompt[:min(a.warmup, a.prompt)], 0)  # as bench/decode does
        t0 = time.perf_counter()
        logits = dec.infer(prompt, 0)
        prefill_s = time.perf_counter() - t0
        first_logits = logits
        ids = [int(torch.argmax(logits))]  # the first maximum: lowest id on ties, like the C argmax
        steps = []
        for i in range(a.new):
            t0 = time.perf_counter()
            logits = dec.infer(torch.tensor([ids[i]]), a.prompt + i)
            ids.append(int(torch.argmax(logits)))
            steps.append(time.perf_counter() - t0)
        res = {"impl": "pytorch", "what": "decode", "threads": a.threads, "prompt": a.prompt, "new": a.new,
               "open_s": open_s, "prefill_s": prefill_s, "prefill_tok_s": a.prompt / prefill_s,
               "decode_tok_s": (len(steps) - 1) / sum(steps[1:]) if len(steps) > 1 else 1 / steps[0],
               "decode_tok_s_all": len(steps) / sum(steps), "first_step_s": steps[0],
               "torch": torch.__version__, "ids": ids}
        if a.check:
            # The whole sequence through the uncached reference: its logits at the
            # prompt's last position and at the last fed token are the ones we decoded from.
            seq = torch.cat((prompt, torch.tensor(ids[:-1], dtype=torch.long)))
            full = ref.forward(cfg, params, seq[None])["logits"][0]
            res["check_max_abs_diff"] = max(float((full[a.prompt - 1] - first_logits).abs().max()),
                                            float((full[-1] - logits).abs().max()))
            res["check_greedy_agrees"] = full[a.prompt - 1:].argmax(-1).tolist() == ids
    print("%s: pytorch %s fp32, %d threads\n"
          "  prefill  %d tokens in %.2f s = %.1f tokens/s\n"
          "  decode   %d tokens: %.2f tokens/s (%.2f with the first step), %.1f ms/token"
          % (a.dir, torch.__version__, a.threads, a.prompt, prefill_s, res["prefill_tok_s"], a.new,
             res["decode_tok_s"], res["decode_tok_s_all"], 1e3 / res["decode_tok_s"]), file=sys.stderr)
    if a.check:
        print("  check    max |logits - uncached reference| = %.2e, greedy ids agree: %s"
              % (res["check_max_abs_diff"], res["check_greedy_agrees"]), file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
