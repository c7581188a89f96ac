#!/usr/bin/python3
"""Alignment objectives (SFT and DPO) of the C code against the independent reference
tests/ref/align_ref.py: the loss and every parameter's gradient, on pre-tokenized records.

The C side is run as
  jetmoe sft --model DIR --data F.jsonl --dump-grad OUT.safetensors
  jetmoe dpo --model DIR --data F.jsonl --dump-grad OUT.safetensors [--ref DIR] [--beta B]
             [--label-smoothing E]
taking the whole file as one batch (records packed several to a row) and dumping `loss` (the
total objective), `aux_loss`, `z_loss`, `ce_loss` | `dpo_loss` ([1] F32) and `grad.<HF name>` for
every parameter. The reference runs each record (each DPO sequence) alone, so agreement is also
the proof that packing equals one-by-one. Loss and its parts: relative error <= 1e-5; every
gradient: ||g_c - g_ref|| / max(||g_ref||, 1e-30) <= 1e-4 (the worst parameter is reported).

  align_ref_selftest_*                      align_ref.py checked against itself (relayed)
  align_ref_sft_<model>                     SFT: -100 prompt spans, a record without labels, an
                                            unlabelled last token, lengths 3..30 (max_position 64)
  align_ref_dpo_<model>_defaults            DPO, the policy its own reference, default beta/eps
  align_ref_dpo_<model>_ref_ls0.2           --ref a perturbed copy (delta != 0), beta 0.25, eps 0.2
  align_ref_dpo_<model>_ref_ls0             --ref, --label-smoothing 0, default beta (tiny model)
  align_ref_sft_prompt_tokens_get_no_loss   the same records with one prompt span's labels -100 vs
                                            set to the ids: the C gradients differ, both match
  align_ref_sft_labels_are_targets          labels that differ from input_ids are the targets

Models (jetmoe_ref.py make, in tmp): tiny (top-2, tied, non-default loss coefficients), top-1
untied with 3 layers, and a BF16 2-shard model with one KV head and 6 experts.
Called from tests/run_tests.py as run(suite, build, tmpdir).
"""
import json
import math
import os
import struct
import subprocess
import time

import numpy as np

from testlib import sanitizer_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = "/usr/bin/python3"
MAKE = os.path.join(ROOT, "tests", "ref", "jetmoe_ref.py")
ALIGN = os.path.join(ROOT, "tests", "ref", "align_ref.py")
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4

MODELS = {
    "tiny": dict(cfg=dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                          intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=64, aux_loss_coef=0.05, z_loss_coef=0.005),
                 dtype="F32", shards=1),
    "top1_untied_l3": dict(cfg=dict(vocab_size=80, hidden_size=40, num_hidden_layers=3, num_key_value_heads=2,
                                    kv_channels=12, intermediate_size=20, num_local_experts=5,
                                    num_experts_per_tok=1, tie_word_embeddings=False, rope_theta=500.0,
                                    max_position_embeddings=64),
                           dtype="F32", shards=1),
    "bf16_sharded_kv1_e6": dict(cfg=dict(vocab_size=72, hidden_size=24, num_hidden_layers=3, num_key_value_heads=1,
                                         kv_channels=16, intermediate_size=16, num_local_experts=6,
                                         num_experts_per_tok=2, max_position_embeddings=64, aux_loss_coef=0.02,
                                         z_loss_coef=0.003),
                                dtype="BF16", shards=2),
}
# (name, model, kind, C/reference flags, uses the perturbed reference model)
CASES = [(f"align_ref_sft_{m}", m, "sft", [], False) for m in MODELS] + \
        [(f"align_ref_dpo_{m}_defaults", m, "dpo", [], False) for m in MODELS] + \
        [(f"align_ref_dpo_{m}_ref_ls0.2", m, "dpo", ["--beta", "0.25", "--label-smoothing", "0.2"], True)
         for m in MODELS] + \
        [("align_ref_dpo_tiny_ref_ls0", "tiny", "dpo", ["--label-smoothing", "0"], True)]
EXTRA = ["align_ref_sft_prompt_tokens_get_no_loss", "align_ref_sft_labels_are_targets"]
PROMPT_RECORD, PROMPT_SPAN = 1, 12  # the SFT record (30 tokens) whose 12-token prompt span the prompt check unmasks


# ---------------------------------------------------------------- records

