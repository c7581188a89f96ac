#!/usr/bin/python3
"""`jetmoe eval` against the independent reference tests/ref/eval_ref.py, and its bad inputs.

  eval_ref_selftest_*               eval_ref.py checked against itself (relayed)
  eval_mc_vs_reference_<model>      `eval --task --dump` on 26 generic multiple-choice examples (2-5
                                    choices; contexts ending in one or two spaces, in a newline, empty;
                                    choices with and without a leading space, pieces that merge across
                                    the boundary, newlines, non-ASCII): every choice's log-likelihood
                                    within 1e-4 relative of the reference's (float64, one forward per
                                    (context, choice); the BF16 model's within 5e-3, its matrices'
                                    inputs rounded to BF16 on both sides: LL_TOL_BF16); pred,
                                    pred_norm, gold and line equal (a reference near-tie, top two
                                    within 1e-6, 1e-2 for BF16, may go either way); the
                                    --out acc/acc_norm equal the reference's metrics
  eval_mc_metrics_by_hand           a small file: pred, pred_norm, acc, acc_norm and their stderr
                                    (sample std, n - 1, over sqrt(n)) computed here from --dump's
                                    logliks and the choices' UTF-8 bytes == --dump's and --out's
  eval_bad_task_<case>              malformed record, gold out of range, empty choices, unknown
                                    layout, a record of another layout: exit 1, one line naming
                                    FILE:LINE, no --out and no --dump written
  eval_data_max_tokens_exact        --data --max-tokens 100: exactly 100 tokens, batched and --decode,
                                    losses within 1e-5
  eval_data_seq_len_past_context    --data --seq-len longer than the model's context: exit 1, the
                                    message names the context
The prefix reuse of the library (each context prefilled once vs each pair from an empty cache) is
tests/test_eval.c's.

Models (jetmoe_ref.py make, in tmp; a 400-piece tokenizer from `jetmoe tokenizer train`, byte
fallback, so any UTF-8 text has ids): tiny (E 4, top-2, 2 KV heads, tied, F32) and e6_top3_untied
(E 6, top-3, 3 KV heads of 16, 3 layers, untied, BF16 in 2 shards).
Called from tests/run_tests.py as run(suite, build, tmpdir).
"""
import json
import math
import os
import subprocess
import time

from testlib import sanitizer_report
import align_ref_tests  # batch_results: a reference batch's results
from align_ref_tests import finish, start  # a process, and its output with a timeout
import train_tests  # its write_shard (attribute looked up at call time: train_tests imports run_tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = "/usr/bin/python3"
EVAL_REF = os.path.join(ROOT, "tests", "ref", "eval_ref.py")
LL_TOL = 1e-4
# A BF16 model runs in place with its matrices' inputs rounded to BF16 (as the reference does for it, --bf16-inputs):
# a step function of the activations, which the reference (float64) and jetmoe (fp32) reach 1e-7 apart, so an input
# near a rounding boundary can land on either side. On this random model, inputs moved by 1e-7 (relative, at
# random) moved the reference's logliks by up to 1.2e-3; jetmoe's are within 7e-4 of it, and without the
# reference's rounding 1e-2 off (a reference that skips any one of the rounded products: 2e-3 to 1e-2, so this
# checks that the rounding is there, not which products have it: test_quant's wmatmul_bf16_* and wexperts_bf16_*
# hold every BF16 product to its rounded inputs at 1e-5).
LL_TOL_BF16 = 5e-3

MODELS = {
    "tiny": dict(cfg=dict(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                          intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=256), dtype="F32", shards=1),
    "e6_top3_untied": dict(cfg=dict(vocab_size=448, hidden_size=48, num_hidden_layers=3, num_key_value_heads=3,
                                    kv_channels=16, intermediate_size=40, num_local_experts=6, num_experts_per_tok=3,
                                    tie_word_embeddings=False, rope_theta=500.0, max_position_embeddings=256),
                           dtype="BF16", shards=2),
}


