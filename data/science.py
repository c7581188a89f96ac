#!/usr/bin/python3
"""science.py — the JetMoE report's claim, in miniature (`make science`).

    /usr/bin/python3 data/science.py [--out build/science] [--threads 2] [--limit N]

Pretrains three models on the demo's mixture with the same recipe and the
same training tokens (data/science-*.json differ only in the model):
JetMoE (8 experts, top-2 in MoA and MoE, the demo's model), a dense model with
its ACTIVE parameters per token, and a dense model with its TOTAL parameters.
Then scores each final checkpoint on the tasks of data/gen_tasks.py when
`jetmoe eval` has --task, and writes under --out:

  jetmoe/, dense-active/, dense-total/   the run directories (metrics.jsonl, loss.svg, checkpoints/)
  tasks/                                 the task files; RUN/tasks/*.json, what `jetmoe eval --task --out` wrote
  heldout_vs_flops.svg                   held-out loss against training FLOPs and against tokens, all three
  results.json, results.md               the table

Every number comes from what the runs wrote; nothing here is a result by
itself. Parameter counts are recomputed from the recipes and checked against
`jetmoe info` on each checkpoint.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = [  # name, recipe, label
    ("jetmoe", "science-jetmoe.json", "JetMoE (8 experts, top-2)"),
    ("dense-active", "science-dense-active.json", "dense, same active params"),
    ("dense-total", "science-dense-total.json", "dense, same total params"),
]
TASKS = [("arith_mc", "acc"), ("cloze_mc", "acc"), ("gsm8k_gen", "exact_match")]
COLORS = {"jetmoe": "#d95f02", "dense-active": "#2c7fb8", "dense-total": "#1b9e77"}


# ---- parameters and FLOPs -------------------------------------------------

def params(m):
    """Non-embedding parameters, total and active per token, and the embedding,
    from an HF config object (the sizes jm_config_total_params counts)."""
    H, L, V = m["hidden_size"], m["num_hidden_layers"], m["vocab_size"]
    A = m["num_key_value_heads"] * m["kv_channels"]  # one MoA expert's query width
    F, E, k = m["intermediate_size"], m["num_local_experts"], m["num_experts_per_tok"]

    def layer(n):  # n experts' weights: E for the total, k for the active
        moa = 2 * A * H + E * H + n * 2 * A * H + H  # kv_proj, router, n x (input, output), bias
        moe = E * H + n * 3 * F * H + H              # router, n x (input 2F, output F), bias
        return moa + moe + 2 * H                     # + the two RMSNorms

    return {"total_nonembed": L * layer(E) + H, "active_nonembed": L * layer(k) + H,  # + the final norm
            "embedding": V * H, "tied": m.get("tie_word_embeddings", True)}


def flops_per_token(m, seq_len, p):
    """Training FLOPs per token: 6 x active non-embedding parameters (forward 2N,
    backward 4N) + 6 * L * T * d_attn, the attention scores and the weighted sum
    of values over a context of T = seq_len (Kaplan et al. 2020, Table 1, times 3
    for the backward), d_attn = the query width a token uses, k * Hkv * D."""
    d_attn = m["num_experts_per_tok"] * m["num_key_value_heads"] * m["kv_channels"]
    dense = 6 * p["active_nonembed"]
    attn = 6 * m["num_hidden_layers"] * seq_len * d_attn
    lm_head = 6 * m["vocab_size"] * m["hidden_size"]
    return {"flops_per_token": dense + attn, "six_n": dense, "attention": attn, "lm_head_not_counted": lm_head,
            "d_attn": d_attn}


def info_params(jetmoe, ckpt):
    """`jetmoe info`'s counts: total (embedding once, tied) and active (with the lm_head)."""
    out = subprocess.run([jetmoe, "info", ckpt], capture_output=True, text=True, check=True).stdout
    m = re.search(r"parameters\s+(\d+) total .*?, (\d+) active per token", out)
    if not m:
        sys.exit(f"science: could not read the parameter counts of `jetmoe info {ckpt}`")
    return int(m.group(1)), int(m.group(2))


# ---- runs -----------------------------------------------------------------

def read_metrics(path):
    steps, held = [], []
    with open(path, encoding="utf-8") as f:
        for ln in f:
            r = json.loads(ln)
            if "heldout_loss" in r:
                held.append(r)
            elif "loss" in r:  # a logged step (the first line is the run's header: world size, threads)
                steps.append(r)
    return steps, held


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if n else float("nan")


