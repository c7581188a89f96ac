"""Training-run checks that read what a run leaves behind (run_tests.py calls run()):
periodic held-out evaluation (eval_every) and its records, bit-exact resume with it, which
checkpoints are kept, the tokenizer_config.json copied into a checkpoint, and loss.svg.

Uses run_tests.py's tiny fixture: a 400-piece tokenizer, two sources and a 20-step recipe
in two phases (p1: 12 steps, p2: 8), checkpoint_every 5, log_every 1.
"""
import json
import math
import os
import struct
import xml.etree.ElementTree as ET

from run_tests import pretrain_fixture
from run_tests import run as run_cmd

CHECKS = ("train_eval_every_records", "train_eval_does_not_change_training", "train_eval_every_resume_bit_exact",
          "train_checkpoint_retention", "train_resume_finished_run_no_duplicate_eval", "train_eval_every_validation",
          "train_checkpoint_tokenizer_config", "train_plot_svg", "train_eval_windows_spread")
SVG = "{http://www.w3.org/2000/svg}"
EVAL_EVERY = 4


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f]
    return [r for r in lines if "loss" in r], [r for r in lines if "heldout_loss" in r]


def weights(out, step):
    with open(os.path.join(out, "checkpoints", f"step_{step}", "model.safetensors"), "rb") as f:
        return f.read()


def kept(out):
    ck = os.path.join(out, "checkpoints")
    return sorted(n for n in os.listdir(ck) if n != "latest"), open(os.path.join(ck, "latest")).read().strip()


def points(el):
    return [tuple(float(v) for v in p.split(",")) for p in el.get("points").split()]