def mc_examples():
    """26 records {"context", "choices", "gold"}: the cases the token rule has to get right."""
    ex = [
        ("The capital of France is", [" Paris", " London", " Berlin"], 0),
        ("The capital of France is ", ["Paris", "London", "Rome", "Madrid"], 0),       # a trailing space moves
        ("Two spaces before the answer:  ", ["yes", "no"], 1),                        # two spaces move
        ("Question: what is 2 + 2?\nAnswer:", [" 4", " 5", " 22", " four", " fish"], 0),
        ("Question: what colour is the sky?\nAnswer:\n", ["blue", "green", "the sea"], 0),  # a newline stays
        ("hel", ["lo", "p", "met"], 0),                                               # pieces merge across
        ("the licen", ["sed under", "ces", "sing"], 2),                                # enc(ctx) not a prefix
        ("", ["the license", "a license"], 1),                                        # empty context
        ("Café au lait or thé? ", ["café", "thé", "eau"], 1),                          # non-ASCII
        ("日本語のテキスト:", [" 日本", " 中文", " English"], 0),
        ("Emoji time 🙂", [" 🙂🙂", " smile", "!"], 2),
        ("Naïve façade", [" coöperate", " résumé", " plain"], 1),
        ("Multi\nline\ncontext\n\n", ["ends here", "and here\nwith a newline", "x"], 1),
        ("You may copy and distribute", [" verbatim copies", " nothing at all", " the Program", " it"], 0),
        ("Permission is hereby granted, free of charge, to any person", [" obtaining", " running", " who"], 0),
        ("THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT", [" WARRANTY", " warranty", " any", " LIMIT"], 0),
        ("tab\tseparated\t", ["value", " value"], 0),
        ("numbers 12345 and ", ["678", "6 7 8", "six"], 0),
        ("a", ["b", "bb", "bbb", "bbbb", "bbbbb"], 4),
        ("Quote: \"", ["hello\"", "bye\""], 1),
        ("Ends with space and punctuation. ", ["Next sentence.", "next sentence", "NEXT"], 0),
        ("GNU General Public License", [" version 2", " version 3", ", version 3", "v3"], 2),
        ("Ünïcödé ", ["wörds", "words"], 0),
        ("Spaces   inside   and at the end   ", ["a", "b c"], 1),
        ("Line one\r\nLine two", [" three", "\r\nLine three"], 1),
        ("Long context: " + "the terms and conditions for copying, distribution and modification " * 3,
         [" follow", " are here", " end"], 0),
    ]
    return [{"context": c, "choices": ch, "gold": g} for c, ch, g in ex]


def hand_examples():
    """A short choice beside a long one, gold alternating: acc and acc_norm part ways."""
    pairs = [(" a", " a rather long answer that goes on"), (" yes", " yes indeed, certainly so"),
             (" é", " éléphant élégant"), (" 1", " 1234567890"), (" no", " not at all, never"),
             (" x", " xylophone xenon"), (" up", " upwards and onwards"), (" 日", " 日本語のテキスト")]
    short = [i % 2 == 0 for i in range(len(pairs))]  # the short choice is second in even examples
    gold_short = [1, 1, 1, 1, 1, 1, 0, 0]  # on the test model: acc 6/8, acc_norm 4/8 (the short ones win acc)
    return [{"context": f"Example {i}: choose", "choices": [l, s] if short[i] else [s, l],
             "gold": int(short[i]) if gold_short[i] else 1 - int(short[i])} for i, (s, l) in enumerate(pairs)]


def write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return path


def batch(d, name, jobs):
    """One eval_ref.py process for jobs [(id, argv, tool)] -> the Popen."""
    path = write_jsonl(os.path.join(d, name + ".jobs.jsonl"), [{"id": i, "argv": a, "tool": t} for i, a, t in jobs])
    return start([PY, EVAL_REF, "batch", path])


def batch_results(p):
    return align_ref_tests.batch_results(p, tool="eval_ref.py")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def mean_stderr(xs):
    n = len(xs)
    mu = sum(xs) / n
    return mu, (math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n) if n > 1 else 0.0)


def argmax(v):
    return max(range(len(v)), key=lambda i: (v[i], -i))


# ---------------------------------------------------------------- the module

