#!/usr/bin/python3
"""build_align.py — the demo's alignment data, from the bundled generators.

    /usr/bin/python3 data/build_align.py [--out build/align] [--seed 1234]

Writes into --out:
  sft.jsonl              {"messages": [...]}: grade-school math problems as a
                         user turn answered with gen_math's worked solution
                         (ending in GSM8K's "#### N"), and gen_chat dialogues.
                         The generators' answers stand in for a teacher's: on
                         a 2-core machine there is no stronger local model to
                         distill from (README: make demo).
  prompts.jsonl          {"messages": [user question], "answer": N}: the
                         problems `jetmoe distill pairs` samples answers to and
                         ranks by the verifier (exact match of the final answer)
  heldout_prompts.jsonl  the same, from another seed and sharing no question
                         with the two files above: the before/after table's
                         held-out problems

Every file follows from the seed (the generators are seeded), and the seeds
differ from build_corpus.py's (seed, seed + 1), so no file repeats the
pretraining text's random stream.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_chat  # noqa: E402
import gen_math  # noqa: E402


def math_records(seed, n, seen):
    """n math problems not in seen (by question text), as (question, worked answer, final answer)."""
    out, k = [], 0
    while len(out) < n:
        for rec in gen_math.generate(seed * 1000 + k, 20_000):
            q = rec["question"]
            if q in seen:
                continue
            seen.add(q)
            out.append((q, rec["answer"], rec["answer"].rsplit("####", 1)[1].strip()))
            if len(out) == n:
                break
        k += 1
    return out


def write(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build/align")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--sft-math", type=int, default=600)
    ap.add_argument("--sft-chat-bytes", type=int, default=100_000)
    ap.add_argument("--prompts", type=int, default=120)
    ap.add_argument("--heldout", type=int, default=60)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    seen = set()
    held = math_records(a.seed + 4, a.heldout, seen)  # first: the held-out set is fixed by its seed alone
    sft = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}
           for q, ans, _ in math_records(a.seed + 2, a.sft_math, seen)]
    chat = gen_chat.generate(a.seed + 2, a.sft_chat_bytes, gen_chat.Resources.load(None))
    sft += [{"messages": r["messages"]} for r in chat]
    prompts = [{"messages": [{"role": "user", "content": q}], "answer": final}
               for q, _, final in math_records(a.seed + 3, a.prompts, seen)]
    heldout = [{"messages": [{"role": "user", "content": q}], "answer": final} for q, _, final in held]
    write(os.path.join(a.out, "sft.jsonl"), sft)
    write(os.path.join(a.out, "prompts.jsonl"), prompts)
    write(os.path.join(a.out, "heldout_prompts.jsonl"), heldout)
    print(f"{a.out}: sft.jsonl {len(sft)} conversations ({a.sft_math} math, {len(chat)} chat), "
          f"prompts.jsonl {len(prompts)}, heldout_prompts.jsonl {len(heldout)}")


if __name__ == "__main__":
    main()
