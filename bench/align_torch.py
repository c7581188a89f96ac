#!/usr/bin/python3
"""Benchmark peer of bench/align: one SFT or DPO optimizer step's forward and
backward in PyTorch, float32, timed three ways on the same records.

  reference  tests/ref/align_ref.py's own sft_loss / dpo_loss, and autograd's
             backward: the straightforward reference - each record (each DPO
             sequence) its own forward, one after another - not an optimized
             fused PyTorch trainer. The reference computes in float64; here its
             module constant F64 is set to float32, so the same code runs in fp32.
  padded     the same objective batched: one jetmoe_ref.forward over every
             sequence right-padded into one [B, T] batch (causal attention
             keeps the padding out of the real tokens), the log-probs masked,
             the router losses over the real tokens only.
  bucketed   the same as padded, in batches of --bucket sequences sorted by
             length (HF's group_by_length), so that little is padding; the
             router losses pooled over all the batches, as one step does.

  bench/align_torch.py sft MODEL DATA.jsonl [--threads 2] [--warmup 1] [--iters 5]
  bench/align_torch.py dpo MODEL DATA.jsonl --ref-logps FILE [--beta 0.1] [--label-smoothing 0] [...]
  bench/align_torch.py ref-logps REF_MODEL DATA.jsonl --out FILE

DPO's reference log-probs are precomputed (as `jetmoe dpo` caches them; the
ref-logps command writes them, in float64, one number a line, each pair's
chosen then rejected): align_ref.dpo_loss's own no-grad calls for them are
answered from FILE, so only the policy's work is timed. A step is: the
gradients set to None, the loss, backward. Prints one JSON line per way:
{"impl": "pytorch-" + way, "what", "times", "loss", ...}.
"""
import argparse
import ctypes
import json
import os
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "tests", "ref"))
from forward_ref import size_thread_pools  # noqa: E402


def blas_in_process():
    """What this process multiplies with: the BLAS libraries mapped into it
    and, for OpenBLAS, the build and the kernel core it chose for this CPU."""
    libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if "blas" in l.split()[-1].lower()})
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
            lib.openblas_get_config.restype = lib.openblas_get_corename.restype = ctypes.c_char_p
            return "%s, core %s (%s)" % (lib.openblas_get_config().decode(), lib.openblas_get_corename().decode(),
                                         os.path.dirname(path))
        except (OSError, AttributeError):
            continue
    return ", ".join(libs) or "no BLAS library mapped"


def aten_capability():
    for line in torch.__config__.show().splitlines():
        if "CPU capability usage" in line:
            return line.split(":", 1)[1].strip()
    return "?"


def pad(rows, value):
    """Lists of ids -> (B, T) LongTensor right-padded with value, and the (B, T) mask of real tokens."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    real = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        real[i, :len(r)] = True
    return out, real


def batches(seqs, targets, size):
    """Sequences (and their per-position targets, -100 = none) as padded batches
    of up to size sequences, sorted by length so that each holds little padding
    (size >= len(seqs): one batch, in order). -> [(indices, tokens, targets, real)]"""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if size < len(seqs) else list(range(len(seqs)))
    out = []
    for k in range(0, len(order), size):
        g = order[k:k + size]
        tok, real = pad([seqs[i] for i in g], 0)
        tgt, _ = pad([targets[i] for i in g], ar.IGNORE)
        out.append((g, tok, tgt, real))
    return out


def real_tokens(o, real):
    """A padded forward's routing and router logits on its real tokens only, for align_ref.pooled_router_losses."""
    keep = real.reshape(-1)
    return {key: [tuple(t[keep] for t in pair) for pair in o[key]] for key in ("router_logits", "routing")}


def sequence_logps(cfg, params, group, outs):
    """Forward of the padded batches -> each sequence's summed log p(target), in
    the sequences' order; outs receives the real tokens' routing."""
    lp = {}
    for g, tok, tgt, real in group:
        o = jr.forward(cfg, params, tok, labels=torch.full_like(tok, ar.IGNORE))  # its own CE: one sum
        B, T = tok.shape
        tok_lp = -F.cross_entropy(o["logits"].reshape(B * T, -1), tgt.reshape(-1), ignore_index=ar.IGNORE,
                                  reduction="none")
        lp.update(zip(g, tok_lp.view(B, T).sum(1)))
        outs.append(real_tokens(o, real))
    return torch.stack([lp[i] for i in range(len(lp))])


def shapes(group):
    return [list(tok.shape) for _, tok, _, _ in group]


def sft_steps(cfg, params, recs, size):
    """-> (reference step, padded step, the padded batches' shapes): each step
    returns the loss after its backward."""
    def reference():
        out = ar.sft_loss(cfg, params, recs)
        out["loss"].backward()
        return float(out["loss"])

    ids, labels = zip(*(ar.check_sft_record(r, cfg["vocab_size"]) for r in recs))
    # HF's shift: position t predicts labels[t + 1]
    group = batches(ids, [list(lab[1:]) + [ar.IGNORE] for lab in labels], size)
    n = sum(int((tgt != ar.IGNORE).sum()) for _, _, tgt, _ in group)

    def padded():
        outs = []
        nll = -sequence_logps(cfg, params, group, outs).sum()
        aux, zl = ar.pooled_router_losses(cfg, outs)
        loss = nll / n + cfg["aux_loss_coef"] * aux + cfg["z_loss_coef"] * zl
        loss.backward()
        return float(loss)

    return reference, padded, shapes(group)