def run(suite, build, tmp):
    names = [f"eval_mc_vs_reference_{m}" for m in MODELS] + ["eval_mc_metrics_by_hand", "eval_bad_task",
                                                             "eval_data_max_tokens_exact",
                                                             "eval_data_seq_len_past_context", "eval_gen_",
                                                             "eval_text_"]
    selftest = start([PY, EVAL_REF, "selftest"]) if suite.wanted("eval_ref_selftest") else None
    if not any(suite.wanted(n) for n in names) and selftest is None:
        return
    t0 = time.time()
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    d = os.path.join(tmp, "eval_ref")
    os.makedirs(d, exist_ok=True)

    def jm(*args):
        p = subprocess.run([jetmoe] + list(args), capture_output=True, text=True, errors="replace", timeout=600)
        return p

    # the tokenizer: prose from the licenses with some non-ASCII lines, 400 pieces with byte fallback
    text = os.path.join(d, "text.txt")
    lic = "/usr/share/common-licenses"
    prose = "".join(open(os.path.join(lic, f), errors="replace").read() for f in sorted(os.listdir(lic))
                    if os.path.isfile(os.path.join(lic, f)))
    with open(text, "w", encoding="utf-8") as f:
        f.write("".join(c for c in prose if c == "\n" or " " <= c <= "~")[:100000])
        f.write("Café au lait, thé, naïve façade, résumé, éléphant.\n日本語のテキスト。\n" * 20)
    tok = os.path.join(d, "tok")
    p = jm("tokenizer", "train", "--input", text, "--vocab-size", "400", "--out", tok, "--threads", "1")
    if p.returncode != 0:
        suite.check("eval_setup_tokenizer", False, p.stderr.strip()[-500:])
        return
    setup = [(m, ["make", "--out", os.path.join(d, m), "--config", json.dumps(MODELS[m]["cfg"]), "--seed", str(41 + i),
                  "--dtype", MODELS[m]["dtype"], "--shards", str(MODELS[m]["shards"])], "jetmoe_ref")
             for i, m in enumerate(MODELS)]
    res, why = batch_results(batch(d, "setup", setup))
    for m, _, _ in setup:
        rc, _, err = res.get(m, (None, "", why))
        if rc != 0:
            suite.check(f"eval_setup_{m}", False, f"making the model failed ({rc}): {err.strip()[-500:]}")
            return

    # the reference for both models in one background process; C beside it
    task = write_jsonl(os.path.join(d, "mc.jsonl"), mc_examples())
    # a BF16 checkpoint runs in place, its weight matrices taking BF16 inputs (round_act_bf16): so does the
    # reference's forward for it
    jobs = [(m, ["score", os.path.join(d, m), "--task", task, "--tokenizer", tok, "--jetmoe", jetmoe,
                 "--out", os.path.join(d, m + ".ref.jsonl")] + (["--bf16-inputs"] if spec["dtype"] == "BF16" else []),
             "eval_ref") for m, spec in MODELS.items() if suite.wanted(f"eval_mc_vs_reference_{m}")]
    ref_proc = batch(d, "score", jobs) if jobs else None
    c_runs = {}
    for m, _, _ in jobs:
        dump, out = os.path.join(d, m + ".c.jsonl"), os.path.join(d, m + ".c.json")
        p = jm("eval", os.path.join(d, m), "--task", task, "--tokenizer", tok, "--dump", dump, "--out", out,
               "--threads", "2", "--quiet")
        c_runs[m] = (p, dump, out)

    if suite.wanted("eval_mc_metrics_by_hand"):
        by_hand(suite, jm, d, tok)
    if suite.wanted("eval_bad_task"):
        bad_tasks(suite, jm, d, tok)
    data_checks(suite, jm, d)
    gen_and_text_checks(suite, jm, d, tok)

    if ref_proc is not None:
        ref_res, ref_why = batch_results(ref_proc)
        for m, _, _ in jobs:
            compare(suite, m, task, c_runs[m], ref_res.get(m, (None, "", ref_why)), os.path.join(d, m + ".ref.jsonl"))
    if selftest is not None:
        rc, out, err = finish(selftest)
        lines = suite.relay(out)
        if rc != 0 and not any(l.startswith("FAIL ") for l in lines):
            suite.check("eval_ref_selftest_exit", False, f"exit {rc}: {err.strip()[-800:]}")
    print(f"# eval_tests: {time.time() - t0:.1f}s", flush=True)


