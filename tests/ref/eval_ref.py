#!/usr/bin/python3
"""Independent PyTorch reference for multiple-choice scoring (`jetmoe eval --task`).

Written from the statement of the rule, on top of jetmoe_ref.forward (each
(context, choice) pair its own sequence, positions from 0, in float64). Only
the tokenizer is the C one (`jetmoe tokenizer encode --json`: text -> ids,
no BOS); the rule that turns texts into the scored tokens is done here.

Task files: the generic layout only, one JSON object a line
  {"context": str, "choices": [str, ...], "gold": int}
(blank lines skipped; line numbers are the file's, 1-based).

The token rule, per (context, choice):
  context' = context without its trailing whitespace (ASCII, as the harness'
  rstrip()), choice' = that whitespace + choice; ctx = enc(context'), cont = enc(context' + choice')[len(ctx):]
  (so the continuation is what the whole text adds, not enc(choice)); the model
  reads [BOS] + ctx + cont and the choice's score is
  loglik = sum over the cont tokens of log p(token | everything before it).
  pred = argmax(loglik), pred_norm = argmax(loglik / bytes of the choice text as
  written, UTF-8), ties to the first (np.argmax). acc = mean(pred == gold),
  acc_norm = mean(pred_norm == gold), each with stderr = sample standard
  deviation (n - 1) / sqrt(n).

Module API
  read_task(path) -> [{"context", "choices", "gold", "line"}]
  split_pair(context, choice) -> (context', choice')        the spaces moved
  pair_tokens(encode, context, choice) -> (ctx ids, cont ids)
  Tokenizer(jetmoe, model).encode(texts) -> [[ids], ...]     one CLI process for all texts
  score(cfg, params, examples, encode, bos, dtype=float64, way="one", act=identity) -> [per-example dict]
      way "one": one forward per (context, choice) sequence (the reference);
      way "padded": an example's choices as one right-padded [nchoices, T] forward
      (equal up to rounding: causal attention and per-token routing never look right)
  metrics(results) -> {"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
  selftest() -> bool

CLI
  eval_ref.py score DIR --task F.jsonl --tokenizer TOK --jetmoe BIN --out PER_EXAMPLE.jsonl
                    [--limit N] [--bos ID] [--float32] [--padded]
      per example one line {"loglik": [...], "pred", "pred_norm", "gold", "line",
      "ctx_tokens", "cont_tokens": [...]}; the metrics as JSON on stdout.
      --bos: default the model's config.json bos_token_id.
  eval_ref.py batch JOBS.jsonl   several commands in one process (align_ref.py's format:
                    {"id", "argv", "tool": "eval_ref" | "jetmoe_ref"} in, {"id", "rc", "stdout", "stderr"} out)
  eval_ref.py selftest
"""

import argparse
import json
import math
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jetmoe_ref as jr  # noqa: E402  (tests/ref/jetmoe_ref.py)

F64 = torch.float64

# ----------------------------------------------------------------------------
# Task files and the token rule
# ----------------------------------------------------------------------------


