"""Issue 11, points 7-10 in part: what pretrain and prepare refuse before they do any work
(run_tests.py calls run()).

7. A recipe is checked whole before the first step: tokenizer, sources, heldout, their
   vocabulary and EOS against the model; a bad one fails within a second and the run
   directory is not created (or, when it exists, is left byte-identical).
8. Typos: a fraction where a count is meant, an unknown key at any level (with a
   "did you mean" when one is close).
9. A JSONL record's "text" with \\u0000 is kept whole; a record that is not strict JSON is
   refused with file:line.
10. An empty entry in a comma-list flag is an argument error naming the flag and the entry.

Every refusal is checked for its exit status, a single line naming the file and field, and
that nothing was written.
"""
import json
import os
import shutil
import struct
import subprocess

import run_tests  # its fixture and runner, looked up when run() is called (run_tests imports this module)
from testlib import sanitizer_report

CHECKS = ("recipe_checks_inputs", "recipe_checks_existing_run_untouched", "recipe_checks_valid_variants",
          "recipe_checks_integers", "recipe_checks_unknown_keys", "recipe_checks_jsonl_nul_kept",
          "recipe_checks_jsonl_refused", "recipe_checks_comma_lists")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA2 = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "llama2-tokenizer", "tokenizer.model")


def write_shard(path, ids, vocab, eos):
    """A token shard as README's format says (2-byte ids)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"JMTOKENS" + struct.pack("<IIQII", 1, 2, len(ids), vocab, eos) + bytes(32))
        f.write(struct.pack(f"<{len(ids)}H", *ids))


def read_shard(path):
    with open(path, "rb") as f:
        b = f.read()
    (n,) = struct.unpack("<Q", b[16:24])
    vocab, eos = struct.unpack("<II", b[24:32])
    return list(struct.unpack(f"<{n}H", b[64:64 + 2 * n])), vocab, eos


def snapshot(d):
    """Every file and directory under d: {relative path: bytes, or None for a directory}."""
    out = {}
    for base, dirs, files in os.walk(d):
        for n in dirs:
            out[os.path.relpath(os.path.join(base, n), d)] = None
        for n in files:
            with open(os.path.join(base, n), "rb") as f:
                out[os.path.relpath(os.path.join(base, n), d)] = f.read()
    return out


def one_line_error(p, rc, must):
    """None if p exited with rc and one stderr line holding every string of must, else what is wrong."""
    err = p.stderr.strip()
    missing = [m for m in must if m not in err]
    if p.returncode != rc or missing or len(err.splitlines()) != 1 or sanitizer_report(p.stderr):
        return f"exit {p.returncode} (want {rc}), missing {missing}: {err[-300:]!r}"
    return None


def run(suite, build, tmp):
    if not any(suite.wanted(n) for n in CHECKS):
        return
    run_cmd = run_tests.run
    fixture = run_tests.pretrain_fixture(suite, build, tmp, "recipe_checks")
    if fixture is None:
        return
    jetmoe, d, recipe = fixture
    limit = 2.0 if "asan" in build else 1.0  # seconds a refusal may take, process start included
    cases_dir, runs_dir = os.path.join(d, "cases"), os.path.join(d, "runs")
    os.makedirs(cases_dir)
    os.makedirs(runs_dir)

    def write_recipe(name, r):
        path = os.path.join(cases_dir, name + ".json")
        with open(path, "w") as f:
            f.write(r if isinstance(r, str) else json.dumps(r))
        return path

    def pretrain(rpath, out, *extra):
        return run_cmd([jetmoe, "pretrain", "--recipe", rpath, "--out", out, "--quiet"] + list(extra))

    def refuse(name, r, must, problems, times):
        """The recipe r must be refused: exit 1, one line naming the recipe and must, no run directory."""
        path = write_recipe(name, r)
        out = os.path.join(runs_dir, name)
        p, secs = pretrain(path, out)
        times.append((secs, name))
        why = one_line_error(p, 1, [path] + must)
        if why:
            problems.append(f"{name}: {why}")
        elif os.path.exists(out):
            problems.append(f"{name}: the run directory {out} was created")
        elif secs > limit:
            problems.append(f"{name}: took {secs:.2f} s (limit {limit} s)")

    def variant(**fields):
        r = json.loads(json.dumps(recipe))
        for k, v in fields.items():
            if v is None:
                r.pop(k, None)
            else:
                r[k] = v
        return r

    def model(**fields):
        return dict(recipe["model"], **fields)

    # ---- data the cases point at: shards written by hand, a second tokenizer directory
    shards = os.path.join(d, "shards")
    real_ids, vocab, eos = read_shard(os.path.join(shards, "code", "shard_00000.bin"))
    write_shard(os.path.join(d, "vocab300", "s.bin"), [i % 300 for i in real_ids], 300, 2)
    write_shard(os.path.join(d, "eos3", "s.bin"), real_ids, vocab, 3)
    write_shard(os.path.join(d, "short", "s.bin"), real_ids[:10], vocab, eos)
    os.makedirs(os.path.join(d, "corrupt"))
    with open(os.path.join(d, "corrupt", "s.bin"), "wb") as f:
        f.write(b"JMTOKENS\x01")
    tok = recipe["tokenizer"]
    tok_bad = os.path.join(d, "tok_bad_config")
    shutil.copytree(tok, tok_bad)
    with open(os.path.join(tok_bad, "tokenizer_config.json"), "w") as f:
        f.write('{"model_max_length": 4096,')
    os.makedirs(os.path.join(d, "tok_empty"))
    big_tok, big_pieces = os.path.join(d, "tok_big"), 32000
    if os.path.isfile(LLAMA2):
        os.makedirs(big_tok)
        shutil.copy(LLAMA2, big_tok)
    else:  # without the Llama-2 fixture the same rule is tested on the fixture's tokenizer
        big_tok, big_pieces = tok, vocab

    # ---- 7: everything a run reads, checked before its first step
    if suite.wanted("recipe_checks_inputs"):
        problems, times = [], []
        big_model = model(vocab_size=400 if big_pieces > 400 else 300)
        cases = [
            ("heldout_missing", variant(heldout="/nonexistent/held"), ["field heldout", "/nonexistent/held"]),
            ("heldout_no_shards", variant(heldout=os.path.join(d, "text", "prose")),
             ["field heldout", "no token shards"]),
            ("heldout_other_vocab", variant(heldout=os.path.join(d, "vocab300")),
             ["field heldout", "vocab size 300", "model.vocab_size is 400"]),
            ("heldout_other_eos", variant(heldout=os.path.join(d, "eos3")), ["field heldout", "EOS id 3"]),
            ("heldout_too_short", variant(heldout=os.path.join(d, "short")),
             ["field heldout", "whole window of seq_len 32"]),
            ("heldout_corrupt", variant(heldout=os.path.join(d, "corrupt")), ["field heldout", "s.bin", "truncated"]),
            ("tokenizer_missing", variant(tokenizer="/nonexistent"), ["field tokenizer", "/nonexistent"]),
            ("tokenizer_a_file", variant(tokenizer=os.path.join(tok, "tokenizer.model")),
             ["field tokenizer", "not a directory holding tokenizer.model or tokenizer.json"]),
            ("tokenizer_empty_dir", variant(tokenizer=os.path.join(d, "tok_empty")),
             ["field tokenizer", "not a directory holding"]),
            ("tokenizer_bad_config", variant(tokenizer=tok_bad),
             ["field tokenizer", os.path.join(tok_bad, "tokenizer_config.json")]),
            ("tokenizer_more_pieces_than_vocab", variant(tokenizer=big_tok, model=big_model),
             [f"has {big_pieces} pieces", f"more than model.vocab_size {big_model['vocab_size']}"]),
            ("tokenizer_400_vocab_300", variant(model=model(vocab_size=300)),
             ["has 400 pieces", "more than model.vocab_size 300", "no embedding row"]),
            ("model_eos_not_tokenizers", variant(model=model(eos_token_id=3)),
             ["model.eos_token_id is 3", "ends documents with 2"]),
            ("source_missing", variant(sources=dict(recipe["sources"], code="/nonexistent/code")),
             ["field sources", "/nonexistent/code"]),
            ("source_other_vocab", variant(sources=dict(recipe["sources"], code=os.path.join(d, "vocab300"))),
             ["field sources", "vocab size 300"]),
            ("source_other_eos", variant(sources=dict(recipe["sources"], code=os.path.join(d, "eos3"))),
             ["field sources", "EOS id 3"]),
            ("shards_not_model_vocab", variant(model=model(vocab_size=500)),
             ["vocab size 400", "model.vocab_size is 500"]),
            ("eval_every_without_heldout", variant(eval_every=4, heldout=None), ["eval_every", "needs heldout"]),
        ]
        for name, r, must in cases:
            refuse(name, r, must, problems, times)
        worst = max(times)
        suite.check("recipe_checks_inputs", not problems, "; ".join(problems),
                    f"{len(cases)} bad recipes refused before any write, the slowest in {worst[0]:.2f} s "
                    f"({worst[1]}); a {big_pieces}-piece tokenizer against vocab_size "
                    f"{big_model['vocab_size']} among them")

    # ---- the valid recipe and variants of it that must pass the check (one step each)
    good = os.path.join(runs_dir, "good")
    p, _ = pretrain(write_recipe("good", recipe), good, "--stop-after", "1")
    if p.returncode != 0:
        suite.check("recipe_checks_valid_variants", False, f"the fixture's recipe: {p.stderr.strip()[-300:]}")
        return
    ck = os.path.join(good, "checkpoints", "step_1")
    if suite.wanted("recipe_checks_valid_variants"):
        problems = []
        # a model with spare embedding rows: tokenizer 400 pieces <= vocab_size 512, shards made for 512
        for src in ("prose", "code"):
            ids, _, e = read_shard(os.path.join(shards, src, "shard_00000.bin"))
            write_shard(os.path.join(d, "v512", src, "s.bin"), ids, 512, e)
        with open(os.path.join(ck, "config.json")) as f:
            ck_config = json.load(f)
        ok_cases = [
            ("spare_embedding_rows", variant(model=model(vocab_size=512), heldout=os.path.join(d, "v512", "code"),
                                             sources={s: os.path.join(d, "v512", s) for s in ("prose", "code")})),
            # whole numbers written as floats (Python's json writes 12.0) are whole numbers
            ("integral_floats", variant(seq_len=32.0, batch_size=4.0, seed=3.0, model=model(vocab_size=400.0),
                                        phases=[dict(ph, steps=float(ph["steps"])) for ph in recipe["phases"]])),
            # a checkpoint's own config.json as the model (architectures, model_type, torch_dtype included)
            ("checkpoint_config_as_model", variant(model=ck_config)),
        ]
        for name, r in ok_cases:
            p, _ = pretrain(write_recipe(name, r), os.path.join(runs_dir, name), "--stop-after", "1")
            if p.returncode != 0:
                problems.append(f"{name}: exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
        suite.check("recipe_checks_valid_variants", not problems, "; ".join(problems),
                    f"{len(ok_cases)} valid variants train: " + ", ".join(n for n, _ in ok_cases))

    # ---- 8: fractions where counts are meant
    if suite.wanted("recipe_checks_integers"):
        problems, times = [], []
        cases = [("steps_2_5", variant(phases=[dict(recipe["phases"][0], steps=2.5), recipe["phases"][1]]),
                  ["phases[0]", "field steps must be an integer", "not 2.5"]),
                 ("steps_string", variant(phases=[dict(recipe["phases"][0], steps="12"), recipe["phases"][1]]),
                  ["phases[0]", "field steps", "not a string"]),
                 ("steps_true", variant(phases=[recipe["phases"][0], dict(recipe["phases"][1], steps=True)]),
                  ["phases[1]", "field steps", "not true"]),
                 ("steps_huge", variant(phases=[dict(recipe["phases"][0], steps=1e300), recipe["phases"][1]]),
                  ["phases[0]", "field steps", "not 1e+300"])]
        for f in ("seq_len", "batch_size", "grad_accum", "seed", "checkpoint_every", "log_every", "eval_every",
                  "eval_tokens"):
            cases.append((f"{f}_fraction", variant(**{f: recipe.get(f, 1) + 0.5}),
                          [f"field {f} must be an integer", "not "]))
        for f in ("warmup_steps", "decay_steps"):
            cases.append((f"schedule_{f}_fraction", variant(schedule=dict(recipe["schedule"], **{f: 2.5})),
                          ["schedule", f"field {f} must be an integer", "not 2.5"]))
        for f in ("vocab_size", "num_hidden_layers", "max_position_embeddings", "eos_token_id"):
            cases.append((f"model_{f}_fraction", variant(model=model(**{f: recipe["model"].get(f, 2) + 0.5})),
                          ["model", f"field {f} must be an integer"]))
        for name, r, must in cases:
            refuse(name, r, must, problems, times)
        suite.check("recipe_checks_integers", not problems, "; ".join(problems),
                    f"{len(cases)} fractional counts refused, the slowest in {max(times)[0]:.2f} s")

    # ---- 8: unknown keys at every level, with a hint when one is close
    if suite.wanted("recipe_checks_unknown_keys"):
        problems, times = [], []
        ph0, ph1 = recipe["phases"]
        cases = [
            ("top_lerning_rate", variant(lerning_rate=1e-3),
             ['unknown field "lerning_rate"', 'did you mean "optimizer.lr"']),
            ("optimizer_lerning_rate", variant(optimizer={"lerning_rate": 1e-3}),
             ['optimizer: unknown field "lerning_rate"', 'did you mean "lr"']),
            ("optimizer_learning_rate", variant(optimizer={"learning_rate": 1e-3}),
             ['optimizer: unknown field "learning_rate"', 'did you mean "lr"']),
            ("optimizer_weight_decy", variant(optimizer={"lr": 1e-3, "weight_decy": 0.1}),
             ['optimizer: unknown field "weight_decy"', 'did you mean "weight_decay"']),
            ("top_lr", variant(lr=1e-3), ['unknown field "lr"', 'did you mean "optimizer.lr"']),
            ("top_warmup_steps", variant(warmup_steps=3),
             ['unknown field "warmup_steps"', 'did you mean "schedule.warmup_steps"']),
            ("top_vocab_size", variant(vocab_size=400), ['did you mean "model.vocab_size"']),
            ("top_seq_length", variant(seq_length=32), ['unknown field "seq_length"', 'did you mean "seq_len"']),
            ("top_comment", variant(comment="a note"), ['unknown field "comment"']),
            ("schedule_warmup_step", variant(schedule={"type": "wsd", "warmup_step": 3}),
             ['schedule: unknown field "warmup_step"', 'did you mean "warmup_steps"']),
            ("phase_mixtrue", variant(phases=[ph0, {"name": "p2", "steps": 8, "mixtrue": ph1["mixture"]}]),
             ['phases[1]: unknown field "mixtrue"', 'did you mean "mixture"']),
            ("phase_stpes", variant(phases=[{"name": "p1", "stpes": 12, "mixture": ph0["mixture"]}, ph1]),
             ['phases[0]: unknown field "stpes"', 'did you mean "steps"']),
            ("mixture_prse", variant(phases=[dict(ph0, mixture={"prse": 1}), ph1]),
             ['phases[0]: mixture names unknown source "prse"', 'did you mean "prose"']),
            ("model_vocab_sise", variant(model=model(vocab_sise=400)),
             ['model: unknown field "vocab_sise"', 'did you mean "vocab_size"']),
            ("model_num_layers", variant(model=model(num_layers=2)),
             ['model: unknown field "num_layers"', 'did you mean "num_hidden_layers"']),
            ("model_output_hidden_states", variant(model=model(output_hidden_states=True)),
             ['model: unknown field "output_hidden_states"']),
            ("key_with_newline", variant(**{"bad\nkey": 1}), ['unknown field "bad\\x0akey"']),
            ("nul_in_a_path", variant(tokenizer=tok + "\u0000junk"), ["\\u0000 (a NUL character)"]),
            ("optimizer_not_object", variant(optimizer=5), ["field optimizer must be an object, not 5"]),
        ]
        for name, r, must in cases:
            refuse(name, r, must, problems, times)
        # a hint only where one is close
        for name in ("top_comment", "model_output_hidden_states"):
            with open(os.path.join(cases_dir, name + ".json")) as f:
                p, _ = pretrain(f.name, os.path.join(runs_dir, name))
            if "did you mean" in p.stderr:
                problems.append(f"{name}: a hint where none is close: {p.stderr.strip()!r}")
        suite.check("recipe_checks_unknown_keys", not problems, "; ".join(problems),
                    f"{len(cases)} unknown keys refused (top, optimizer, schedule, phases, mixture, model)")

    # ---- 7/8: an existing run is left exactly as it was by a refused recipe, with and without --resume
    if suite.wanted("recipe_checks_existing_run_untouched"):
        problems = []
        before = snapshot(good)
        bad = [variant(heldout="/nonexistent/held"), variant(tokenizer=big_tok, model=model(vocab_size=300)),
               variant(phases=[dict(recipe["phases"][0], steps=2.5), recipe["phases"][1]]),
               variant(optimizer={"lerning_rate": 1e-3})]
        for i, r in enumerate(bad):
            path = write_recipe(f"existing_{i}", r)
            for extra in ([], ["--resume"]):
                p, _ = pretrain(path, good, *extra)
                if p.returncode != 1 or path not in p.stderr:
                    problems.append(f"case {i} {extra}: exit {p.returncode}: {p.stderr.strip()[-200:]!r}")
                if snapshot(good) != before:
                    problems.append(f"case {i} {extra}: the run directory changed")
        suite.check("recipe_checks_existing_run_untouched", not problems, "; ".join(problems),
                    f"{len(bad)} bad recipes x (fresh, --resume): {len(before)} entries byte-identical")

    # ---- 9: JSONL text with \u0000 is kept whole
    def encode(data):
        q = subprocess.run([jetmoe, "tokenizer", "encode", "--model", tok], input=data, capture_output=True)
        return [[int(x) for x in line.split()] for line in q.stdout.decode().splitlines()]

    def decode(ids):
        q = subprocess.run([jetmoe, "tokenizer", "decode", "--model", tok],
                           input=" ".join(map(str, ids)).encode() + b"\n", capture_output=True)
        return q.stdout[:-1]

    jd = os.path.join(d, "jsonl")
    os.makedirs(jd)
    if suite.wanted("recipe_checks_jsonl_nul_kept"):
        texts = [b"ab\x00cd", b"\x00", b"tail\x00", b"ab", b"plain text"]
        with open(os.path.join(jd, "nul.jsonl"), "w") as f:
            for t in texts:
                f.write(json.dumps({"id": 1, "text": t.decode()}) + "\n")  # json writes \u0000
        out = os.path.join(d, "shards_nul")
        p, _ = run_cmd([jetmoe, "prepare", "--tokenizer", tok, "--input", os.path.join(jd, "nul.jsonl"),
                        "--out", out])
        problems = []
        if p.returncode != 0:
            problems.append(f"prepare: exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
        else:
            got, _, e = read_shard(os.path.join(out, "shard_00000.bin"))
            want = []
            for ids in encode(b"\n".join(texts) + b"\n"):
                want += ids + [e]
            if got != want:
                problems.append(f"shard {got[:40]} != tokenizer encode of the whole texts {want[:40]}")
            first = got[:got.index(e)]
            if decode(first) != texts[0]:
                problems.append(f"the first record decodes to {decode(first)!r}, want {texts[0]!r}")
            if len(first) <= len(encode(b"ab\n")[0]):
                problems.append("the first record was cut at its NUL")
        suite.check("recipe_checks_jsonl_nul_kept", not problems, "; ".join(problems),
                    "\"ab\\u0000cd\" -> ids that decode to b'ab\\x00cd', as tokenizer encode of the same bytes")

    # ---- 9: records that are not strict JSON are refused with file:line; the shard directory stays as it was
    if suite.wanted("recipe_checks_jsonl_refused"):
        problems = []
        good_line = json.dumps({"text": "fine"})
        cases = [("bad_escape", good_line + '\n{"text": "a\\uZZZZb"}\n', ":2:", "not a JSON escape"),
                 ("short_escape", '{"text": "a\\u00"}\n', ":1:", "not a JSON escape"),
                 ("raw_control", good_line + "\n" + good_line + '\n{"text": "a\x01b"}\n', ":3:",
                  "a raw control character"),
                 ("control_outside", '\x01{"text": "a"}\n', ":1:", "a raw control character"),
                 ("no_text", '{"txt": "a"}\n', ":1:", 'no "text" string field')]
        existing = os.path.join(shards, "prose")
        before = snapshot(existing)
        for name, content, where, why in cases:
            path = os.path.join(jd, name + ".jsonl")
            with open(path, "w") as f:
                f.write(content)
            for out in (os.path.join(d, "shards_" + name), existing):
                # into the existing shards with --overwrite: the bad record must stop it before they are replaced
                p, _ = run_cmd([jetmoe, "prepare", "--tokenizer", tok, "--input", path, "--out", out] +
                               (["--overwrite"] if out == existing else []))
                bad = one_line_error(p, 1, [path + where, why])
                if bad:
                    problems.append(f"{name}: {bad}")
                if out == existing and snapshot(existing) != before:
                    problems.append(f"{name}: the existing shard directory changed")
                if out != existing and os.path.exists(out) and snapshot(out):
                    problems.append(f"{name}: wrote {sorted(snapshot(out))}")
        suite.check("recipe_checks_jsonl_refused", not problems, "; ".join(problems),
                    f"{len(cases)} malformed records refused with file:line, into a new and an existing directory")

    # ---- 10: empty entries in comma lists
    if suite.wanted("recipe_checks_comma_lists"):
        problems = []
        a, b = os.path.join(d, "text", "prose", "licenses.txt"), os.path.join(d, "text", "code", "code.py")
        out = os.path.join(d, "comma_out")
        cases = [(["prepare", "--tokenizer", tok, "--input", f"{a},,{b}", "--out", out], "--input: entry 2 is empty"),
                 (["prepare", "--tokenizer", tok, "--input", f"{a},", "--out", out], "--input: entry 2 is empty"),
                 (["prepare", "--tokenizer", tok, "--input", f",{a}", "--out", out], "--input: entry 1 is empty"),
                 (["prepare", "--tokenizer", tok, "--input", "", "--out", out], "--input: entry 1 is empty"),
                 (["tokenizer", "train", "--input", f"{a},,{b}", "--vocab-size", "300", "--out", out],
                  "--input: entry 2 is empty"),
                 (["forward", ck, "--tokens", "1,,2"], "--tokens"),
                 (["forward", ck, "--tokens", "1,2,"], "--tokens"),
                 (["generate", ck, "--tokens", ",1", "-n", "1"], "--tokens")]
        for args, msg in cases:
            p, _ = run_cmd([jetmoe] + args)
            lines = [l for l in p.stderr.strip().splitlines() if not l.startswith("jetmoe forward: using")
                     and not l.startswith("jetmoe generate: using")]
            if p.returncode != 2 or len(lines) != 1 or msg not in lines[0] or not lines[0].startswith(
                    f"jetmoe {args[0]}"):
                listed = args[args.index("--input" if "--input" in args else "--tokens") + 1]
                problems.append(f"{' '.join(args[:2])} {listed!r}: exit {p.returncode}: {p.stderr.strip()[-200:]!r}")
            if os.path.exists(out):
                problems.append(f"{' '.join(args[:2])}: {out} was created")
        suite.check("recipe_checks_comma_lists", not problems, "; ".join(problems),
                    f"{len(cases)} lists with an empty entry refused (exit 2, the flag named)")