def compare(suite, m, task, c_run, ref_run, ref_path):
    name = f"eval_mc_vs_reference_{m}"
    tol = LL_TOL_BF16 if MODELS[m]["dtype"] == "BF16" else LL_TOL
    p, dump, out = c_run
    rc, ref_out, ref_err = ref_run
    if rc != 0:
        suite.check(name, False, f"reference failed ({rc}): {ref_err.strip()[-500:]}")
        return
    if p.returncode != 0 or sanitizer_report(p.stderr):
        suite.check(name, False, f"jetmoe eval exit {p.returncode}: {p.stderr.strip()[-500:]}")
        return
    ref, got = read_lines(ref_path), read_lines(dump)
    with open(out) as f:
        res = json.load(f)["results"][task]
    ref_m = json.loads(ref_out)
    problems, worst, ties, nchoices, ntok = [], 0.0, 0, 0, 0
    if len(ref) != len(got):
        problems.append(f"{len(got)} dumped examples, the reference has {len(ref)}")
    for r, g in zip(ref, got):
        where = f"line {r['line']}"
        if g.get("line") != r["line"] or g.get("gold") != r["gold"] or len(g.get("loglik", [])) != len(r["loglik"]):
            problems.append(f"{where}: dumped {json.dumps(g)[:200]}, reference line {r['line']} gold {r['gold']} "
                            f"{len(r['loglik'])} choices")
            continue
        nchoices += len(r["loglik"])
        ntok += sum(r["cont_tokens"])
        for c, (a, b) in enumerate(zip(r["loglik"], g["loglik"])):
            rel = abs(a - b) / max(abs(a), 1e-30)
            worst = max(worst, rel)
            if not rel <= tol:
                problems.append(f"{where} choice {c}: loglik {b!r} vs reference {a!r} (rel {rel:.1e})")
        for key in ("pred", "pred_norm"):
            if g[key] != r[key]:
                v = r["loglik"] if key == "pred" else [ll / len(ch.encode()) for ll, ch in
                                                       zip(r["loglik"], read_choices(task, r["line"]))]
                top = sorted(v, reverse=True)
                if abs(top[0] - top[1]) <= (1e-6 if tol == LL_TOL else 2 * tol) * abs(top[0]):
                    ties += 1
                else:
                    problems.append(f"{where}: {key} {g[key]} vs reference {r[key]} ({v})")
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        if not ties and abs(res.get(key, math.nan) - ref_m[key]) > 1e-12:
            problems.append(f"--out {key} {res.get(key)} vs reference {ref_m[key]}")
    if res.get("n") != len(ref):
        problems.append(f"--out n {res.get('n')} vs {len(ref)} examples")
    suite.check(name, not problems, "; ".join(problems[:5]),
                f"{len(ref)} examples, {nchoices} choices, {ntok} continuation tokens, worst rel {worst:.1e}, "
                f"acc {ref_m['acc']:.3f} acc_norm {ref_m['acc_norm']:.3f}" + (f", {ties} near-ties" if ties else ""))


def read_choices(task, line):
    with open(task, encoding="utf-8") as f:
        return json.loads(f.read().split("\n")[line - 1])["choices"]