def sft_records(rng, V):
    """Ten records, lengths 3..30: record 0 has no labels, record 1 a long -100 prompt span, one a
    -100 hole in the middle too, one an unlabelled last token, one labels == input_ids given."""
    lengths = [3, 30] + [int(x) for x in rng.integers(4, 31, size=8)]
    recs = []
    for i, T in enumerate(lengths):
        ids = [int(x) for x in rng.integers(0, V, size=T)]
        if i == 0:
            recs.append({"input_ids": ids})
            continue
        labels = list(ids)
        if i != 3:  # record 3: labels given, equal to the ids
            p = PROMPT_SPAN if i == PROMPT_RECORD else int(rng.integers(1, T - 1))
            labels[:p] = [-100] * p
        if i == 4 and T >= 8:  # a second masked span (a user turn between two answers)
            labels[T - 5:T - 3] = [-100, -100]
        if i == 5:
            labels[-1] = -100
        recs.append({"input_ids": ids, "labels": labels})
    return recs


def dpo_records(rng, V):
    """Six pairs, prompts of 1..12 tokens and completions of 1..14 (chosen and rejected of
    different lengths), so the pairs' sequences pack several to a row."""
    shapes = [(1, 4, 9), (12, 1, 6), (5, 14, 2), (8, 7, 11), (3, 10, 1), (6, 2, 13)]
    ids = lambda n: [int(x) for x in rng.integers(0, V, size=n)]  # noqa: E731
    return [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
            for p, c, r in shapes]


def write_jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return path


# ---------------------------------------------------------------- running and comparing

