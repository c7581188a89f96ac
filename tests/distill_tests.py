"""`jetmoe distill sft` and `jetmoe distill pairs` end to end, on an untrained tiny model and teacher
(cli_tests.tiny_model: a 400-piece tokenizer, context 128; the teacher is the same config at another
seed). Their text is gibberish; what is checked is the plumbing:

  distill_sft_records                  one SFT record per prompt: the prompt's messages then the
                                       teacher's answer, "answer" kept; the counts on stdout add up
  distill_sft_same_output_any_parallel the same bytes with --parallel 1, 3 and 8 (greedy and sampled:
                                       each answer has its own random stream); another seed differs
  distill_pairs_teacher                UltraFeedback pairs: prompt == chosen/rejected minus the answer,
                                       chosen's teacher score >= rejected's, counts add up; the same
                                       run twice gives the same bytes, --parallel 2 the same pairs
                                       (the teacher's scores within 1e-5: another summation order)
  distill_pairs_verifier_only          every record has an "answer" and no --teacher: each prompt is a
                                       pair or counted as all right / all wrong / too few answers
  distill_pairs_needs_teacher          a record without "answer" and no --teacher: FILE:LINE, nothing written
  distill_bad_lines_fail, distill_bad_lines_skip
                                       a malformed line and a prompt ending in the assistant's turn:
                                       the first stops the run with FILE:LINE (nothing written), or
                                       each is reported with FILE:LINE, counted, and the rest written
  distill_out_refused                  an existing --out needs --overwrite; the prompts file and the
                                       teacher's files are never replaced, even with it
  distill_interrupt_writes_nothing     SIGINT mid-run: exit 130, no output, no temporary file
  distill_outputs_read_back            jm_sft_load / jm_pref_load read the outputs back (needs
                                       src/align/records.c; before it is merged a "# note" says so)
  distill_generation_config            the answering model's generation_config.json sets the sampling
                                       defaults, as for generate and chat: max_new_tokens bounds sft's
                                       and pairs' answers, temperature makes sft sample (seeds differ);
                                       --max-new and --temperature given win

Called from tests/run_tests.py as run(suite, build, tmp).
"""
import json
import os
import shutil
import signal
import subprocess

from cli_tests import tiny_model
from testlib import sanitizer_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("distill_sft_records", "distill_sft_same_output_any_parallel", "distill_pairs_teacher",
          "distill_pairs_verifier_only", "distill_pairs_needs_teacher", "distill_bad_lines_fail",
          "distill_bad_lines_skip", "distill_out_refused", "distill_interrupt_writes_nothing",
          "distill_outputs_read_back", "distill_generation_config")
MAX_NEW = "24"

PROMPTS = [
    {"prompt": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
    {"prompt": "Anna has 12 apples and buys 7 more. How many does she have?", "answer": 19},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "Count to three."}]},
    {"prompt": "What does the license say about warranty?", "answer": "#### 42"},
    {"prompt": "Name a colour."},
    {"prompt": "Write one word."},
]


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_messages(rec):
    return rec["messages"] if "messages" in rec else [{"role": "user", "content": rec["prompt"]}]