def latest_checkpoint(run):
    with open(os.path.join(run, "checkpoints", "latest"), encoding="utf-8") as f:
        return os.path.join(run, "checkpoints", f.read().strip())


def has_task_eval(jetmoe):
    h = subprocess.run([jetmoe, "eval", "--help"], capture_output=True, text=True)
    return "--task" in h.stdout + h.stderr


def find_metric(obj, key):
    """The number under key in `jetmoe eval --out`'s JSON, wherever it sits (top level or one task's object)."""
    if isinstance(obj, dict):
        if isinstance(obj.get(key), (int, float)):
            return obj[key]
        for v in obj.values():
            x = find_metric(v, key)
            if x is not None:
                return x
    elif isinstance(obj, list):
        for v in obj:
            x = find_metric(v, key)
            if x is not None:
                return x
    return None


def run_tasks(jetmoe, ckpt, task_dir, out_dir, threads, limit):
    os.makedirs(out_dir, exist_ok=True)
    res = {}
    for task, _ in TASKS:
        out = os.path.join(out_dir, task + ".json")
        cmd = [jetmoe, "eval", ckpt, "--task", os.path.join(task_dir, task + ".jsonl"), "--out", out,
               "--threads", str(threads)]
        if limit:
            cmd += ["--limit", str(limit)]
        print("+", " ".join(cmd), flush=True)
        t0 = time.time()
        p = subprocess.run(cmd)
        if p.returncode != 0 or not os.path.exists(out):
            res[task] = {"error": f"jetmoe eval --task exited {p.returncode}"}
            continue
        with open(out, encoding="utf-8") as f:
            j = json.load(f)
        res[task] = {k: find_metric(j, k) for k in ("acc", "acc_norm", "exact_match")}
        res[task]["seconds"] = round(time.time() - t0, 1)
    return res


# ---- the figure -----------------------------------------------------------

def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nice_ticks(lo, hi, n=5):
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    v, out = math.ceil(lo / step) * step, []
    while v <= hi + 1e-12:
        out.append(v)
        v += step
    return out


def fmt_count(v):
    for div, suf in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g}{suf}"
    return f"{v:.3g}"