def run(suite, build, tmp):
    if not any(suite.wanted(n) for n in CHECKS):
        return
    fixture = pretrain_fixture(suite, build, tmp, "train")
    if fixture is None:
        return
    jetmoe, d, recipe = fixture
    total = sum(p["steps"] for p in recipe["phases"])
    tokens_per_step = recipe["batch_size"] * recipe["seq_len"] * recipe["grad_accum"]

    def write_recipe(name, **fields):
        path = os.path.join(d, name + ".json")
        with open(path, "w") as f:
            json.dump(dict(recipe, **fields), f)
        return path

    plain_r = write_recipe("plain", eval_every=0)
    eval_r = write_recipe("eval", eval_every=EVAL_EVERY)

    def pretrain(rpath, out, *extra):
        p, _ = run_cmd([jetmoe, "pretrain", "--recipe", rpath, "--out", out, "--quiet"] + list(extra))
        if p.returncode != 0:
            raise RuntimeError(f"pretrain {os.path.basename(rpath)} {' '.join(extra)}: exit {p.returncode}: "
                               f"{p.stderr.strip()[-300:]}")
        return p

    plain, straight = os.path.join(d, "plain"), os.path.join(d, "straight")
    try:
        pretrain(plain_r, plain)
        pretrain(eval_r, straight)
    except RuntimeError as e:
        suite.check("train_eval_every_records", False, str(e))
        return
    steps_s, held_s = records(straight)
    steps_p, held_p = records(plain)

    # held-out records at exactly eval_every, 2 * eval_every, ..., and the final one at the last step
    want = list(range(EVAL_EVERY, total + 1, EVAL_EVERY))
    problems = []
    if [h["step"] for h in held_s] != want:
        problems.append(f"held-out records at steps {[h['step'] for h in held_s]}, want {want}")
    for h in held_s:
        if not (math.isfinite(h["heldout_loss"]) and abs(h["heldout_perplexity"] / math.exp(h["heldout_loss"]) - 1)
                < 1e-4 and 0 < h["heldout_tokens"] <= recipe["eval_tokens"] + 4 * recipe["seq_len"] and
                h["tokens"] == h["step"] * tokens_per_step and h["eval_seconds"] >= 0):
            problems.append(f"record {h}")
    if held_s and "unigram_entropy" not in held_s[-1]:
        problems.append("the last record is not the final one (no unigram_entropy)")
    if [h["step"] for h in held_p] != [total]:
        problems.append(f"eval_every 0: held-out records at {[h['step'] for h in held_p]}, want only {total}")
    elif held_s and held_s[-1]["heldout_loss"] != held_p[0]["heldout_loss"]:
        problems.append(f"final held-out loss {held_s[-1]['heldout_loss']} vs {held_p[0]['heldout_loss']} without "
                        "eval_every")
    suite.check("train_eval_every_records", not problems, "; ".join(problems),
                f"records at {want}, final {held_s[-1]['heldout_loss']:.4f}" if held_s else "")

    same = weights(straight, total) == weights(plain, total)
    suite.check("train_eval_does_not_change_training", same and [s["loss"] for s in steps_s] ==
                [s["loss"] for s in steps_p], f"weights equal {same}; losses {[s['loss'] for s in steps_s]} vs "
                f"{[s['loss'] for s in steps_p]}", f"{total} steps with and without eval_every: identical")

    def same_run(out):
        steps, held = records(out)
        diffs = []
        if weights(out, total) != weights(straight, total):
            diffs.append("final weights differ")
        if [(s["step"], s["loss"], s["lr"]) for s in steps] != [(s["step"], s["loss"], s["lr"]) for s in steps_s]:
            diffs.append(f"losses {[s['loss'] for s in steps]}")
        if [(h["step"], h["heldout_loss"]) for h in held] != [(h["step"], h["heldout_loss"]) for h in held_s]:
            diffs.append(f"held-out records {[(h['step'], h['heldout_loss']) for h in held]}")
        return diffs

    # stopped at an evaluation step (its record is written before its checkpoint: not repeated on resume)
    at_eval = os.path.join(d, "stop_at_eval")
    try:
        pretrain(eval_r, at_eval, "--stop-after", str(2 * EVAL_EVERY))
        pretrain(eval_r, at_eval, "--resume")
        problems = same_run(at_eval)
    except RuntimeError as e:
        problems = [str(e)]
    suite.check("train_eval_every_resume_bit_exact", not problems, "; ".join(problems),
                f"{2 * EVAL_EVERY} + resume {total - 2 * EVAL_EVERY} == {total} straight: weights, losses, "
                "held-out records")

    # checkpoints kept: the newest two, also after stops off the checkpoint_every grid (7, then 11)
    every = recipe["checkpoint_every"]
    twice = os.path.join(d, "stopped_twice")
    problems = []
    try:
        for extra, want_kept in ((["--stop-after", "7"], [every, 7]), (["--resume", "--stop-after", "11"], [10, 11]),
                                 (["--resume"], [total - every, total])):
            pretrain(eval_r, twice, *extra)
            names, latest = kept(twice)
            want_names = sorted(f"step_{n}" for n in want_kept)
            if names != want_names or latest != f"step_{want_kept[-1]}":
                problems.append(f"after {' '.join(extra)}: {names}, latest {latest}; want {want_names}")
        problems += same_run(twice)
    except RuntimeError as e:
        problems.append(str(e))
    suite.check("train_checkpoint_retention", not problems, "; ".join(problems),
                "stop at 7, resume to 11, resume to the end: {5,7} {10,11} {15,20}; same result as straight")

    # resuming a finished run evaluates again: its final record replaces the old one
    try:
        pretrain(eval_r, straight, "--resume")
        _, held = records(straight)
        ok = [(h["step"], h["heldout_loss"]) for h in held] == [(h["step"], h["heldout_loss"]) for h in held_s]
        why = f"held-out records {[h['step'] for h in held]}"
    except RuntimeError as e:
        ok, why = False, str(e)
    suite.check("train_resume_finished_run_no_duplicate_eval", ok, why)

    # eval_every is validated like the other fields: the error names the file and the field
    cases = [(dict(eval_every=-1), "eval_every"), (dict(eval_every=2.5), "eval_every"),
             (dict(eval_every="4"), "eval_every"), (dict(eval_every=1e10), "eval_every"),
             (dict(eval_every=True), "eval_every"), (dict(eval_every=4, heldout=None), "heldout")]
    problems = []
    for i, (fields, expect) in enumerate(cases):
        bad = {k: v for k, v in dict(recipe, **fields).items() if v is not None}
        path = os.path.join(d, f"bad_{i}.json")
        with open(path, "w") as f:
            json.dump(bad, f)
        p, _ = run_cmd([jetmoe, "pretrain", "--recipe", path, "--out", os.path.join(d, f"bad_run_{i}")])
        err = p.stderr.strip()
        if not (p.returncode not in (0, 130) and path in err and "eval_every" in err and expect in err and
                len(err.splitlines()) == 1):
            problems.append(f"{fields}: exit {p.returncode}: {err[-200:]!r}")
    suite.check("train_eval_every_validation", not problems, "; ".join(problems), f"{len(cases)} bad recipes")

    # the checkpoint's tokenizer_config.json: model_max_length is the model's context, the rest as trained
    problems = []
    with open(os.path.join(recipe["tokenizer"], "tokenizer_config.json")) as f:
        src = json.load(f)
    with open(os.path.join(straight, "checkpoints", f"step_{total}", "tokenizer_config.json")) as f:
        got = json.load(f)
    ctx = recipe["model"]["max_position_embeddings"]
    if src.get("model_max_length") == ctx:
        problems.append(f"the fixture's tokenizer already says {ctx}: the check would prove nothing")
    if got.get("model_max_length") != ctx:
        problems.append(f"model_max_length {got.get('model_max_length')}, want {ctx}")
    if list(got) != list(src) or {k: v for k, v in got.items() if k != "model_max_length"} != \
            {k: v for k, v in src.items() if k != "model_max_length"}:
        problems.append(f"other fields changed: {sorted(set(got.items()) ^ set(src.items()), key=str)[:4]}")
    # a malformed tokenizer_config.json fails the checkpoint with its path in the message
    tok_bad = os.path.join(d, "tok_bad")
    os.makedirs(tok_bad)
    for name in os.listdir(recipe["tokenizer"]):
        with open(os.path.join(recipe["tokenizer"], name), "rb") as f, open(os.path.join(tok_bad, name), "wb") as g:
            g.write(f.read() if name != "tokenizer_config.json" else b'{"model_max_length": 4096,')
    p, _ = run_cmd([jetmoe, "pretrain", "--recipe", write_recipe("tok_bad", tokenizer=tok_bad), "--out",
                os.path.join(d, "tok_bad_run"), "--stop-after", "1", "--quiet"])
    if p.returncode in (0, 130) or os.path.join(tok_bad, "tokenizer_config.json") not in p.stderr:
        problems.append(f"malformed tokenizer_config.json: exit {p.returncode}: {p.stderr.strip()[-200:]!r}")
    suite.check("train_checkpoint_tokenizer_config", not problems, "; ".join(problems),
                f"model_max_length {src.get('model_max_length')} -> {got.get('model_max_length')}, "
                f"{len(got) - 1} other fields kept")

    # loss.svg: panels, phase boundary at its step, held-out points, lr following the schedule, smoothed loss
    problems = []
    try:
        svg = ET.parse(os.path.join(straight, "loss.svg")).getroot()
    except (OSError, ET.ParseError) as e:
        suite.check("train_plot_svg", False, f"loss.svg: {e}")
        return
    panels = {r.get("data-panel"): r for r in svg.iter(SVG + "rect") if r.get("class") == "panel"}
    if sorted(panels) != ["expert-load", "loss", "lr"]:
        suite.check("train_plot_svg", False, f"panels {sorted(panels)}")
        return
    left, width = float(panels["loss"].get("x")), float(panels["loss"].get("width"))

    def x_of(step):
        return left + step / total * width

    def by_class(tag, cls):
        return [e for e in svg.iter(SVG + tag) if e.get("class") == cls]

    bounds = by_class("line", "phase-boundary")
    starts = [0]
    for ph in recipe["phases"][:-1]:
        starts.append(starts[-1] + ph["steps"])
    if [(round(float(b.get("x1")), 1), round(float(b.get("x2")), 1)) for b in bounds] != \
            [(round(x_of(s), 1),) * 2 for s in starts[1:]]:
        problems.append(f"phase boundaries at x {[b.get('x1') for b in bounds]}, want {[x_of(s) for s in starts[1:]]}")
    names = [(t.text, float(t.get("x"))) for t in by_class("text", "phase-name")]
    if [n for n, _ in names] != [ph["name"] for ph in recipe["phases"]] or \
            any(abs(x - x_of(s)) > 10 for (_, x), s in zip(names, starts)):
        problems.append(f"phase names {names}")
    circles = by_class("circle", "heldout")
    if len(circles) != len(held_s):
        problems.append(f"{len(circles)} held-out points for {len(held_s)} held-out records")
    else:
        for c, h in zip(circles, held_s):
            if abs(float(c.get("cx")) - x_of(h["step"])) > 0.05:
                problems.append(f"held-out point of step {h['step']} at x {c.get('cx')}, want {x_of(h['step'])}")
        # higher loss is higher up: cy orders the points as the losses do, reversed
        by_loss = sorted(range(len(held_s)), key=lambda i: held_s[i]["heldout_loss"])
        by_cy = sorted(range(len(held_s)), key=lambda i: -float(circles[i].get("cy")))
        if by_loss != by_cy:
            problems.append(f"held-out points' heights {[c.get('cy') for c in circles]} do not follow the losses")
    lr_lines = by_class("polyline", "lr")
    bottom = float(panels["lr"].get("y")) + float(panels["lr"].get("height"))
    lr_at = {round(x, 1): bottom - y for x, y in points(lr_lines[0])} if len(lr_lines) == 1 else {}
    ratios = [s["lr"] / lr_at[round(x_of(s["step"]), 1)] for s in steps_s if round(x_of(s["step"]), 1) in lr_at]
    if len(ratios) != len(steps_s) or max(ratios) / min(ratios) - 1 > 0.01:
        problems.append(f"lr curve: {len(lr_lines)} paths, {len(ratios)} of {len(steps_s)} logged steps on it, "
                        f"lr/height {ratios[:3]}...")
    raw, ema = by_class("polyline", "loss-raw"), by_class("polyline", "loss-ema")
    if len(raw) != 1 or len(ema) != 1 or len(points(raw[0])) != len(steps_s) != len(points(ema[0])):
        problems.append(f"loss paths: {len(raw)} raw, {len(ema)} smoothed, {len(steps_s)} logged steps")
    else:
        def variation(pts):
            return sum(abs(b[1] - a[1]) for a, b in zip(pts, pts[1:]))
        if not variation(points(ema[0])) < variation(points(raw[0])):
            problems.append("the smoothed loss varies as much as the raw one")
        opacity = float(raw[0].get("stroke-opacity", "1"))
        if not opacity < 1 or ema[0].get("stroke-opacity") not in (None, "1"):
            problems.append(f"raw loss opacity {opacity}, smoothed {ema[0].get('stroke-opacity')}")
    load = by_class("polyline", "expert-load")
    if len(load) != 1 or len(points(load[0])) != len(steps_s):
        problems.append(f"expert-load panel: {len(load)} paths")
    texts = " ".join("".join(t.itertext()) for t in svg.iter(SVG + "text"))
    for label in ("loss (nats/token)", "learning rate", "optimizer step", "tokens seen", "min expert share"):
        if label not in texts:
            problems.append(f"no axis label {label!r}")
    suite.check("train_plot_svg", not problems, "; ".join(problems),
                f"3 panels, boundary at step {starts[1:]}, {len(circles)} held-out points, lr on "
                f"{len(ratios)} steps")

    eval_windows_spread(suite, jetmoe, os.path.join(plain, "checkpoints", f"step_{total}"), d)


