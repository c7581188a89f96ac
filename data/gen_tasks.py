#!/usr/bin/python3
"""gen_tasks.py — small evaluation tasks from the bundled mixture's own generators.

    /usr/bin/python3 data/gen_tasks.py --corpus build/corpus --out build/science/tasks [--seed 1234] [--n 150]

Writes three JSONL files in the layouts `jetmoe eval --task` reads
(include/jetmoe.h: jm_eval_task_load), deterministic for a seed and a corpus:

  arith_mc.jsonl   "mc": a gen_math.py problem with its worked steps, cut just
                   after the last "=", e.g. "...The leftover is 71 - 63 =";
                   four choices " 8", " 9", " 7", " 18": the right result and
                   three near it (off by 1, 2, 10, or a factor of 10), in a
                   seeded order. The arithmetic is one step the model must do.
  cloze_mc.jsonl   "mc": held-out prose (build/corpus/heldout/prose.jsonl, which
                   the training sources never contain), a few sentences of
                   context, and four choices: the true next sentence and three
                   sentences of similar length from other held-out documents
                   of the same kind (Austen's other chapters for Austen).
  gsm8k_gen.jsonl  "gsm8k" ({"question", "answer"} as GSM8K writes them): the
                   whole problem, answered by generation, scored on "#### N".

The math problems come from gen_math.py with seed + 2 (the training set uses
--seed, the held-out set seed + 1), and any whose question the training set
also holds (same template, same numbers) is left out.
"""
import argparse
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_math  # noqa: E402

LAST_EQ = re.compile(r"= (\d+)(?!.*= \d)", re.S)  # the last "= N" of the steps
# a sentence ends at . ! ? (and a closing quote) before a capital or an opening quote; not after Mr. Mrs. Dr. St.
SENT_END = re.compile(r'(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<!St\.)(?<=[.!?])["\']?\s+(?=["\'A-Z_])')


def near(r, n):
    """Three distinct wrong answers near n, none negative."""
    cand = {n - 1, n + 1, n - 2, n + 2, n - 10, n + 10, n * 10, n // 10 if n >= 10 else n + 3}
    cand = sorted(c for c in cand if c >= 0 and c != n)
    return r.sample(cand, 3)


def arith_mc(seed, n, seen):
    r = random.Random(seed)
    out = []
    while len(out) < n:
        q, steps, _ = gen_math.problem(r)
        if q in seen:
            continue
        seen.add(q)
        body = "\n".join(steps)
        m = LAST_EQ.search(body)
        if not m:
            continue
        right = int(m.group(1))
        context = f"Question: {q}\nAnswer: {body[:m.start() + 1]}"
        choices = [right] + near(r, right)
        r.shuffle(choices)
        out.append({"context": context, "choices": [f" {c}" for c in choices], "gold": choices.index(right)})
    return out


def sentences(text):
    flat = " ".join(text.split())
    return [s.strip() for s in SENT_END.split(flat) if s.strip()]


def cloze_mc(seed, n, docs, n_context=3):
    r = random.Random(seed)
    per_doc = [sentences(d["text"]) for d in docs]
    kind = [d.get("source", "").split(",")[0] for d in docs]  # "Jane Austen", "Jargon File 4.4.7"
    pool = [(i, s) for i, ss in enumerate(per_doc) for s in ss if 30 <= len(s) <= 240]
    slots = [(i, j) for i, ss in enumerate(per_doc) for j in range(n_context, len(ss))
             if 30 <= len(ss[j]) <= 240 and len(" ".join(ss[j - n_context:j])) <= 600]
    r.shuffle(slots)
    out = []
    for i, j in slots[:n]:
        gold = per_doc[i][j]
        # distractors from other documents of the same kind (Austen for Austen), of about the gold
        # sentence's length, so neither the genre nor the length alone tells the true one
        near_len = [s for d, s in pool if d != i and kind[d] == kind[i] and 0.67 <= len(s) / len(gold) <= 1.5]
        if len(near_len) < 3:
            near_len = [s for d, s in pool if d != i and kind[d] == kind[i]]
        choices = [gold] + r.sample(near_len, 3)
        r.shuffle(choices)
        out.append({"context": " ".join(per_doc[i][j - n_context:j]), "choices": [f" {c}" for c in choices],
                    "gold": choices.index(gold)})
    return out


def gsm8k_gen(seed, n, seen):
    r = random.Random(seed)
    out = []
    while len(out) < n:
        q, steps, ans = gen_math.problem(r)
        if q in seen:
            continue
        seen.add(q)
        rec = gen_math.record(q, steps, ans)
        out.append({"question": rec["question"], "answer": rec["answer"]})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="build/corpus", help="what data/build_corpus.py wrote")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234, help="the corpus's seed (build_corpus.py --seed)")
    ap.add_argument("--n", type=int, default=150, help="examples per task")
    a = ap.parse_args()
    seen = set()
    for path in (os.path.join(a.corpus, "math", "math.jsonl"), os.path.join(a.corpus, "heldout", "math.jsonl")):
        with open(path, encoding="utf-8") as f:
            seen.update(json.loads(ln)["question"] for ln in f if ln.strip())
    with open(os.path.join(a.corpus, "heldout", "prose.jsonl"), encoding="utf-8") as f:
        prose = [json.loads(ln) for ln in f if ln.strip()]
    tasks = {
        "arith_mc": arith_mc(a.seed + 2, a.n, seen),
        "cloze_mc": cloze_mc(a.seed + 2, a.n, prose),
        "gsm8k_gen": gsm8k_gen(a.seed + 3, a.n, seen),
    }
    os.makedirs(a.out, exist_ok=True)
    for name, recs in tasks.items():
        with open(os.path.join(a.out, name + ".jsonl"), "w", encoding="utf-8") as f:
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"gen_tasks: {len(recs)} examples in {os.path.join(a.out, name + '.jsonl')}")


if __name__ == "__main__":
    main()