def by_hand(suite, jm, d, tok):
    """acc, acc_norm and stderr from the dumped logliks and the choices' bytes, here."""
    name = "eval_mc_metrics_by_hand"
    recs = hand_examples()
    task = write_jsonl(os.path.join(d, "hand.jsonl"), recs)
    dump, out = os.path.join(d, "hand.c.jsonl"), os.path.join(d, "hand.c.json")
    p = jm("eval", os.path.join(d, "tiny"), "--task", task, "--tokenizer", tok, "--dump", dump, "--out", out,
           "--quiet")
    if p.returncode != 0:
        suite.check(name, False, f"jetmoe eval exit {p.returncode}: {p.stderr.strip()[-500:]}")
        return
    got = read_lines(dump)
    with open(out) as f:
        res = json.load(f)["results"][task]
    problems, hits, hits_norm, differ, by_chars = [], [], [], 0, 0
    for e, g in zip(recs, got):
        ll = g["loglik"]
        pred = argmax(ll)
        pred_norm = argmax([x / len(c.encode("utf-8")) for x, c in zip(ll, e["choices"])])
        by_chars += pred_norm != argmax([x / len(c) for x, c in zip(ll, e["choices"])])
        differ += pred != pred_norm
        if (g["pred"], g["pred_norm"], g["gold"]) != (pred, pred_norm, e["gold"]):
            problems.append(f"line {g['line']}: dumped pred {g['pred']} pred_norm {g['pred_norm']} gold {g['gold']}, "
                            f"by hand {pred} {pred_norm} {e['gold']}")
        hits.append(float(pred == e["gold"]))
        hits_norm.append(float(pred_norm == e["gold"]))
    acc, acc_se = mean_stderr(hits)
    norm, norm_se = mean_stderr(hits_norm)
    for key, want in (("acc", acc), ("acc_stderr", acc_se), ("acc_norm", norm), ("acc_norm_stderr", norm_se)):
        if not abs(res.get(key, math.nan) - want) <= 1e-12:
            problems.append(f"--out {key} {res.get(key)}, by hand {want}")
    if len(got) != len(recs) or res.get("n") != len(recs):
        problems.append(f"{len(got)} dumped, n {res.get('n')}, {len(recs)} examples")
    if not differ or acc == norm or acc_se == 0:
        problems.append(f"test too weak: pred != pred_norm in {differ} examples, acc {acc} acc_norm {norm}")
    suite.check(name, not problems, "; ".join(problems[:4]),
                f"acc {acc:.3f}±{acc_se:.3f}, acc_norm {norm:.3f}±{norm_se:.3f}, pred != pred_norm in {differ} of "
                f"{len(recs)}, dividing by characters would change {by_chars}")


BAD_TASKS = [  # (case, lines of the file, bad line, what the message must also say)
    ("malformed_record", ['{"context": "a", "choices": ["b", "c"], "gold": 0}', "",
                          '{"context": "a", "choices": ["b", "c"], "gold": 0'], 3, "JSON"),
    ("gold_out_of_range", ['{"context": "a", "choices": ["b", "c"], "gold": 1}',
                           '{"context": "a", "choices": ["b", "c"], "gold": 2}'], 2, "gold"),
    ("gold_negative", ['{"context": "a", "choices": ["b", "c"], "gold": -1}'], 1, "gold"),
    ("empty_choices", ['{"context": "a", "choices": ["b", "c"], "gold": 0}',
                       '{"context": "a", "choices": ["b", "c"], "gold": 1}',
                       '{"context": "a", "choices": [], "gold": 0}'], 3, "choices"),
    ("empty_choice_text", ['{"context": "a", "choices": ["b", ""], "gold": 0}'], 1, "choices"),
    ("choice_adds_no_token", ['{"context": "the licen", "choices": ["sed", "sing"], "gold": 0}',
                              '{"context": "the licen", "choices": ["sing", "se"], "gold": 0}'], 2,
     "adds no token"),  # enc("the license") is as long as enc("the licen"): the choice has nothing to score
    ("unknown_layout", ['{"query": "a", "options": ["b", "c"], "label": 0}'], 1, ""),
    ("mixed_layouts", ['{"context": "a", "choices": ["b", "c"], "gold": 0}', '{"prompt": "a", "answer": "b"}'], 2,
     "line 1"),
]