def precomputed_reference(cfg, recs, ref_logps):
    """align_ref.dpo_loss runs the reference model itself, under no_grad; from
    here on its no-grad calls of completion_logp are answered from ref_logps."""
    table = {}
    for i, rec in enumerate(recs):
        p, c, r = ar.check_dpo_record(rec, cfg["vocab_size"])
        table[(tuple(p), tuple(c))] = ref_logps[2 * i]
        table[(tuple(p), tuple(r))] = ref_logps[2 * i + 1]
    policy_logp = ar.completion_logp

    def completion_logp(cfg_, P, prompt, completion):
        if torch.is_grad_enabled():
            return policy_logp(cfg_, P, prompt, completion)
        return torch.tensor(table[(tuple(prompt), tuple(completion))], dtype=ar.F64), None

    ar.completion_logp = completion_logp


def dpo_steps(cfg, params, recs, ref_logps, beta, eps, size):
    def reference():
        out = ar.dpo_loss(cfg, params, None, recs, beta, eps)
        out["loss"].backward()
        return float(out["loss"])

    seqs, tgts = [], []
    for rec in recs:
        p, c, r = ar.check_dpo_record(rec, cfg["vocab_size"])
        for comp in (c, r):  # 2i chosen, 2i+1 rejected; position t predicts ids[t+1] on the completion
            ids = list(p) + list(comp)
            seqs.append(ids)
            tgts.append([ids[t + 1] if t + 1 >= len(p) else ar.IGNORE for t in range(len(ids) - 1)] + [ar.IGNORE])
    group = batches(seqs, tgts, size)
    ref = torch.tensor(ref_logps, dtype=torch.float32).view(-1, 2)

    def padded():
        outs = []
        pol = sequence_logps(cfg, params, group, outs).view(-1, 2)
        delta = beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
        dl = (-(1.0 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)).mean()  # as align_ref.dpo_loss
        aux, zl = ar.pooled_router_losses(cfg, outs)
        loss = dl + cfg["aux_loss_coef"] * aux + cfg["z_loss_coef"] * zl
        loss.backward()
        return float(loss)

    return reference, padded, shapes(group)


def timed(step, params, warmup, iters):
    """-> (seconds of each timed step, the last loss)."""
    times, loss = [], None
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        for p in params.values():
            p.grad = None
        loss = step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, loss


def write_ref_logps(a):
    """The reference model's summed completion log-probs of every pair, float64."""
    cfg, params = jr.load_checkpoint(a.model)
    P = {n: t.double() for n, t in params.items()}
    out = []
    with torch.no_grad():
        for rec in ar.read_records(a.data, "dpo", cfg["vocab_size"]):
            p, c, r = ar.check_dpo_record(rec, cfg["vocab_size"])
            out += [float(ar.completion_logp(cfg, P, p, c)[0]), float(ar.completion_logp(cfg, P, p, r)[0])]
    with open(a.out, "w") as f:
        f.write("".join("%.17g\n" % v for v in out))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("sft", "dpo", "ref-logps"))
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ref-logps", default="")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--out", default="", help="ref-logps: where to write them")
    ap.add_argument("--ways", default="reference,padded,bucketed",
                    help="which of reference, padded (one batch), bucketed (batches of --bucket), comma-separated")
    ap.add_argument("--bucket", type=int, default=4, help="sequences per padded batch of the bucketed way")
    a = ap.parse_args()

    size_thread_pools(a.threads)  # before torch loads (bench/forward_ref.py says why)
    global torch, F, jr, ar
    import torch
    import torch.nn.functional as F
    import jetmoe_ref as jr
    import align_ref as ar
    torch.set_num_threads(a.threads)
    if a.what == "ref-logps":
        return write_ref_logps(a)

    cfg, params = jr.load_checkpoint(a.model)
    params = {n: t.float().requires_grad_(True) for n, t in params.items()}
    recs = ar.read_records(a.data, a.what, cfg["vocab_size"])
    ar.F64 = torch.float32  # the reference's own code, in fp32 (its dtype is this module constant)
    if a.what == "dpo":
        with open(a.ref_logps) as f:
            ref_logps = [float(l) for l in f if l.strip()]
        tokens = sum(2 * len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"])
                     for r in recs)
        nseq = 2 * len(recs)
        precomputed_reference(cfg, recs, ref_logps)
    else:
        tokens, nseq = sum(len(r["input_ids"]) for r in recs), len(recs)

    def steps(size):
        if a.what == "sft":
            return sft_steps(cfg, params, recs, size)
        return dpo_steps(cfg, params, recs, ref_logps, a.beta, a.label_smoothing, size)

    common = {"what": a.what, "threads": a.threads, "tokens": tokens, "warmup": a.warmup, "torch": torch.__version__,
              "blas": blas_in_process(), "aten_cpu": aten_capability()}
    for way in a.ways.split(","):
        reference, padded, batch_shapes = steps(a.bucket if way == "bucketed" else nseq)
        times, loss = timed(reference if way == "reference" else padded, params, a.warmup, a.iters)
        extra = {} if way == "reference" else {"batches": batch_shapes}
        print(json.dumps(dict(common, impl="pytorch-" + way, loss=loss, times=times, **extra)), flush=True)
        med = sorted(times)[len(times) // 2]
        print("pytorch %s %s: %.3f s/step (median of %d), %.0f tokens/s, loss %.7f"
              % (way, a.what, med, len(times), tokens / med, loss), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