def run(suite, build, tmp):
    if not any(suite.wanted(n) for n in CHECKS):
        return
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    reader = os.path.join(ROOT, build, "tests", "tool_read_records")

    def jm(*args):
        p = subprocess.run([jetmoe] + list(args), capture_output=True, text=True, errors="replace", timeout=300)
        return p

    def ok(p):
        return p.returncode == 0 and not sanitizer_report(p.stderr)

    def stats(p):
        try:
            return json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {}

    def outcome(p, path):
        """A run's problems so far, its counts and the records it wrote."""
        recs = read_jsonl(path) if ok(p) and os.path.exists(path) else []
        return ([] if ok(p) else [f"exit {p.returncode}: {p.stderr.strip()[-300:]}"]), stats(p), recs

    d = os.path.join(tmp, "distill")
    model = tiny_model(suite, jm, d)
    if model is None:
        return
    teacher = os.path.join(d, "teacher")
    p = jm("init", teacher, "--config", os.path.join(d, "config.json"), "--seed", "4")
    if p.returncode != 0:
        suite.check("distill_setup", False, p.stderr.strip()[-300:])
        return
    for f in os.listdir(os.path.join(d, "tok")):
        shutil.copy(os.path.join(d, "tok", f), teacher)
    prompts = os.path.join(d, "prompts.jsonl")
    write_jsonl(prompts, PROMPTS)
    answered = [r for r in PROMPTS if "answer" in r]
    with_answers = os.path.join(d, "answers.jsonl")
    write_jsonl(with_answers, answered)

    def out(name):
        return os.path.join(d, name)

    sft_args = ["distill", "sft", "--teacher", teacher, "--prompts", prompts, "--max-new", MAX_NEW, "--quiet"]
    pairs_args = ["distill", "pairs", "--model", model, "--teacher", teacher, "--prompts", prompts, "--samples", "4",
                  "--max-new", MAX_NEW, "--seed", "11", "--quiet"]

    # ---- sft
    sft = out("sft.jsonl")
    p = jm(*sft_args, "--out", sft, "--parallel", "3")
    if suite.wanted("distill_sft_records"):
        problems, st, recs = outcome(p, sft)
        if st.get("prompts") != len(PROMPTS) or st.get("records", -1) + st.get("skipped_empty", -1) != len(PROMPTS) \
                or st.get("records") != len(recs) or len(recs) < len(PROMPTS) - 1:
            problems.append(f"counts {st}, {len(recs)} records")
        given = [r for r in PROMPTS]
        for rec in recs:
            msgs = rec.get("messages", [])
            src = next((g for g in given if prompt_messages(g) == msgs[:-1]), None)
            if src is None or msgs[-1].get("role") != "assistant" or not msgs[-1].get("content"):
                problems.append(f"record {str(rec)[:200]} is not a prompt and its answer")
                continue
            if ("answer" in src) != ("answer" in rec) or ("answer" in src and rec["answer"] != str(src["answer"])):
                problems.append(f"answer {rec.get('answer')!r} for {src.get('answer')!r}")
        suite.check("distill_sft_records", not problems, "; ".join(problems[:4]),
                    f"{len(recs)} records from {len(PROMPTS)} prompts, {st.get('tokens')} tokens")

    if suite.wanted("distill_sft_same_output_any_parallel"):
        problems = []
        base = open(sft, "rb").read() if os.path.exists(sft) else b""
        for par in ("1", "8"):
            o = out(f"sft_p{par}.jsonl")
            q = jm(*sft_args, "--out", o, "--parallel", par)
            if not ok(q) or open(o, "rb").read() != base:
                problems.append(f"greedy --parallel {par}: exit {q.returncode}, differs from --parallel 3")
        sampled = []
        for par, seed in (("1", "5"), ("4", "5"), ("4", "6")):
            o = out(f"sft_s{seed}_p{par}.jsonl")
            q = jm(*sft_args, "--out", o, "--parallel", par, "--temperature", "1", "--seed", seed)
            sampled.append(open(o, "rb").read() if ok(q) else b"fail " + q.stderr.encode())
        if sampled[0] != sampled[1]:
            problems.append("sampled, seed 5: --parallel 1 and 4 differ")
        if sampled[0] == sampled[2]:
            problems.append("seeds 5 and 6 gave the same answers")
        suite.check("distill_sft_same_output_any_parallel", bool(base) and not problems, "; ".join(problems),
                    "greedy --parallel 1/3/8 and sampled --parallel 1/4 byte-identical")

    # ---- the sampling defaults from the answering model's generation_config.json
    if suite.wanted("distill_generation_config"):
        problems = []
        teacher_g, model_g = out("teacher_gen"), out("model_gen")
        for src, dst in ((teacher, teacher_g), (model, model_g)):
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)

        def gen_config(d, fields):
            with open(os.path.join(d, "generation_config.json"), "w") as f:
                json.dump(dict({"bos_token_id": 1, "eos_token_id": 2}, **fields), f)

        def answers(name, *args):
            o = out(name)
            q = jm("distill", "sft", "--teacher", teacher_g, "--prompts", prompts, "--out", o, "--quiet", *args)
            if not ok(q):
                problems.append(f"{name}: exit {q.returncode} {q.stderr.strip()[-200:]!r}")
            return stats(q), open(o, "rb").read() if ok(q) else b""

        gen_config(teacher_g, {"max_new_tokens": 3})
        st, _ = answers("gen_max3.jsonl")
        if not st.get("answers") or st.get("tokens", 1 << 30) > 3 * st["answers"]:
            problems.append(f"max_new_tokens 3: {st}")
        st, _ = answers("gen_max3_flag8.jsonl", "--max-new", "8")
        if not st.get("answers") or st.get("tokens", 0) <= 3 * st["answers"]:
            problems.append(f"max_new_tokens 3, --max-new 8: {st}")
        gen_config(teacher_g, {"temperature": 1.0, "max_new_tokens": 8})
        a, b = answers("gen_t1_s5.jsonl", "--seed", "5")[1], answers("gen_t1_s6.jsonl", "--seed", "6")[1]
        c, e = (answers(f"gen_t0_s{k}.jsonl", "--seed", k, "--temperature", "0")[1] for k in ("5", "6"))
        if a == b or c != e:
            problems.append(f"temperature 1 seeds 5/6 {'agree' if a == b else 'differ'}, "
                            f"--temperature 0 seeds 5/6 {'agree' if c == e else 'differ'}")
        # pairs: the model's file bounds its answers; one that says greedy does not stop it sampling
        gen_config(model_g, {"do_sample": False, "max_new_tokens": 3})
        q = jm("distill", "pairs", "--model", model_g, "--teacher", teacher, "--prompts", prompts, "--samples", "4",
               "--seed", "11", "--out", out("gen_pairs.jsonl"), "--quiet")
        st = stats(q)
        if not ok(q) or not st.get("answers") or st.get("tokens", 1 << 30) > 3 * st["answers"] or \
                st.get("skipped_tied", 0) == len(PROMPTS):
            problems.append(f"pairs with do_sample false, max_new_tokens 3: exit {q.returncode} {st} "
                            f"{q.stderr.strip()[-200:]!r}")
        suite.check("distill_generation_config", not problems, "; ".join(problems)[:1200],
                    "max_new_tokens, temperature from the file; --max-new, --temperature win; pairs still samples")

    # ---- pairs
    pairs = out("pairs.jsonl")
    p = jm(*pairs_args, "--out", pairs, "--parallel", "4")
    if suite.wanted("distill_pairs_teacher"):
        problems, st, recs = outcome(p, pairs)
        skipped = sum(v for k, v in st.items() if k.startswith("skipped_"))
        if st.get("prompts") != len(PROMPTS) or st.get("pairs", -1) + skipped != len(PROMPTS) or \
                st.get("pairs") != len(recs) or st.get("answers") != 4 * len(PROMPTS) or \
                st.get("by_verifier", 0) + st.get("by_teacher", 0) != len(recs) or not recs:
            problems.append(f"counts {st}, {len(recs)} pairs")
        for rec in recs:
            prompt = rec.get("prompt")
            src = next((g for g in PROMPTS if prompt_messages(g) == prompt), None)
            sides = [rec.get("chosen", []), rec.get("rejected", [])]
            if src is None or any(s[:-1] != prompt or s[-1].get("role") != "assistant" or not s[-1].get("content")
                                  for s in sides) or sides[0][-1] == sides[1][-1]:
                problems.append(f"pair {str(rec)[:200]}")
                continue
            if rec.get("ranked_by") == "teacher" and not rec["score_chosen"] >= rec["score_rejected"]:
                problems.append(f"teacher scores {rec['score_chosen']} < {rec['score_rejected']}")
            if rec.get("ranked_by") == "verifier" and (rec["score_chosen"], rec["score_rejected"]) != (1, 0):
                problems.append(f"verifier scores {rec['score_chosen']}, {rec['score_rejected']}")
            if ("answer" in src) != ("answer" in rec):
                problems.append("answer not kept")
        # the same run again: the same bytes; with --parallel 2 the same pairs, and the teacher's scores
        # within rounding (its products sum in another order when other sequences share the step)
        again, other = out("pairs_again.jsonl"), out("pairs_p2.jsonl")
        q, r = jm(*pairs_args, "--out", again, "--parallel", "4"), jm(*pairs_args, "--out", other, "--parallel", "2")
        if not ok(q) or not recs or open(again, "rb").read() != open(pairs, "rb").read():
            problems.append("the same run twice gave two files")
        p2 = read_jsonl(other) if ok(r) else []
        strip = [{k: v for k, v in x.items() if not k.startswith("score_")} for x in recs]
        if strip != [{k: v for k, v in x.items() if not k.startswith("score_")} for x in p2] or any(
                abs(a[k] - b[k]) > 1e-5 * abs(a[k]) for a, b in zip(recs, p2) for k in ("score_chosen", "score_rejected")):
            problems.append("--parallel 2 gave other pairs or scores")
        suite.check("distill_pairs_teacher", not problems, "; ".join(problems[:4]),
                    f"{len(recs)} pairs from {len(PROMPTS)} prompts x 4 samples: {st.get('by_teacher')} by the "
                    f"teacher, {st.get('by_verifier')} by the verifier")

    if suite.wanted("distill_pairs_verifier_only"):
        o = out("pairs_verifier.jsonl")
        q = jm("distill", "pairs", "--model", model, "--prompts", with_answers, "--out", o, "--samples", "3",
               "--max-new", MAX_NEW, "--seed", "2", "--quiet")
        st = stats(q)
        recs = read_jsonl(o) if ok(q) and os.path.exists(o) else None
        counted = st.get("pairs", -1) + st.get("skipped_all_right", 0) + st.get("skipped_all_wrong", 0) + \
            st.get("skipped_too_few_answers", 0)
        good = ok(q) and recs is not None and counted == len(answered) and st.get("by_teacher") == 0 and \
            st.get("skipped_tied") == 0 and all(r.get("ranked_by") == "verifier" for r in recs)
        suite.check("distill_pairs_verifier_only", good, f"exit {q.returncode}: {q.stderr.strip()[-300:]}; {st}",
                    f"{len(answered)} prompts: {st.get('pairs')} pairs, {st.get('skipped_all_wrong')} all wrong, "
                    f"{st.get('skipped_all_right')} all right")

    if suite.wanted("distill_pairs_needs_teacher"):
        o = out("pairs_no_teacher.jsonl")
        q = jm("distill", "pairs", "--model", model, "--prompts", prompts, "--out", o, "--max-new", MAX_NEW, "--seed", "1")
        line = next(i + 1 for i, r in enumerate(PROMPTS) if "answer" not in r)
        err = q.stderr.strip()
        suite.check("distill_pairs_needs_teacher", q.returncode == 1 and f"{prompts}:{line}:" in err and
                    "--teacher" in err and len(err.splitlines()) == 1 and not os.path.exists(o) and
                    not sanitizer_report(q.stderr), f"exit {q.returncode}: {err[-300:]!r}")

    # ---- bad lines
    bad = out("bad.jsonl")
    write_jsonl(bad, PROMPTS[:1], ['{"prompt": "unterminated', json.dumps(PROMPTS[1]),
                                   json.dumps({"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}),
                                   json.dumps(PROMPTS[2])])
    if suite.wanted("distill_bad_lines_fail"):
        o = out("bad_fail.jsonl")
        q = jm(*sft_args[:4], "--prompts", bad, "--out", o, "--max-new", "4")
        err = q.stderr.strip()
        suite.check("distill_bad_lines_fail", q.returncode == 1 and f"{bad}:2:" in err and len(err.splitlines()) == 1
                    and not os.path.exists(o) and not sanitizer_report(q.stderr), f"exit {q.returncode}: {err!r}")
    if suite.wanted("distill_bad_lines_skip"):
        o = out("bad_skip.jsonl")
        q = jm(*sft_args[:4], "--prompts", bad, "--out", o, "--max-new", "4", "--on-bad-line", "skip", "--quiet")
        st = stats(q)
        recs = read_jsonl(o) if ok(q) and os.path.exists(o) else []
        r = jm(*sft_args[:4], "--prompts", bad, "--out", o, "--on-bad-line", "maybe")
        good = ok(q) and f"{bad}:2:" in q.stderr and f"{bad}:4:" in q.stderr and st.get("bad_lines") == 2 and \
            st.get("prompts") == 3 and len(recs) + st.get("skipped_empty", 0) == 3 and r.returncode == 2 and \
            "--on-bad-line" in r.stderr
        suite.check("distill_bad_lines_skip", good, f"exit {q.returncode}/{r.returncode}: {q.stderr.strip()[-400:]!r}; "
                    f"{st}", "lines 2 and 4 reported, 3 prompts answered")

    # ---- what --out may replace
    if suite.wanted("distill_out_refused"):
        problems = []
        mine = out("notes.jsonl")
        with open(mine, "w") as f:
            f.write("my notes\n")
        q = jm(*sft_args, "--out", mine)
        if q.returncode != 1 or "--overwrite" not in q.stderr or open(mine).read() != "my notes\n":
            problems.append(f"existing file without --overwrite: exit {q.returncode}, {q.stderr.strip()[-200:]!r}")
        q = jm(*sft_args, "--out", mine, "--overwrite")
        if not ok(q) or not read_jsonl(mine):
            problems.append(f"--overwrite: exit {q.returncode}, {q.stderr.strip()[-200:]!r}")
        before = open(prompts, "rb").read()
        cfg = os.path.join(teacher, "config.json")
        cfg_before = open(cfg, "rb").read()
        for target in (prompts, cfg):
            q = jm(*sft_args, "--out", target, "--overwrite")
            if q.returncode != 1 or "never replaced" not in q.stderr:
                problems.append(f"--out {os.path.basename(target)} --overwrite: exit {q.returncode}, "
                                f"{q.stderr.strip()[-200:]!r}")
        q = jm(*pairs_args, "--out", os.path.join(model, "tokenizer.json"), "--overwrite")
        if q.returncode != 1 or "never replaced" not in q.stderr:
            problems.append(f"pairs --out into --model: exit {q.returncode}")
        if open(prompts, "rb").read() != before or open(cfg, "rb").read() != cfg_before:
            problems.append("an input changed")
        if [n for n in os.listdir(d) if ".tmp." in n]:
            problems.append("temporary files left")
        suite.check("distill_out_refused", not problems, "; ".join(problems))

    # ---- an interrupted run
    if suite.wanted("distill_interrupt_writes_nothing"):
        many = out("many.jsonl")
        write_jsonl(many, [{"prompt": f"Question {i}: what comes after {i}?"} for i in range(400)])
        o = out("interrupted.jsonl")
        proc = subprocess.Popen([jetmoe, *sft_args[:4], "--prompts", many, "--out", o, "--max-new", "20",
                                 "--parallel", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = ""
        while True:  # the first chunk's progress line: the run is under way
            line = proc.stderr.readline()
            seen += line
            if not line or line.startswith("distill sft:"):
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
        left = [n for n in os.listdir(d) if n.startswith("interrupted")]
        suite.check("distill_interrupt_writes_nothing", proc.returncode == 130 and not left and
                    "interrupted" in rest and not sanitizer_report(rest),
                    f"exit {proc.returncode}; left {left}; {(seen + rest).strip()[-300:]!r}")

    # ---- our own readers
    if suite.wanted("distill_outputs_read_back"):
        problems, notes = [], []
        for kind, path, n in (("sft", sft, None), ("pref", pairs, None)):
            if not os.path.exists(path):
                problems.append(f"{path} missing")
                continue
            q = subprocess.run([reader, kind, path, os.path.join(d, "tok"), "128"], capture_output=True, text=True)
            if "records stand-in" in q.stderr:
                notes.append(kind)
                continue
            lines = len(read_jsonl(path))
            try:
                got = json.loads(q.stdout)
            except ValueError:
                got = {}
            if q.returncode != 0 or got.get("examples") != lines or got.get("bad") != 0:
                problems.append(f"{kind}: exit {q.returncode}, {got}, {lines} lines; {q.stderr.strip()[-300:]}")
        if notes and not problems:
            print(f"# note: distill_outputs_read_back not run for {', '.join(notes)}: jm_sft_load and jm_pref_load "
                  "come with src/align/records.c, not on this branch yet", flush=True)
        else:
            suite.check("distill_outputs_read_back", not problems, "; ".join(problems),
                        "jm_sft_load and jm_pref_load read every record back")