def bad_tasks(suite, jm, d, tok):
    for case, lines, bad_line, expect in BAD_TASKS:
        name = f"eval_bad_task_{case}"
        if not suite.wanted(name):
            continue
        path = os.path.join(d, f"bad_{case}.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        out, dump = os.path.join(d, f"bad_{case}.out.json"), os.path.join(d, f"bad_{case}.dump.jsonl")
        p = jm("eval", os.path.join(d, "tiny"), "--task", path, "--tokenizer", tok, "--out", out, "--dump", dump,
               "--quiet")
        err = p.stderr.strip()
        problems = []
        if p.returncode != 1:
            problems.append(f"exit {p.returncode}")
        if sanitizer_report(err):
            problems.append("sanitizer report")
        if len(err.splitlines()) != 1:
            problems.append("the error is not one line")
        if f"{path}:{bad_line}" not in err:
            problems.append(f"no '{path}:{bad_line}' in it")
        if expect not in err:
            problems.append(f"'{expect}' not in it")
        left = [x for x in (out, dump) if os.path.exists(x)]
        if left:
            problems.append(f"wrote {', '.join(os.path.basename(x) for x in left)}")
        suite.check(name, not problems, "; ".join(problems) + f": {err[-300:]!r}", err[-160:])


def data_checks(suite, jm, d):
    """--data: --max-tokens is exact on both paths; --seq-len past the context names it."""
    model = os.path.join(d, "tiny")
    ctx = MODELS["tiny"]["cfg"]["max_position_embeddings"]
    shards = os.path.join(d, "shards")
    os.makedirs(shards, exist_ok=True)
    ids = [(i * 7919 + 13) % 397 + 3 for i in range(2000)]
    train_tests.write_shard(os.path.join(shards, "shard_00000.bin"), ids[:1200], 400, 2)
    train_tests.write_shard(os.path.join(shards, "shard_00001.bin"), ids[1200:], 400, 2)

    def ev(*extra):
        p = jm("eval", model, "--data", shards, "--threads", "2", "--quiet", *extra)
        try:
            return json.loads(p.stdout) if p.returncode == 0 else f"exit {p.returncode}: {p.stderr.strip()[-300:]}"
        except ValueError:
            return f"stdout not JSON: {p.stdout[-300:]!r}"

    if suite.wanted("eval_data_max_tokens_exact"):
        problems, runs = [], []
        for seq_len in ("32", "256"):  # 100 = 3 windows of 31 and one of 7; less than one window of 255
            a, b = ev("--seq-len", seq_len, "--max-tokens", "100"), ev("--seq-len", seq_len, "--max-tokens", "100",
                                                                        "--decode")
            runs.append((a, b))
            if not isinstance(a, dict) or not isinstance(b, dict):
                problems.append(f"seq-len {seq_len}: {a} / {b}")
                continue
            if a["tokens"] != 100 or b["tokens"] != 100:
                problems.append(f"seq-len {seq_len}: tokens {a['tokens']} batched, {b['tokens']} decode")
            if not abs(a["loss"] - b["loss"]) <= 1e-5:
                problems.append(f"seq-len {seq_len}: loss {a['loss']} batched vs {b['loss']} decode")
            if b.get("path") != "decode" or a.get("path") != "batched":
                problems.append(f"paths {a.get('path')} / {b.get('path')}")
        suite.check("eval_data_max_tokens_exact", not problems, "; ".join(problems),
                    ", ".join(f"loss {a['loss']:.6f}/{b['loss']:.6f}" for a, b in runs
                              if isinstance(a, dict) and isinstance(b, dict)))
    if suite.wanted("eval_data_seq_len_past_context"):
        p = jm("eval", model, "--data", shards, "--seq-len", str(ctx + 1), "--quiet")
        err = p.stderr.strip()
        ok = p.returncode == 1 and f"({ctx})" in err and str(ctx + 1) in err and len(err.splitlines()) == 1
        suite.check("eval_data_seq_len_past_context", ok, f"exit {p.returncode}: {err[-300:]!r}", err[-120:])


def gen_and_text_checks(suite, jm, d, tok):
    """Generative: the output is `jetmoe generate --greedy`'s up to the stop
    string, and exact_match counts the answers it equals. Text perplexity: the
    same tokens and log-likelihood token by token, --max-tokens exact, every
    byte of the file counted."""
    model = os.path.join(d, "tiny")
    if suite.wanted("eval_gen_equals_generate"):
        prompts = ["The license", "Permission is hereby granted", "Copyright (C) 2007 Free"]
        outs, problems = [], []
        for pr in prompts:
            p = jm("generate", model, "--tokenizer", tok, "--prompt", pr, "--greedy", "--max-new", "12", "--threads", "2")
            if p.returncode != 0:
                problems.append(f"generate exit {p.returncode}: {p.stderr.strip()[-200:]}")
                outs.append("")
                continue
            text = p.stdout[:-1] if p.stdout.endswith("\n") else p.stdout  # generate ends its output with a newline
            if not text.startswith(pr):
                problems.append(f"generate's output {text[:60]!r} does not start with the prompt")
            text = text[len(pr):]  # after the prompt it echoes
            outs.append(text.split("\n\n")[0])  # the gen layout stops at a blank line
        answers = [outs[0].strip(), outs[1].strip(), "not what it says"]
        task = write_jsonl(os.path.join(d, "gen.jsonl"), [{"prompt": pr, "answer": a} for pr, a in zip(prompts, answers)])
        dump, out = os.path.join(d, "gen.dump.jsonl"), os.path.join(d, "gen.json")
        p = jm("eval", model, "--task", task, "--tokenizer", tok, "--max-gen", "12", "--dump", dump, "--out", out,
               "--threads", "2", "--quiet")
        if p.returncode != 0:
            problems.append(f"eval exit {p.returncode}: {p.stderr.strip()[-300:]}")
        else:
            recs = read_lines(dump)
            res = json.load(open(out))["results"][task]
            for i, r in enumerate(recs):
                if r["output"] != outs[i]:
                    problems.append(f"example {i}: output {r['output']!r}, generate {outs[i]!r}")
            want = [True, True, answers[2] == outs[2].strip()]
            if [r["correct"] for r in recs] != want:
                problems.append(f"correct {[r['correct'] for r in recs]}, expected {want}")
            if abs(res["exact_match"] - sum(want) / 3) > 1e-12:
                problems.append(f"exact_match {res['exact_match']}")
        suite.check("eval_gen_equals_generate", not problems, "; ".join(problems), f"outputs {outs!r}")
    if suite.wanted("eval_text_perplexity_paths"):
        text = os.path.join(d, "doc.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write("Permission is hereby granted, free of charge, to any person obtaining a copy.\n" * 12)
            f.write("Café au lait, thé, naïve façade.\n")
        nbytes = os.path.getsize(text)

        def ppl(*extra):
            out = os.path.join(d, "ppl.json")
            p = jm("eval", model, "--task", text, "--tokenizer", tok, "--seq-len", "64", "--out", out, "--overwrite",
                   "--threads", "2", "--quiet", *extra)
            if p.returncode != 0:
                return f"exit {p.returncode}: {p.stderr.strip()[-300:]}"
            return json.load(open(out))["results"][text]

        a, b, c = ppl(), ppl("--decode"), ppl("--max-tokens", "50")
        problems = [x for x in (a, b, c) if isinstance(x, str)]
        if not problems:
            if a["tokens"] != b["tokens"] or not abs(a["loglik"] - b["loglik"]) <= 1e-5 * abs(a["loglik"]):
                problems.append(f"window {a['tokens']} tokens {a['loglik']}, decode {b['tokens']} tokens {b['loglik']}")
            if a["bytes"] != nbytes:
                problems.append(f"bytes {a['bytes']}, the file has {nbytes}")
            if c["tokens"] != 50 or not 0 < c["bytes"] < nbytes:
                problems.append(f"--max-tokens 50: {c['tokens']} tokens, {c['bytes']} bytes")
            bpb = -a["loglik"] / a["bytes"] / math.log(2)
            if not abs(bpb - a["bits_per_byte"]) <= 1e-9 * bpb or not abs(
                    math.exp(-a["loglik"] / a["tokens"]) - a["token_perplexity"]) <= 1e-9 * a["token_perplexity"]:
                problems.append(f"bits_per_byte {a['bits_per_byte']} vs {bpb}")
        suite.check("eval_text_perplexity_paths", not problems, "; ".join(problems),
                    "" if problems else f"{a['tokens']} tokens, {a['bytes']} bytes, {a['bits_per_byte']:.4f} bits/byte")