def write_shard(path, ids, vocab, eos):
    """A token shard as README's table says (u16 ids)."""
    hdr = b"JMTOKENS" + struct.pack("<IIQII", 1, 2, len(ids), vocab, eos) + bytes(32)
    with open(path, "wb") as f:
        f.write(hdr + struct.pack(f"<{len(ids)}H", *ids))


def eval_windows_spread(suite, jetmoe, ck, d):
    """A capped evaluation scores windows spread over all the shards (floor(i*W/k) of W), not the
    first ones: `eval --max-tokens` over three shards == an uncapped eval of exactly those windows."""
    if not suite.wanted("train_eval_windows_spread"):
        return
    T, vocab = 16, 400
    rng = [(i * 7919 + 13) % 397 + 3 for i in range(T * 30)]  # 30 windows of varied ids
    full, picked = os.path.join(d, "spread_full"), os.path.join(d, "spread_picked")
    os.makedirs(full), os.makedirs(picked)
    sizes = (7, 13, 10)  # windows per shard; each shard ends with a partial window that is never scored
    start = 0
    for i, n in enumerate(sizes):
        write_shard(os.path.join(full, f"shard_{i:05d}.bin"), rng[start * T:(start + n) * T] + [2] * 5, vocab, 2)
        start += n
    W, k = sum(sizes), 5
    want = [i * W // k for i in range(k)]  # windows 0, 6, 12, 18, 24: all three shards
    write_shard(os.path.join(picked, "shard_00000.bin"), [t for w in want for t in rng[w * T:(w + 1) * T]], vocab, 2)

    def ev(data, *extra):
        p, _ = run_cmd([jetmoe, "eval", ck, "--data", data, "--seq-len", str(T), "--threads", "1"] + list(extra))
        return json.loads(p.stdout) if p.returncode == 0 else p.stderr.strip()[-300:]

    capped, exact = ev(full, "--max-tokens", str(k * (T - 1))), ev(picked)
    first = ev(full, "--max-tokens", str(k * (T - 1)), "--decode")
    ok = isinstance(capped, dict) and isinstance(exact, dict) and isinstance(first, dict) and \
        capped["tokens"] == exact["tokens"] == k * (T - 1) and capped["loss"] == exact["loss"] and \
        abs(first["loss"] - exact["loss"]) < 1e-4
    suite.check("train_eval_windows_spread", ok, f"capped {capped}; the picked windows {exact}; decode {first}",
                f"{k} of {W} windows over {len(sizes)} shards: {want}")
