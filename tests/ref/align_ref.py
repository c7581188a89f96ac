#!/usr/bin/python3
"""Independent PyTorch reference for the alignment objectives (SFT and DPO).

Written from the task's statement of the semantics and jetmoe-spec.md, on top
of jetmoe_ref.forward (one sequence at a time: every record, every DPO
sequence, is its own sequence with positions from 0 and attention to itself
only). Values are computed in float64; gradients by autograd.

Records (pre-tokenized only):
  SFT  {"input_ids": [...], "labels": [...]}   HF convention: labels aligned
       with input_ids, -100 = no loss, logits at t predict labels[t+1]
       (labels[0] is never a target); labels absent = labels are input_ids.
  DPO  {"prompt_input_ids": [...], "chosen_input_ids": [...],
        "rejected_input_ids": [...]}   each sequence = prompt + completion;
       log pi(c) = sum over completion tokens of log p(token | all before it).

Objectives (router losses pooled over ALL tokens of ALL policy sequences,
per router, then summed over the 2L routers, as jetmoe_ref.router_losses):
  SFT  ce_loss = sum of -log p over loss tokens / number of loss tokens
       loss = ce_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss
  DPO  delta = beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))
       pair = -(1 - eps) log sigmoid(delta) - eps log sigmoid(-delta)
       dpo_loss = mean over pairs; loss = dpo_loss + coefs * (aux, z)
       ref log-probs from the reference model, without gradient.

Module API
  sft_loss(cfg, params, records)                          -> dict of 0-d tensors
  dpo_loss(cfg, params, ref_params, records, beta, eps)   -> dict of 0-d tensors
      (ref_params None: the policy's own weights, detached)
  read_records(path, kind, vocab)                         -> list of dicts
  selftest() -> bool

CLI (writes loss, aux_loss, z_loss, ce_loss | dpo_loss as [1] F32 and
grad.<HF name> for every parameter, like `jetmoe sft|dpo --dump-grad`)
  align_ref.py sft DIR --data F.jsonl --dump OUT.safetensors
  align_ref.py dpo DIR --data F.jsonl --dump OUT.safetensors [--ref DIR] [--beta B]
                   [--label-smoothing E]
  align_ref.py perturb DIR --out DIR2 [--scale S] [--seed N]   a nearby F32 checkpoint
  align_ref.py batch JOBS.jsonl   several of the above (or jetmoe_ref.py commands) in one
                   process, which pays torch's import once: each line {"id": ..., "argv": [...],
                   "tool": "align_ref" | "jetmoe_ref"}; prints one JSON line per job, in order:
                   {"id", "rc", "stdout", "stderr"}
  align_ref.py selftest
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jetmoe_ref as jr  # noqa: E402  (tests/ref/jetmoe_ref.py)

F64 = torch.float64
IGNORE = -100

# ----------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------


def _ids(v, what, vocab, allow_ignore=False):
    if not isinstance(v, list) or not v:
        raise ValueError("%s must be a non-empty list of token ids" % what)
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError("%s holds %r, not an integer" % (what, x))
        if not (0 <= x < vocab) and not (allow_ignore and x == IGNORE):
            raise ValueError("%s holds %d, outside [0, %d)" % (what, x, vocab))
    return list(v)


def check_sft_record(rec, vocab, where="record"):
    """-> (ids, labels) with labels filled in when absent."""
    ids = _ids(rec.get("input_ids"), where + ": input_ids", vocab)
    labels = rec.get("labels")
    if labels is None:
        return ids, list(ids)
    labels = _ids(labels, where + ": labels", vocab, allow_ignore=True)
    if len(labels) != len(ids):
        raise ValueError("%s: labels has %d entries, input_ids %d" % (where, len(labels), len(ids)))
    return ids, labels


def check_dpo_record(rec, vocab, where="record"):
    """-> (prompt, chosen, rejected) id lists (each non-empty)."""
    return tuple(_ids(rec.get(k), "%s: %s" % (where, k), vocab)
                 for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))


def read_records(path, kind, vocab):
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = "%s:%d" % (path, n)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as ex:
                raise ValueError("%s: bad JSON (%s)" % (where, ex)) from None
            if not isinstance(rec, dict):
                raise ValueError("%s: not a JSON object" % where)
            (check_sft_record if kind == "sft" else check_dpo_record)(rec, vocab, where)
            out.append(rec)
    if not out:
        raise ValueError("%s: no records" % path)
    return out


# ----------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------


def _as64(params):
    return {n: (t if t.dtype == F64 else t.to(F64)) for n, t in params.items()}


def _run(cfg, P, ids):
    """One sequence alone (positions 0..T-1): (T, V) log-probs and the forward dict."""
    if len(ids) > cfg["max_position_embeddings"]:
        raise ValueError("a sequence of %d tokens is longer than max_position_embeddings %d"
                         % (len(ids), cfg["max_position_embeddings"]))
    o = jr.forward(cfg, P, torch.tensor([ids], dtype=torch.long), dtype=F64)
    return torch.log_softmax(o["logits"][0], dim=-1), o


def pooled_router_losses(cfg, outs):
    """aux_loss, z_loss: per router, jetmoe_ref.router_losses over the tokens of
    every sequence in outs together; summed over the 2L routers."""
    E = cfg["num_local_experts"]
    aux = torch.zeros((), dtype=F64)
    zl = torch.zeros((), dtype=F64)
    for i in range(cfg["num_hidden_layers"]):
        for m in range(2):  # 0 = MoA router, 1 = MoE router
            z = torch.cat([o["router_logits"][i][m] for o in outs])
            idx = torch.cat([o["routing"][i][m] for o in outs])
            s, q = jr.router_losses(z, idx, E)
            aux = aux + s
            zl = zl + q
    return aux, zl


def router_margin(cfg, outs):
    """Smallest gap between the k-th and (k+1)-th router logit over every token
    and router (inf when k == E): how close the batch is to a routing flip."""
    k, E = cfg["num_experts_per_tok"], cfg["num_local_experts"]
    if k >= E:
        return math.inf
    best = math.inf
    for o in outs:
        for pair in o["router_logits"]:
            for z in pair:
                top = torch.topk(z.detach(), k + 1, dim=-1)[0]
                best = min(best, float((top[:, k - 1] - top[:, k]).min()))
    return best


def sft_loss(cfg, params, records, _outs=None):
    """-> {loss, ce_loss, aux_loss, z_loss} (0-d float64 tensors, differentiable
    w.r.t. params), plus n_loss_tokens (int)."""
    P = _as64(params)
    nll = torch.zeros((), dtype=F64)
    n = 0
    outs = []
    for r, rec in enumerate(records):
        ids, labels = check_sft_record(rec, cfg["vocab_size"], "record %d" % r)
        lp, o = _run(cfg, P, ids)
        outs.append(o)
        tgt = torch.tensor(labels[1:], dtype=torch.long)   # target of position t = labels[t + 1]
        keep = torch.nonzero(tgt != IGNORE).reshape(-1)
        if keep.numel():
            nll = nll - lp[keep, tgt[keep]].sum()
            n += int(keep.numel())
    if n == 0:
        raise ValueError("no loss tokens in the records")
    ce = nll / n
    aux, zl = pooled_router_losses(cfg, outs)
    if _outs is not None:
        _outs.extend(outs)
    return {"loss": ce + cfg["aux_loss_coef"] * aux + cfg["z_loss_coef"] * zl,
            "ce_loss": ce, "aux_loss": aux, "z_loss": zl, "n_loss_tokens": n}


def completion_logp(cfg, P, prompt, completion):
    """log pi(completion | prompt) of one sequence, and its forward dict."""
    lp, o = _run(cfg, P, list(prompt) + list(completion))
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return lp[rows, torch.tensor(completion, dtype=torch.long)].sum(), o


def dpo_loss(cfg, params, ref_params, records, beta=0.1, eps=0.0, ref_cfg=None, _outs=None):
    """-> {loss, dpo_loss, aux_loss, z_loss} (0-d float64 tensors) and delta
    (per-pair tensor). ref_params None: the policy itself, without gradient."""
    P = _as64(params)
    if ref_params is None:
        R = {n: t.detach() for n, t in P.items()}
    else:
        R = {n: t.detach() for n, t in _as64(ref_params).items()}
    rcfg = ref_cfg or cfg
    outs, deltas = [], []
    for r, rec in enumerate(records):
        prompt, chosen, rejected = check_dpo_record(rec, cfg["vocab_size"], "record %d" % r)
        with torch.no_grad():
            ref_c, _ = completion_logp(rcfg, R, prompt, chosen)
            ref_r, _ = completion_logp(rcfg, R, prompt, rejected)
        pol_c, oc = completion_logp(cfg, P, prompt, chosen)
        pol_r, orj = completion_logp(cfg, P, prompt, rejected)
        outs += [oc, orj]
        deltas.append(beta * ((pol_c - ref_c) - (pol_r - ref_r)))
    delta = torch.stack(deltas)
    pair = -(1.0 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
    dl = pair.mean()
    aux, zl = pooled_router_losses(cfg, outs)
    if _outs is not None:
        _outs.extend(outs)
    return {"loss": dl + cfg["aux_loss_coef"] * aux + cfg["z_loss_coef"] * zl,
            "dpo_loss": dl, "aux_loss": aux, "z_loss": zl, "delta": delta}


# ----------------------------------------------------------------------------
# Self-test: the reference against itself, in ways that can fail
# ----------------------------------------------------------------------------

_CFG = {"vocab_size": 48, "hidden_size": 24, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "kv_channels": 6, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 64, "aux_loss_coef": 0.05, "z_loss_coef": 0.01}


def _rand_ids(g, n, V):
    return torch.randint(0, V, (n,), generator=g).tolist()


def selftest(verbose=True):
    results = []

    def check(name, ok, detail=""):
        results.append(bool(ok))
        if verbose:
            print("%s align_ref_selftest_%s%s" % ("PASS" if ok else "FAIL", name,
                                                 (" (" + detail + ")") if detail else ""))
            sys.stdout.flush()

    def rel(a, b):
        a, b = float(a), float(b)
        return abs(a - b) / max(abs(b), 1e-300)

    cfg = jr.normalize_config(_CFG)
    V = cfg["vocab_size"]
    prm = {n: t.double() for n, t in jr.init_params(cfg, 21, perturb=True).items()}
    ref = {n: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
           for i, (n, t) in enumerate(prm.items())}
    g = torch.Generator().manual_seed(4)

    # (a) one record, labels absent == jetmoe_ref.forward's loss_total (and its gradient);
    #     two equal-length records == forward on the (2, T) batch (pooled router losses)
    ids = _rand_ids(g, 13, V)
    leaf = {n: t.clone().requires_grad_(True) for n, t in prm.items()}
    s = sft_loss(cfg, leaf, [{"input_ids": ids}])
    s["loss"].backward()
    ga = {n: t.grad.clone() for n, t in leaf.items()}
    leaf = {n: t.clone().requires_grad_(True) for n, t in prm.items()}
    o = jr.forward(cfg, leaf, torch.tensor([ids]), dtype=F64)
    o["loss_total"].backward()
    gerr = max(float((ga[n] - t.grad).norm() / t.grad.norm().clamp_min(1e-300)) for n, t in leaf.items())
    e1 = rel(s["loss"], o["loss_total"])
    check("sft_one_record_is_forward", e1 < 1e-12 and gerr < 1e-10, "loss rel %.1e, grad rel %.1e" % (e1, gerr))
    ids2 = _rand_ids(g, 13, V)
    s = sft_loss(cfg, prm, [{"input_ids": ids}, {"input_ids": ids2, "labels": ids2}])
    o = jr.forward(cfg, prm, torch.tensor([ids, ids2]), dtype=F64)
    errs = [rel(s[a], o[b]) for a, b in (("loss", "loss_total"), ("ce_loss", "loss"),
                                         ("aux_loss", "aux_loss"), ("z_loss", "z_loss"))]
    check("sft_two_records_is_batch_forward", max(errs) < 1e-12, "max rel %.1e" % max(errs))

    # pooled, not per sequence: the batch's aux differs from the sum of per-record aux
    s1 = sft_loss(cfg, prm, [{"input_ids": ids}])
    s2 = sft_loss(cfg, prm, [{"input_ids": ids2}])
    d = abs(float(s["aux_loss"]) - float(s1["aux_loss"] + s2["aux_loss"]))
    check("router_losses_pooled_not_summed", d > 1e-3, "differ by %.2e" % d)

    # the CE mean is over the loss tokens of the whole file, not a mean of record means
    recs = [{"input_ids": _rand_ids(g, n, V)} for n in (4, 19)]
    recs[1]["labels"] = [IGNORE] * 6 + recs[1]["input_ids"][6:]
    parts = [sft_loss(cfg, prm, [r]) for r in recs]
    both = sft_loss(cfg, prm, recs)
    want = sum(float(p["ce_loss"]) * p["n_loss_tokens"] for p in parts) / sum(p["n_loss_tokens"] for p in parts)
    mean_of_means = sum(float(p["ce_loss"]) for p in parts) / 2
    check("sft_mean_over_all_loss_tokens", rel(both["ce_loss"], want) < 1e-12 and
          abs(want - mean_of_means) > 1e-3 and both["n_loss_tokens"] == 3 + 13,
          "%d loss tokens, token mean %.6f vs mean of means %.6f" % (both["n_loss_tokens"], want, mean_of_means))

    # record order does not matter
    rv = sft_loss(cfg, prm, recs[::-1])
    check("sft_order_invariant", max(rel(rv[k], both[k]) for k in ("loss", "aux_loss", "z_loss")) < 1e-12)

    # (d) masking: labels[0] is never a target; the -100 labels' positions give no CE;
    #     the last token, when unlabelled, only changes the router losses
    r0 = {"input_ids": recs[1]["input_ids"], "labels": list(recs[1]["labels"])}
    r0["labels"][0] = r0["input_ids"][0]
    a = sft_loss(cfg, prm, [recs[0], r0])
    check("sft_first_label_ignored", all(float(a[k]) == float(both[k]) for k in ("loss", "ce_loss")))
    lp1 = torch.log_softmax(jr.forward(cfg, prm, torch.tensor([r0["input_ids"]]), dtype=F64)["logits"][0], -1)
    manual = -sum(float(lp1[t - 1, r0["input_ids"][t]]) for t in range(6, 19)) / 13
    check("sft_prompt_span_masked", rel(sft_loss(cfg, prm, [recs[1]])["ce_loss"], manual) < 1e-12,
          "CE of tokens 6..18 only")
    last = dict(r0, labels=r0["labels"][:-1] + [IGNORE])
    ch = dict(last, input_ids=last["input_ids"][:-1] + [(last["input_ids"][-1] + 1) % V])
    a, b = sft_loss(cfg, prm, [recs[0], last]), sft_loss(cfg, prm, [recs[0], ch])
    d_ce, d_aux = abs(float(a["ce_loss"] - b["ce_loss"])), abs(float(a["aux_loss"] - b["aux_loss"]))
    d_z = abs(float(a["z_loss"] - b["z_loss"]))
    check("sft_unlabelled_last_token_only_routes", d_ce == 0.0 and d_z > 0,
          "ce diff %.1e, aux diff %.1e, z diff %.1e" % (d_ce, d_aux, d_z))
    # a record without loss tokens changes the router losses only
    nolab = {"input_ids": _rand_ids(g, 9, V), "labels": [IGNORE] * 9}
    c = sft_loss(cfg, prm, recs + [nolab])
    check("sft_no_loss_record_only_routes", float(c["ce_loss"]) == float(both["ce_loss"]) and
          abs(float(c["z_loss"] - both["z_loss"])) > 0)

    # DPO records
    pairs = []
    for lp_, lc, lr in ((3, 5, 2), (1, 1, 4), (7, 3, 6)):
        pr = _rand_ids(g, lp_, V)
        pairs.append({"prompt_input_ids": pr, "chosen_input_ids": _rand_ids(g, lc, V),
                      "rejected_input_ids": _rand_ids(g, lr, V)})

    # log pi(c) equals jetmoe_ref.forward's masked CE times the completion length
    pr, cc = pairs[2]["prompt_input_ids"], pairs[2]["chosen_input_ids"]
    lab = [IGNORE] * len(pr) + cc
    o = jr.forward(cfg, prm, torch.tensor([pr + cc]), labels=torch.tensor([lab]), dtype=F64)
    lpc, _ = completion_logp(cfg, prm, pr, cc)
    check("dpo_logp_is_masked_forward_ce", rel(-lpc, o["loss"] * len(cc)) < 1e-12)

    # reference = policy: delta == 0, dpo_loss == log 2 for any eps
    d0 = dpo_loss(cfg, prm, None, pairs, 0.1, 0.3)
    check("dpo_self_reference_is_log2", float(d0["delta"].abs().max()) == 0.0 and
          rel(d0["dpo_loss"], math.log(2)) < 1e-15)

    # (c) eps = 0.5 is symmetric in chosen/rejected (eps = 0 is not); router losses too
    swapped = [dict(p, chosen_input_ids=p["rejected_input_ids"], rejected_input_ids=p["chosen_input_ids"])
               for p in pairs]
    h1, h2 = dpo_loss(cfg, prm, ref, pairs, 0.5, 0.5), dpo_loss(cfg, prm, ref, swapped, 0.5, 0.5)
    n1, n2 = dpo_loss(cfg, prm, ref, pairs, 0.5, 0.0), dpo_loss(cfg, prm, ref, swapped, 0.5, 0.0)
    check("dpo_label_smoothing_half_symmetric",
          max(rel(h1[k], h2[k]) for k in ("loss", "dpo_loss", "aux_loss", "z_loss")) < 1e-12 and
          rel(n1["dpo_loss"], n2["dpo_loss"]) > 1e-3 and float(h1["delta"].abs().min()) > 1e-3,
          "eps 0: %.6f vs %.6f swapped" % (float(n1["dpo_loss"]), float(n2["dpo_loss"])))

    # DPO loss by hand from the four log-probs of one pair
    p = pairs[0]
    lc = float(completion_logp(cfg, prm, p["prompt_input_ids"], p["chosen_input_ids"])[0])
    lr_ = float(completion_logp(cfg, prm, p["prompt_input_ids"], p["rejected_input_ids"])[0])
    rc = float(completion_logp(cfg, ref, p["prompt_input_ids"], p["chosen_input_ids"])[0])
    rr = float(completion_logp(cfg, ref, p["prompt_input_ids"], p["rejected_input_ids"])[0])
    dlt = 0.3 * ((lc - rc) - (lr_ - rr))
    want = -(0.8) * math.log(1 / (1 + math.exp(-dlt))) - 0.2 * math.log(1 / (1 + math.exp(dlt)))
    got = dpo_loss(cfg, prm, ref, [p], 0.3, 0.2)
    aux1, z1 = pooled_router_losses(cfg, [completion_logp(cfg, prm, p["prompt_input_ids"], c)[1]
                                          for c in (p["chosen_input_ids"], p["rejected_input_ids"])])
    wtot = want + cfg["aux_loss_coef"] * float(aux1) + cfg["z_loss_coef"] * float(z1)
    check("dpo_loss_by_hand", rel(got["dpo_loss"], want) < 1e-12 and rel(got["loss"], wtot) < 1e-12,
          "delta %.4f" % dlt)

    # (b) central finite difference of the DPO total along a random direction vs autograd
    gd = torch.Generator().manual_seed(8)
    direc = {n: torch.randn(t.shape, generator=gd, dtype=F64) for n, t in prm.items()}
    norm = math.sqrt(sum(float((v * v).sum()) for v in direc.values()))
    direc = {n: v / norm for n, v in direc.items()}
    leaf = {n: t.clone().requires_grad_(True) for n, t in prm.items()}
    rleaf = {n: t.clone().requires_grad_(True) for n, t in ref.items()}
    tot = dpo_loss(cfg, leaf, rleaf, pairs, 0.3, 0.1)["loss"]
    tot.backward()
    dd = sum(float((leaf[n].grad * direc[n]).sum()) for n in prm)
    hstep = 1e-5
    fp = float(dpo_loss(cfg, {n: t + hstep * direc[n] for n, t in prm.items()}, ref, pairs, 0.3, 0.1)["loss"])
    fm = float(dpo_loss(cfg, {n: t - hstep * direc[n] for n, t in prm.items()}, ref, pairs, 0.3, 0.1)["loss"])
    fd = (fp - fm) / (2 * hstep)
    check("dpo_finite_difference", rel(fd, dd) < 1e-6 and abs(dd) > 1e-3,
          "autograd %.9f, central difference %.9f, rel %.1e" % (dd, fd, rel(fd, dd)))
    # the reference model gets no gradient; the tied embedding is one parameter
    check("dpo_ref_gets_no_grad", all(t.grad is None for t in rleaf.values()) and
          "lm_head.weight" not in leaf and float(leaf["model.embed_tokens.weight"].grad.abs().sum()) > 0)

    nfail = results.count(False)
    if verbose:
        print("align_ref_selftest: %d passed, %d failed" % (len(results) - nfail, nfail))
    return nfail == 0


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def _dump(path, vals, leaf, kind):
    out = {}
    for k in ("loss", "aux_loss", "z_loss", "ce_loss" if kind == "sft" else "dpo_loss"):
        out[k] = vals[k].detach().float().reshape(1).numpy()
    for n, t in leaf.items():
        gr = t.grad if t.grad is not None else torch.zeros_like(t)
        out["grad." + n] = gr.float().numpy()
    jr.write_safetensors(path, out)


def _cmd_objective(args):
    cfg, params = jr.load_checkpoint(args.dir)
    records = read_records(args.data, args.cmd, cfg["vocab_size"])
    leaf = {n: t.to(F64).requires_grad_(True) for n, t in params.items()}
    outs = []
    if args.cmd == "sft":
        vals = sft_loss(cfg, leaf, records, _outs=outs)
        extra = "ce_loss %.8f loss_tokens %d" % (float(vals["ce_loss"]), vals["n_loss_tokens"])
    else:
        rcfg, rparams = (jr.load_checkpoint(args.ref) if args.ref else (cfg, None))
        if rcfg["vocab_size"] != cfg["vocab_size"]:
            raise ValueError("--ref %s: vocab_size %d differs from the policy's %d"
                             % (args.ref, rcfg["vocab_size"], cfg["vocab_size"]))
        vals = dpo_loss(cfg, leaf, rparams, records, args.beta, args.label_smoothing, ref_cfg=rcfg, _outs=outs)
        dl = vals["delta"].detach()
        extra = "dpo_loss %.8f pairs %d delta_min %.6f delta_max %.6f" % (
            float(vals["dpo_loss"]), dl.numel(), float(dl.min()), float(dl.max()))
    vals["loss"].backward()
    _dump(args.dump, vals, leaf, args.cmd)
    print("loss %.8f aux_loss %.8f z_loss %.8f %s router_margin %.3e" % (
        float(vals["loss"]), float(vals["aux_loss"]), float(vals["z_loss"]), extra, router_margin(cfg, outs)))
    return 0


def _cmd_perturb(args):
    """A nearby checkpoint (a DPO reference): every tensor + scale * rms(tensor) * N(0,1), F32."""
    cfg, params = jr.load_checkpoint(args.dir)
    g = torch.Generator().manual_seed(args.seed)
    out = {}
    for n, t in params.items():
        rms = float(t.pow(2).mean().sqrt())
        out[n] = t + args.scale * max(rms, 1e-3) * torch.randn(t.shape, generator=g, dtype=t.dtype)
    cfg = dict(cfg)
    cfg.pop("torch_dtype", None)
    jr.save_checkpoint(args.out, cfg, out, dtype="F32")
    return 0


def _cmd_batch(args):
    return jr.run_batch(args.jobs, main)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="align_ref.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for kind in ("sft", "dpo"):
        s = sub.add_parser(kind, help="the %s objective's value and gradient of every parameter" % kind.upper())
        s.add_argument("dir")
        s.add_argument("--data", required=True, help="pre-tokenized JSONL records")
        s.add_argument("--dump", required=True)
        if kind == "dpo":
            s.add_argument("--ref", default="", help="reference model (default: the policy checkpoint)")
            s.add_argument("--beta", type=float, default=0.1)
            s.add_argument("--label-smoothing", type=float, default=0.0)
    p = sub.add_parser("perturb", help="write a nearby F32 checkpoint")
    p.add_argument("dir")
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("batch", help="run several commands in one process (JSON lines in, JSON lines out)")
    b.add_argument("jobs")
    sub.add_parser("selftest", help="the reference checked against itself")
    args = ap.parse_args(argv)
    try:
        if args.cmd in ("sft", "dpo"):
            return _cmd_objective(args)
        if args.cmd == "perturb":
            return _cmd_perturb(args)
        if args.cmd == "batch":
            return _cmd_batch(args)
        return 0 if selftest() else 1
    except (jr.ConfigError, ValueError, FileNotFoundError) as ex:
        print("align_ref: %s" % ex, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
