#!/usr/bin/python3
"""align_report.py — the demo's before/after table of the alignment recipe.

    /usr/bin/python3 data/align_report.py build/demo

Reads what `make demo-align` wrote: the counts `jetmoe distill sft` printed
for the held-out problems answered by the base (run), dSFT (sft) and dDPO
(dpo) models (exact match of the final answer, as GSM8K's verifier reads it,
and the share of answers in the trained format, a final "#### N" line: both
counted by jetmoe itself), and the held-out preference records of the dDPO
run's metrics.jsonl at step 0 and at its end. Prints the table; nothing here
judges an answer on its own.
"""
import json
import os
import sys


def counts(path):
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    return json.loads(lines[-1])


def heldout_records(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for ln in f:
            r = json.loads(ln)
            if "heldout_rewards/accuracies" in r:
                out.append(r)
    return out


def main():
    demo = sys.argv[1] if len(sys.argv) > 1 else "build/demo"
    align = os.path.join(demo, "align")
    rows = []
    for name, label in (("run", "base (pretrained)"), ("sft", "dSFT"), ("dpo", "dDPO")):
        c = counts(os.path.join(align, f"answers_{name}.counts.json"))
        n = c["verified"]
        rows.append((label, n, c["right"], c["formatted"]))
    print("\nheld-out grade-school problems (greedy, 64 new tokens at most):")
    print(f"  {'model':<20} {'problems':>8} {'exact match':>12} {'in format (#### N)':>19}")
    for label, n, right, fmt in rows:
        print(f"  {label:<20} {n:>8} {right / n:>11.1%} {fmt / n:>18.1%}")
    held = heldout_records(os.path.join(demo, "dpo", "metrics.jsonl"))
    if held:
        first, last = held[0], held[-1]
        pc = counts(os.path.join(align, "heldout_pairs.counts.json"))
        tc = counts(os.path.join(align, "pairs.counts.json"))
        print(f"\ntraining pairs: {tc['pairs']} ({tc['by_verifier']} ranked by the verifier, {tc['by_teacher']} by the "
              f"teacher's mean log p where every sample was wrong or every one right)")
        print(f"held-out preference pairs: {pc['pairs']} ({pc['by_verifier']} by the verifier, {pc['by_teacher']} by "
              f"the teacher), the dSFT model's answers to the held-out problems:")
        print(f"  {'':<34} {'before dDPO':>11} {'after':>8}")
        for key, what in (("heldout_rewards/accuracies", "rewards/accuracies (margin > 0)"),
                          ("heldout_logps/accuracies", "log p(chosen) > log p(rejected)"),
                          ("heldout_rewards/margins", "rewards/margins"),
                          ("heldout_loss", "DPO loss")):
            print(f"  {what:<34} {first[key]:>11.4f} {last[key]:>8.4f}")
        print("  (before dDPO the policy is its reference: every margin is 0, so rewards/accuracies is 0 by "
              "definition)")


if __name__ == "__main__":
    main()