def read_dump(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        dt = {"F32": np.float32, "F64": np.float64}.get(t["dtype"])
        if dt is None:
            raise ValueError(f"{path}: {name} has dtype {t['dtype']}, expected F32 (or F64)")
        out[name] = np.frombuffer(buf[8 + n + b:8 + n + e], dtype=dt).reshape(t["shape"]).astype(np.float64)
    return out


def start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")


def finish(p, timeout=300):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        err += f"\n(timed out after {timeout}s)"
    return p.returncode, out, err


def compare(ref, got, kind):
    """-> (problems, detail) for a reference dump vs the C dump."""
    problems, stats = [], []
    for key in ("loss", "aux_loss", "z_loss", "ce_loss" if kind == "sft" else "dpo_loss"):
        if key not in got:
            problems.append(f"{key} missing from the C dump")
            continue
        if got[key].shape != (1,):
            problems.append(f"{key} has shape {list(got[key].shape)}, expected [1]")
            continue
        r, g = float(ref[key][0]), float(got[key][0])
        rel = abs(r - g) / max(abs(r), 1e-30)
        stats.append(f"{key} rel {rel:.1e}")
        if not rel <= LOSS_TOL:
            problems.append(f"{key} {g!r} vs reference {r!r} (rel {rel:.2g})")
    grads = [k for k in ref if k.startswith("grad.")]
    extra = sorted(k for k in got if k.startswith("grad.") and k not in ref)
    if extra:
        problems.append(f"unexpected tensors in the C dump: {', '.join(extra[:4])}")
    worst, worst_name = 0.0, "-"
    for k in grads:
        if k not in got:
            problems.append(f"{k} missing from the C dump")
            continue
        a, b = ref[k], got[k]
        if a.shape != b.shape:
            problems.append(f"{k} has shape {list(b.shape)}, expected {list(a.shape)}")
            continue
        na = np.linalg.norm(a)
        if not na > 0:
            problems.append(f"{k}: reference gradient is zero (the test would not see a bug there)")
        rel = np.linalg.norm(a - b) / max(na, 1e-30)
        if not np.isfinite(rel):
            problems.append(f"{k}: the C gradient is not finite")
        elif rel > worst:
            worst, worst_name = rel, k
    if not worst <= GRAD_TOL:
        problems.append(f"{worst_name}: gradient relative error {worst:.2e} > {GRAD_TOL:g}")
    stats.append(f"{len(grads)} gradients, worst {worst:.1e} ({worst_name})")
    return problems, ", ".join(stats)


def summary(text):
    """The reference's stdout line (`loss 1.2 aux_loss 3.4 ...`) as {key: value}."""
    words = text.split()
    return {words[i]: words[i + 1] for i in range(0, len(words) - 1, 2)}


def reference_batch(d, name, jobs):
    """Starts one align_ref.py process for jobs [(id, argv, tool)] (torch is imported once)."""
    path = os.path.join(d, name + ".jobs.jsonl")
    write_jsonl(path, [{"id": i, "argv": a, "tool": t} for i, a, t in jobs])
    return start([PY, ALIGN, "batch", path])


def batch_results(p, timeout=300, tool="align_ref.py"):
    """-> ({id: (rc, stdout, stderr)}, why the batch itself failed or "") of a
    reference's `batch` command (tests/ref/jetmoe_ref.py run_batch)."""
    rc, out, err = finish(p, timeout)
    res = {}
    for line in out.splitlines():
        try:
            r = json.loads(line)
            res[r["id"]] = (r["rc"], r["stdout"], r["stderr"])
        except (ValueError, KeyError, TypeError):
            pass
    return res, ("" if rc == 0 else f"{tool} batch exit {rc}: {err.strip()[-500:]}")


def flat_grads(d):
    return np.concatenate([d[k].reshape(-1) for k in sorted(d) if k.startswith("grad.")])


def labels_target_records(V):
    """Labels that are not the input ids (HF: the label is the target), two -100 first."""
    rng = np.random.default_rng(77)
    recs = []
    for T in (9, 17, 5):
        ids = [int(x) for x in rng.integers(0, V, size=T)]
        labels = [-100, -100] + [(x + 1 + int(rng.integers(0, 3))) % V for x in ids[2:]]
        recs.append({"input_ids": ids, "labels": labels})
    return recs


# ---------------------------------------------------------------- the module

def run(suite, build, tmp):
    t0 = time.time()
    selftest = start([PY, ALIGN, "selftest"]) if suite.wanted("align_ref_selftest") else None
    cases = [c for c in CASES if suite.wanted(c[0])]
    extra = [n for n in EXTRA if suite.wanted(n)]
    if selftest is None and not cases and not extra:
        return
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    d = os.path.join(tmp, "align_ref")
    os.makedirs(d, exist_ok=True)

    # jobs: (id, model, kind, records, flags, uses the perturbed reference model)
    data = {}
    for i, m in enumerate(MODELS):
        rng = np.random.default_rng(700 + i)
        V = MODELS[m]["cfg"]["vocab_size"]
        data[m, "sft"] = sft_records(rng, V)
        data[m, "dpo"] = dpo_records(rng, V)
    jobs = {name: (m, kind, data[m, kind], flags, use_ref) for name, m, kind, flags, use_ref in cases}
    if "align_ref_sft_prompt_tokens_get_no_loss" in extra:
        masked = data["tiny", "sft"]
        unmasked = [dict(r) for r in masked]
        unmasked[PROMPT_RECORD]["labels"] = list(masked[PROMPT_RECORD]["input_ids"])
        jobs["align_ref_sft_tiny"] = ("tiny", "sft", masked, [], False)
        jobs["prompt_unmasked"] = ("tiny", "sft", unmasked, [], False)
    if "align_ref_sft_labels_are_targets" in extra:
        jobs["labels_targets"] = ("tiny", "sft", labels_target_records(MODELS["tiny"]["cfg"]["vocab_size"]), [], False)

    # models: the policies, then a perturbed F32 copy of each (the DPO --ref), in one process
    made, setup = {}, []
    for i, m in enumerate(MODELS):
        if any(j[0] == m for j in jobs.values()):
            spec = MODELS[m]
            setup.append((m, ["make", "--out", os.path.join(d, m), "--config", json.dumps(spec["cfg"]), "--seed",
                              str(31 + i), "--dtype", spec["dtype"], "--shards", str(spec["shards"])], "jetmoe_ref"))
            if any(j[0] == m and j[4] for j in jobs.values()):
                setup.append((m + "_ref", ["perturb", os.path.join(d, m), "--out", os.path.join(d, m + "_ref"),
                                           "--scale", "0.05", "--seed", "5"], "align_ref"))
    if setup:
        res, why = batch_results(reference_batch(d, "setup", setup))
        for sid, _, _ in setup:
            rc, _, err = res.get(sid, (None, "", why))
            made[sid] = rc == 0
            if rc != 0:
                suite.check(f"align_ref_setup_{sid}", False, f"making the model failed ({rc}): {err.strip()[-500:]}")
    jobs = {n: j for n, j in jobs.items() if made.get(j[0]) and (not j[4] or made.get(j[0] + "_ref"))}

    # the reference (one background process) and the C commands, side by side
    argv = {}
    for name, (m, kind, recs, flags, use_ref) in jobs.items():
        data_path = write_jsonl(os.path.join(d, name + ".jsonl"), recs)
        argv[name] = [kind, os.path.join(d, m), "--data", data_path] + list(flags) + \
            (["--ref", os.path.join(d, m + "_ref")] if use_ref else [])
    ref_proc = reference_batch(d, "objectives", [(n, a + ["--dump", os.path.join(d, n + ".ref.st")],
                                                  "align_ref") for n, a in argv.items()]) if jobs else None
    c_runs = {}
    for name, a in argv.items():
        c_dump = os.path.join(d, name + ".c.st")
        rc, _, err = finish(start([jetmoe, a[0], "--model"] + a[1:] + ["--dump-grad", c_dump]))
        c_runs[name] = (rc, err.strip(), c_dump)
    ref_res, ref_why = batch_results(ref_proc) if ref_proc else ({}, "")

    if selftest is not None:
        rc, out, err = finish(selftest)
        lines = suite.relay(out)
        if rc != 0 and not any(l.startswith("FAIL ") for l in lines):
            suite.check("align_ref_selftest_exit", False, f"exit {rc}: {err.strip()[-800:]}")

    def outcome(name):
        """-> (ref dump, C dump, why, reference summary); dumps None when a side failed."""
        kind = jobs[name][1]
        rc, out, err = ref_res.get(name, (None, "", ref_why))
        if rc != 0:
            return None, None, f"reference failed ({rc}): {err.strip()[-500:]}", {}
        ref, info = read_dump(os.path.join(d, name + ".ref.st")), summary(out)
        rc, err, c_dump = c_runs[name]
        if rc != 0 or sanitizer_report(err):
            head = f"C command `jetmoe {kind}` is missing" if "unknown command" in err else f"jetmoe {kind} exit {rc}"
            return ref, None, f"{head}: {err[-400:]!r}; the reference ran (loss {info.get('loss', '?')})", info
        try:
            return ref, read_dump(c_dump), "", info
        except (OSError, ValueError, KeyError) as e:
            return ref, None, f"C dump unreadable: {e}", info

    for name, m, kind, flags, use_ref in cases:
        if name not in jobs:
            continue
        ref, got, why, info = outcome(name)
        if got is None:
            suite.check(name, False, why)
            continue
        problems, stats = compare(ref, got, kind)
        recs = jobs[name][2]
        ntok = sum(len(r["input_ids"]) for r in recs) if kind == "sft" else \
            sum(2 * len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"])
                for r in recs)
        stats += f"; {len(recs)} {'records' if kind == 'sft' else 'pairs'}, {ntok} tokens"
        if use_ref:
            dl = float(ref["dpo_loss"][0])
            if abs(dl - math.log(2)) < 1e-3:
                problems.append(f"test too weak: dpo_loss {dl:.6f} ~ log 2, the reference model changes nothing")
            stats += f", delta {info.get('delta_min', '?')}..{info.get('delta_max', '?')}"
        stats += f", closest routing tie {info.get('router_margin', '?')}"
        suite.check(name, not problems, "; ".join(problems[:5]), stats)

    name = "align_ref_sft_prompt_tokens_get_no_loss"
    if name in extra and "prompt_unmasked" in jobs:
        runs, problems = [], []
        for tag, job in (("masked", "align_ref_sft_tiny"), ("unmasked", "prompt_unmasked")):
            ref, got, why, _ = outcome(job)
            if got is None:
                problems.append(f"{tag}: {why}")
                break
            problems += [f"{tag}: {x}" for x in compare(ref, got, "sft")[0][:3]]
            runs.append((ref, got))
        detail = ""
        if len(runs) == 2:
            rm, ru = flat_grads(runs[0][0]), flat_grads(runs[1][0])
            gm, gu = flat_grads(runs[0][1]), flat_grads(runs[1][1])
            r_diff = np.linalg.norm(rm - ru) / max(np.linalg.norm(rm), 1e-30)
            c_diff = np.linalg.norm(gm - gu) / max(np.linalg.norm(gm), 1e-30) if gm.shape == gu.shape else math.nan
            if not c_diff > 1e-2:
                problems.append(f"the C gradient does not change when the prompt's labels are unmasked "
                                f"(relative change {c_diff:.1e}; the reference's {r_diff:.1e})")
            detail = (f"unmasking {PROMPT_SPAN} prompt labels changes the gradient by {c_diff:.2f} "
                      f"(reference {r_diff:.2f}); both match the reference")
        suite.check(name, not problems, "; ".join(problems[:5]), detail)

    name = "align_ref_sft_labels_are_targets"
    if name in extra and "labels_targets" in jobs:
        ref, got, why, _ = outcome("labels_targets")
        if got is None:
            suite.check(name, False, why)
        else:
            problems, stats = compare(ref, got, "sft")
            suite.check(name, not problems, "; ".join(problems[:5]), stats)
    print(f"# align_ref: {time.time() - t0:.1f}s", flush=True)