def plot(rows, path):
    """Two panels side by side, the held-out loss of every run: against training
    FLOPs (log scale) and against training tokens. Same look as the trainer's loss.svg."""
    W, Hh, top, ph, pw, gap, left = 900, 420, 60, 280, 340, 90, 70
    ys = [h["heldout_loss"] for r in rows for h in r["heldout"]]
    lo, hi = min(ys), max(ys)
    pad = 0.05 * (hi - lo or 1)
    lo, hi = lo - pad, hi + pad
    fx = [h["tokens"] * r["flops_per_token"] for r in rows for h in r["heldout"]]
    tx = [h["tokens"] for r in rows for h in r["heldout"]]
    lfx0, lfx1 = math.floor(math.log10(min(fx))), math.ceil(math.log10(max(fx)))
    panels = [
        ("flops", "training FLOPs (log scale; 6N + attention per token)", left,
         lambda r, h: h["tokens"] * r["flops_per_token"],
         lambda v: (math.log10(v) - lfx0) / (lfx1 - lfx0)),
        ("tokens", "training tokens", left + pw + gap,
         lambda r, h: h["tokens"], lambda v: v / max(tx)),
    ]
    py = lambda v: top + ph * (hi - v) / (hi - lo)  # noqa: E731
    o = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{Hh}' font-family='sans-serif' font-size='12'>",
         "<rect width='100%' height='100%' fill='white'/>",
         f"<text x='{left}' y='22' font-size='14'>held-out loss of JetMoE and two dense models, same recipe and "
         f"tokens ({fmt_count(max(tx))} each)</text>"]
    for name, xtitle, x0, getx, fx_ in panels:
        o.append(f"<rect class='panel' data-panel='{name}' x='{x0}' y='{top}' width='{pw}' height='{ph}' "
                 f"fill='none' stroke='#999'/>")
        for v in nice_ticks(lo, hi, 5):
            y = py(v)
            o.append(f"<line x1='{x0}' x2='{x0 + pw}' y1='{y:.2f}' y2='{y:.2f}' stroke='#eee'/>"
                     f"<line x1='{x0 - 4}' x2='{x0}' y1='{y:.2f}' y2='{y:.2f}' stroke='#999'/>"
                     f"<text x='{x0 - 6}' y='{y + 3.5:.2f}' text-anchor='end' font-size='10'>{v:.3g}</text>")
        if name == "flops":
            xt = [10.0 ** e for e in range(lfx0, lfx1 + 1)]
        else:
            xt = nice_ticks(0, max(tx), 4)
        for v in xt:
            x = x0 + pw * fx_(v)
            o.append(f"<line x1='{x:.2f}' x2='{x:.2f}' y1='{top + ph}' y2='{top + ph + 4}' stroke='#999'/>"
                     f"<text x='{x:.2f}' y='{top + ph + 17}' text-anchor='middle' font-size='10'>{fmt_count(v)}</text>")
        o.append(f"<text x='{x0 + pw / 2}' y='{top + ph + 38}' text-anchor='middle'>{esc(xtitle)}</text>")
        cy = top + ph / 2
        o.append(f"<text x='{x0 - 44}' y='{cy}' transform='rotate(-90 {x0 - 44} {cy})' text-anchor='middle'>"
                 f"held-out loss (nats/token)</text>")
        for r in rows:
            pts = [(x0 + pw * fx_(getx(r, h)), py(h["heldout_loss"])) for h in r["heldout"]]
            c = COLORS[r["name"]]
            o.append(f"<polyline class='{r['name']}' fill='none' stroke='{c}' stroke-width='1.5' points='"
                     + " ".join(f"{x:.2f},{y:.2f}" for x, y in pts) + "'/>")
            o += [f"<circle cx='{x:.2f}' cy='{y:.2f}' r='3' fill='{c}'/>" for x, y in pts]
    # the legend in a row between the title and the panels, with each run's final held-out loss
    for i, r in enumerate(rows):
        lx, y = left + 270 * i, 42
        o.append(f"<line x1='{lx}' x2='{lx + 20}' y1='{y}' y2='{y}' stroke='{COLORS[r['name']]}' stroke-width='2'/>"
                 f"<text x='{lx + 26}' y='{y + 4}' font-size='11'>{esc(r['label'])}: {r['final_heldout_loss']:.3f}"
                 f"</text>")
    o.append("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(o) + "\n")


# ---- the table ------------------------------------------------------------

def task_cell(r, task, key):
    t = r.get("tasks")
    if t is None:
        return "skipped: jetmoe eval --task missing"
    v = t.get(task, {})
    if "error" in v:
        return v["error"]
    parts = [f"{v[k]:.3f}" if isinstance(v.get(k), (int, float)) else "n/a" for k in
             ((key, "acc_norm") if key == "acc" else (key,))]
    return " / ".join(parts)


def table(rows):
    head = ["model", "params total / active (non-emb.)", "FLOPs/token (6N + attn)", "train tokens",
            "train FLOPs", "final held-out loss (ppl)", "train tok/s", "wall (s)",
            "arith_mc acc / acc_norm", "cloze_mc acc / acc_norm", "gsm8k_gen exact_match"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([
            r["label"],
            f"{r['params']['total_nonembed'] / 1e6:.3f}M / {r['params']['active_nonembed'] / 1e6:.3f}M",
            f"{r['flops_per_token'] / 1e6:.1f}M",
            f"{r['train_tokens']:,}",
            f"{r['train_flops']:.3g}",
            f"{r['final_heldout_loss']:.3f} ({math.exp(r['final_heldout_loss']):.1f})",
            f"{r['train_tokens_per_s']:.0f}",
            f"{r['wall_seconds']:.0f}",
        ] + [task_cell(r, t, k) for t, k in TASKS]) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build/science")
    ap.add_argument("--jetmoe", default="./jetmoe")
    ap.add_argument("--corpus", default="build/corpus", help="for the task files (data/gen_tasks.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="examples per task at most (0: all)")
    ap.add_argument("--only", help="comma-separated run names (for a timing check)")
    ap.add_argument("--stop-after", type=int, default=0, help="pretrain --stop-after (for a timing check)")
    a = ap.parse_args()
    t_start = time.time()
    os.makedirs(a.out, exist_ok=True)
    task_dir = os.path.join(a.out, "tasks")
    subprocess.run([sys.executable, os.path.join(HERE, "gen_tasks.py"), "--corpus", a.corpus, "--out", task_dir],
                   check=True)
    tasks_ok = has_task_eval(a.jetmoe)
    if not tasks_ok:
        print("science: skipped: jetmoe eval --task missing (the tasks are written; no accuracies)", flush=True)

    rows = []
    for name, recipe_file, label in RUNS:
        if a.only and name not in a.only.split(","):
            continue
        recipe_path = os.path.join(HERE, recipe_file)
        with open(recipe_path, encoding="utf-8") as f:
            recipe = json.load(f)
        m = recipe["model"]
        p = params(m)
        fl = flops_per_token(m, recipe["seq_len"], p)
        run = os.path.join(a.out, name)
        cmd = [a.jetmoe, "pretrain", "--recipe", recipe_path, "--out", run, "--overwrite", "--threads",
               str(a.threads), "--quiet"]
        if a.stop_after:
            cmd += ["--stop-after", str(a.stop_after)]
        print(f"== {label}: {p['total_nonembed']:,} non-embedding parameters, {p['active_nonembed']:,} active "
              f"per token, {fl['flops_per_token'] / 1e6:.1f} MFLOPs per training token\n+ " + " ".join(cmd),
              flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        wall = time.time() - t0
        steps, held = read_metrics(os.path.join(run, "metrics.jsonl"))
        ckpt = latest_checkpoint(run)
        tot, act = info_params(a.jetmoe, ckpt)
        emb = p["embedding"] * (1 if p["tied"] else 2)
        if tot != p["total_nonembed"] + emb or act != p["active_nonembed"] + p["embedding"]:
            sys.exit(f"science: {name}: jetmoe info counts {tot} total / {act} active, this script "
                     f"{p['total_nonembed']} + {emb} / {p['active_nonembed']} + {p['embedding']}")
        tokens = max(steps[-1]["tokens"], held[-1]["tokens"])  # the final evaluation is at the last step
        row = {
            "name": name, "label": label, "recipe": os.path.relpath(recipe_path), "run_dir": run,
            "checkpoint": ckpt, "model": m, "params": p, "jetmoe_info_params": {"total": tot, "active": act},
            **fl, "train_tokens": tokens, "train_flops": tokens * fl["flops_per_token"],
            "final_heldout_loss": held[-1]["heldout_loss"], "heldout_tokens": held[-1]["heldout_tokens"],
            "final_train_loss": steps[-1]["loss"],
            # the trainer's own rate (training alone, evaluations left out), median over the logged steps
            "train_tokens_per_s": median([s["tokens_per_s"] for s in steps]),
            "wall_seconds": round(wall, 1),
            "heldout": [{"step": h["step"], "tokens": h["tokens"], "heldout_loss": h["heldout_loss"]} for h in held],
        }
        if tasks_ok:
            row["tasks"] = run_tasks(a.jetmoe, ckpt, task_dir, os.path.join(run, "tasks"), a.threads, a.limit)
        rows.append(row)
        print(f"   final held-out loss {row['final_heldout_loss']:.4f}, {row['train_tokens_per_s']:.0f} tok/s, "
              f"{wall:.0f} s", flush=True)

    if len({r["train_tokens"] for r in rows}) > 1:
        sys.exit("science: the runs saw different numbers of tokens; the recipes must agree on steps and batch")
    plot(rows, os.path.join(a.out, "heldout_vs_flops.svg"))
    md = table(rows)
    notes = ("FLOPs/token = 6 x active non-embedding parameters + 6 * L * T * d_attn (T = seq_len, "
             "d_attn = k * Hkv * D); the tied lm_head's 6 * V * H "
             f"= {rows[0]['lm_head_not_counted'] / 1e6:.1f}M per token, the same for all, is not counted. "
             "train tok/s: the trainer's tokens_per_s (training alone), median over logged steps. "
             "Task cells: acc / acc_norm (multiple choice), exact_match (generative).")
    with open(os.path.join(a.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(md + "\n\n" + notes + "\n")
    with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": rows, "task_eval": "ran" if tasks_ok else "skipped: jetmoe eval --task missing",
                   "seconds": round(time.time() - t_start, 1), "notes": notes}, f, indent=1)
    print("\n" + md + "\n\n" + notes)
    print(f"\nscience: {a.out}/results.md, results.json, heldout_vs_flops.svg; {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