def read_task(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = "%s:%d" % (path, n)
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("%s: not a JSON object" % where)
            ctx, ch, gold = rec.get("context"), rec.get("choices"), rec.get("gold")
            if not isinstance(ctx, str):
                raise ValueError("%s: \"context\" is not a string" % where)
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                raise ValueError("%s: \"choices\" is not a list of at least 2 non-empty strings" % where)
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(ch):
                raise ValueError("%s: \"gold\" is not an index into the choices" % where)
            out.append({"context": ctx, "choices": list(ch), "gold": gold, "line": n})
    if not out:
        raise ValueError("%s: no records" % path)
    return out


def split_pair(context, choice):
    """The context's trailing whitespace moves to the front of the choice (the
    harness' context.rstrip(), for ASCII whitespace)."""
    kept = context.rstrip(" \t\n\v\f\r")
    return kept, context[len(kept):] + choice


def pair_tokens(encode, context, choice):
    """encode: list of texts -> list of id lists. -> (ctx ids, cont ids)."""
    c, x = split_pair(context, choice)
    ctx, whole = encode([c, c + x])
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError("the choice %r adds no token after its context" % choice[:40])
    return ctx, cont


class Tokenizer:
    """`jetmoe tokenizer encode --json --model MODEL`: one process per encode() call."""

    def __init__(self, jetmoe, model):
        self.cmd = [jetmoe, "tokenizer", "encode", "--json", "--model", model]

    def encode(self, texts):
        inp = "".join(json.dumps(t, ensure_ascii=True) + "\n" for t in texts)
        p = subprocess.run(self.cmd, input=inp, capture_output=True, text=True)
        if p.returncode != 0:
            raise ValueError("tokenizer encode failed (%d): %s" % (p.returncode, p.stderr.strip()[-300:]))
        lines = p.stdout.split("\n")
        if len(lines) != len(texts) + 1 or lines[-1] != "":
            raise ValueError("tokenizer encode gave %d lines for %d texts" % (len(lines) - 1, len(texts)))
        return [[int(x) for x in line.split()] for line in lines[:-1]]


def _all_pairs(examples, encode):
    """Every (context, choice)'s (ctx, cont), the texts encoded in one call."""
    texts = []
    for e in examples:
        for ch in e["choices"]:
            c, x = split_pair(e["context"], ch)
            texts += [c, c + x]
    ids = encode(texts)
    pairs, k = [], 0
    for e in examples:
        row = []
        for ch in e["choices"]:
            ctx, whole = ids[k], ids[k + 1]
            k += 2
            if not whole[len(ctx):]:
                raise ValueError("line %d: the choice %r adds no token after its context" % (e["line"], ch[:40]))
            row.append((ctx, whole[len(ctx):]))
        pairs.append(row)
    return pairs


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------


def _check_fits(cfg, n):
    if n - 1 > cfg["max_position_embeddings"]:
        raise ValueError("a sequence of %d tokens (%d fed) is longer than max_position_embeddings %d"
                         % (n, n - 1, cfg["max_position_embeddings"]))


def choice_loglik(cfg, P, bos, ctx, cont, dtype=F64, act=jr._same):
    seq = [bos] + list(ctx) + list(cont)
    _check_fits(cfg, len(seq))
    lp = torch.log_softmax(jr.forward(cfg, P, torch.tensor([seq]), dtype=dtype, act=act)["logits"][0], dim=-1)
    rows = torch.arange(len(ctx), len(ctx) + len(cont))  # row t predicts seq[t + 1]
    return float(lp[rows, torch.tensor(cont)].sum())


def _padded_logliks(cfg, P, bos, row, dtype, act=jr._same):
    """One example's choices right-padded (with token 0) into one forward."""
    seqs = [[bos] + list(c) + list(x) for c, x in row]
    T = max(len(s) for s in seqs)
    for s in seqs:
        _check_fits(cfg, len(s))
    toks = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    lp = torch.log_softmax(jr.forward(cfg, P, toks, dtype=dtype, act=act)["logits"], dim=-1)
    out = []
    for b, (c, x) in enumerate(row):
        rows = torch.arange(len(c), len(c) + len(x))
        out.append(float(lp[b, rows, torch.tensor(x)].sum()))
    return out


def _argmax(v):
    best = 0
    for i in range(1, len(v)):
        if v[i] > v[best]:
            best = i
    return best


def decide(e, loglik):
    """-> (pred, pred_norm) of one example from its choices' logliks."""
    norm = [ll / max(len(ch.encode("utf-8")), 1) for ll, ch in zip(loglik, e["choices"])]
    return _argmax(loglik), _argmax(norm)


def score(cfg, params, examples, encode, bos, dtype=F64, way="one", act=jr._same):
    P = {n: t.to(dtype) for n, t in params.items()}
    pairs = _all_pairs(examples, encode)
    res = []
    with torch.no_grad():
        for e, row in zip(examples, pairs):
            if way == "padded":
                ll = _padded_logliks(cfg, P, bos, row, dtype, act)
            else:
                ll = [choice_loglik(cfg, P, bos, c, x, dtype, act) for c, x in row]
            pred, pred_norm = decide(e, ll)
            res.append({"loglik": ll, "pred": pred, "pred_norm": pred_norm, "gold": e["gold"], "line": e["line"],
                        "ctx_tokens": [len(c) for c, _ in row], "cont_tokens": [len(x) for _, x in row]})
    return res


def _mean_stderr(xs):
    n = len(xs)
    mu = sum(xs) / n
    if n < 2:
        return mu, 0.0
    var = sum((x - mu) ** 2 for x in xs) / (n - 1)
    return mu, math.sqrt(var / n)


def metrics(results):
    acc, acc_se = _mean_stderr([float(r["pred"] == r["gold"]) for r in results])
    norm, norm_se = _mean_stderr([float(r["pred_norm"] == r["gold"]) for r in results])
    return {"n": len(results), "acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se}


# ----------------------------------------------------------------------------
# Self-test
# ----------------------------------------------------------------------------

_CFG = {"vocab_size": 40, "hidden_size": 24, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "kv_channels": 6, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 64}


def _toy_encode(texts):
    """A SentencePiece-like toy: dummy prefix, ' ' -> '_', greedy longest match over
    pieces, so pieces merge across a context/choice boundary ("_hel" + "lo")."""
    pieces = ["_hel", "lo", "_", "h", "e", "l", "o", "a", "b", "\n", "_a", "é", "x", "_lo", "ll"]
    out = []
    for t in texts:
        s = ("_" + t.replace(" ", "_")) if t else ""
        ids, i = [], 0
        while i < len(s):
            best = max((p for p in pieces if s.startswith(p, i)), key=len, default=None)
            if best is None:
                ids.append(39)  # unknown
                i += 1
            else:
                ids.append(3 + pieces.index(best))
                i += len(best)
        out.append(ids)
    return out


def selftest(verbose=True):
    results = []

    def check(name, ok, detail=""):
        results.append(bool(ok))
        if verbose:
            print("%s eval_ref_selftest_%s%s" % ("PASS" if ok else "FAIL", name, (" (" + detail + ")") if detail else ""))
            sys.stdout.flush()

    check("spaces_move_to_choice", split_pair("Q: a  ", "b") == ("Q: a", "  b") and
          split_pair("Q:\n", " b") == ("Q:", "\n b") and split_pair("", "x") == ("", "x") and
          split_pair("a \t ", "b") == ("a", " \t b"))
    # the continuation is what the whole text adds: "hel" + "lo" -> "_hel" "lo" (not enc("lo") = "_lo");
    # "a " + "lo": the space moves, ctx "_a", cont "_lo" (unmoved, enc("a ") = "_a" "_" would leave nothing)
    ctx, cont = pair_tokens(_toy_encode, "hel", "lo")
    ctx2, cont2 = pair_tokens(_toy_encode, "a ", "lo")
    check("continuation_is_enc_whole_minus_enc_context",
          ctx == [3] and cont == [4] and _toy_encode(["lo"])[0] == [16] and
          ctx2 == [13] and cont2 == [16] and _toy_encode(["a ", "a lo"]) == [[13, 5], [13, 16]],
          "ctx %s cont %s; 'a '+'lo': %s + %s" % (ctx, cont, ctx2, cont2))

    cfg = jr.normalize_config(_CFG)
    prm = jr.init_params(cfg, 5, perturb=True)
    P = {n: t.double() for n, t in prm.items()}
    # the sum of log p over the continuation == the masked mean CE of jetmoe_ref.forward times its count
    c, x = [7, 3, 9, 11], [4, 5, 6]
    ll = choice_loglik(cfg, P, 1, c, x)
    seq = [1] + c + x
    lab = [-100] * (1 + len(c)) + x
    o = jr.forward(cfg, P, torch.tensor([seq]), labels=torch.tensor([lab]), dtype=F64)
    ce = float(o["loss"]) * len(x)
    check("loglik_is_masked_ce", abs(ll + ce) <= 1e-12 * abs(ce), "%.12f vs %.12f" % (ll, -ce))

    ex = [{"context": "hel", "choices": ["lo", " a", "ll\né"], "gold": 0, "line": 1},
          {"context": "a  ", "choices": ["b", "lo", "xx\n", "hello"], "gold": 2, "line": 3},
          {"context": "", "choices": ["a", "é"], "gold": 1, "line": 4}]
    one = score(cfg, prm, ex, _toy_encode, 1)
    pad = score(cfg, prm, ex, _toy_encode, 1, way="padded")
    d = max(abs(a - b) for r, s in zip(one, pad) for a, b in zip(r["loglik"], s["loglik"]))
    check("padded_equals_one_by_one", d < 1e-10, "max diff %.1e" % d)
    # pred_norm divides by UTF-8 bytes ("éé" is 4 bytes, 2 characters)
    e = {"choices": ["ab", "éé"]}
    check("norm_by_bytes", decide(e, [-10.0, -12.0]) == (0, 1) and decide(e, [-12.0, -12.0]) == (0, 1))
    m = metrics([{"pred": 1, "pred_norm": 0, "gold": 1}] * 3 + [{"pred": 0, "pred_norm": 0, "gold": 1}])
    check("stderr_sample_std_over_sqrt_n", abs(m["acc"] - 0.75) < 1e-15 and abs(m["acc_stderr"] - 0.25) < 1e-15
          and m["acc_norm"] == 0 and m["acc_norm_stderr"] == 0, str(m))

    nfail = results.count(False)
    if verbose:
        print("eval_ref_selftest: %d passed, %d failed" % (len(results) - nfail, nfail))
    return nfail == 0


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def _cmd_score(args):
    cfg, params = jr.load_checkpoint(args.dir)
    ex = read_task(args.task)
    if args.limit:
        ex = ex[:args.limit]
    bos = cfg["bos_token_id"] if args.bos is None else args.bos
    tok = Tokenizer(args.jetmoe, args.tokenizer)
    res = score(cfg, params, ex, tok.encode, bos, dtype=torch.float32 if args.float32 else F64,
                way="padded" if args.padded else "one", act=jr.bf16_inputs if args.bf16_inputs else jr._same)
    with open(args.out, "w") as f:
        for r in res:
            f.write(json.dumps(r) + "\n")
    print(json.dumps(metrics(res)))
    return 0


def _cmd_batch(args):
    return jr.run_batch(args.jobs, main)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="eval_ref.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="per-example log-likelihoods of a generic multiple-choice task")
    s.add_argument("dir")
    s.add_argument("--task", required=True)
    s.add_argument("--tokenizer", required=True, help="tokenizer.model / tokenizer.json / its directory")
    s.add_argument("--jetmoe", required=True, help="the jetmoe binary (its `tokenizer encode --json`)")
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=0)
    s.add_argument("--bos", type=int, default=None)
    s.add_argument("--float32", action="store_true")
    s.add_argument("--padded", action="store_true", help="an example's choices in one right-padded forward")
    s.add_argument("--bf16-inputs", action="store_true",
                   help="every weight matrix's inputs rounded to BF16, as jetmoe runs a BF16 checkpoint in place")
    b = sub.add_parser("batch", help="run several commands in one process (JSON lines in, JSON lines out)")
    b.add_argument("jobs")
    sub.add_parser("selftest", help="the reference checked against itself")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "score":
            return _cmd_score(args)
        if args.cmd == "batch":
            return _cmd_batch(args)
        return 0 if selftest() else 1
    except (jr.ConfigError, ValueError, FileNotFoundError) as ex:
        print("eval_ref: %s" % ex, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
