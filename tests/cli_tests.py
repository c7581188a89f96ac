#!/usr/bin/python3
"""The command-line interface: help, flag tables, aliases, sampling flags, timing.

  cli_help_<command>               `jetmoe CMD --help`, `-h` and `jetmoe help CMD`: exit 0, a `usage:` line on
                                   stdout, nothing on stderr (every command, subcommand and the tokenizer group)
  cli_help_has_no_other_effect     --help among other arguments runs nothing
  cli_usage_lists_flags_<command>  every spelling the parser accepts (`jetmoe help --flags CMD`, the table
                                   itself) is in CMD's usage, and the flags users rely on are in the table
  cli_flag_tables_all_listed       the tables in cli/*.c, read here from the source, are what --flags lists
  cli_range_errors_name_the_range  one line, exit 2, the range in the message
  cli_version                      --version / version: the version and the build flags
  then on a tiny model (`jetmoe tokenizer train` + `jetmoe init`, in tmp):
  cli_aliases_match_long_forms, cli_temperature_zero_is_greedy, cli_random_seed_printed_and_reproducible,
  cli_timing_line_on_its_own_line, cli_chat_top_k_stop_and_timing, cli_chat_turn_after_a_cut_reply,
  cli_repetition_penalty_matches_numpy
  (greedy ids with the penalty == numpy's penalty + argmax on the logits of `jetmoe forward`),
  cli_repetition_penalty_breaks_greedy_loop, cli_info_weight_format

Called from tests/run_tests.py as run(suite, jetmoe, tmpdir).
"""
import glob
import json
import os
import re
import shutil
import struct
import subprocess

import numpy as np

from testlib import sanitizer_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Commands and the flags each must keep taking (the generated usage must show them all).
EXPECTED_FLAGS = {
    "info": [],
    "forward": ["--tokens", "--dump", "--backward", "--overwrite", "--threads"],
    "init": ["--config", "--seed", "--overwrite"],
    "tokenizer encode": ["--model"],
    "tokenizer decode": ["--model"],
    "tokenizer chat": ["--no-generation-prompt", "--ids"],
    "tokenizer train": ["--input", "--vocab-size", "--out", "--byte-fallback", "--threads", "--max-sentences",
                        "--overwrite"],
    "prepare": ["--tokenizer", "--input", "--out", "--threads", "--shard-tokens", "--overwrite", "--text-field",
                "--part"],
    "pretrain": ["--recipe", "--out", "--resume", "--overwrite", "--threads", "--stop-after", "--quiet"],
    "generate": ["--prompt", "-p", "--tokens", "--tokenizer", "--max-new", "-n", "--temperature", "--temp",
                 "--top-k", "--top-p", "--seed", "--greedy", "--ids", "--stop", "--threads", "--kernels", "--weights",
                 "--repeat-penalty", "--repetition-penalty", "--repeat-last-n"],
    "chat": ["--system", "--max-new", "-n", "--temperature", "--temp", "--top-k", "--top-p", "--seed",
             "--greedy", "--stop", "--threads", "--kernels", "--weights", "--repeat-penalty",
             "--repetition-penalty", "--repeat-last-n", "--quiet"],
    "eval": ["--data", "--seq-len", "--max-tokens", "--decode", "--threads", "--kernels", "--weights"],
    "distill sft": ["--teacher", "--prompts", "--out", "--max-new", "--temperature", "--top-k", "--top-p", "--seed",
                    "--parallel", "--on-bad-line", "--overwrite", "--threads", "--kernels"],
    "distill pairs": ["--model", "--teacher", "--prompts", "--out", "--samples", "--max-new", "--temperature",
                      "--top-k", "--top-p", "--seed", "--parallel", "--on-bad-line", "--overwrite", "--threads",
                      "--kernels"],
    "quantize": ["--to", "--out", "--threads", "--overwrite"],
    "serve": ["--host", "--port", "--parallel", "--ctx", "--api-key", "--queue", "--max-body", "--tokenizer",
              "--threads", "--kernels", "--kv-cache", "--weights"],
    "help": ["--flags"],
    "version": [],
}
# The checks that need the tiny model.
MODEL_CHECKS = ["cli_aliases_match_long_forms", "cli_temperature_zero_is_greedy",
                "cli_random_seed_printed_and_reproducible", "cli_timing_line_on_its_own_line",
                "cli_chat_top_k_stop_and_timing", "cli_chat_turn_after_a_cut_reply",
                "cli_repetition_penalty_matches_numpy", "cli_repetition_penalty_breaks_greedy_loop",
                "cli_info_weight_format", "cli_weights_place"]
TIMING = re.compile(r"prompt: (\d+) tokens, ([\d.]+|-) tok/s \| generation: (\d+) tokens, ([\d.]+|-) tok/s \| "
                    r"(\w+) weights (mapped|in RAM), (\w+(?::\w+)?) kernels")


def run(suite, jetmoe, tmp):
    def jm(*args, stdin=None, merged=False):
        p = subprocess.run([jetmoe] + list(args), input=stdin, capture_output=not merged, text=True,
                           errors="replace", timeout=300,
                           **({"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if merged else {}))
        if p.stderr is None:
            p.stderr = ""
        return p

    def crashed(p):
        return p.returncode < 0 or sanitizer_report(p.stderr)

    commands = help_and_flags(suite, jm, crashed)
    range_errors(suite, jm)
    version(suite, jm)
    if commands is not None and (suite.wanted("cli_flag_tables_all_listed") or suite.wanted("cli_readme_flags_exist")):
        source_tables(suite, jm, commands)
    if any(suite.wanted(n) for n in MODEL_CHECKS):
        model = tiny_model(suite, jm, os.path.join(tmp, "cli"))
        if model:
            with_model(suite, jm, crashed, model, tmp)


def help_and_flags(suite, jm, crashed):
    """(a) every command's -h/--help and `help CMD`; (b) every flag it accepts is in its usage.
    Returns the command names `jetmoe help` lists."""
    p = jm("help")
    listed = [line[2:21].strip() for line in p.stdout.splitlines()
              if line.startswith("  ") and not line.startswith("  jetmoe")]
    missing = [c for c in EXPECTED_FLAGS if c not in listed]
    if suite.wanted("cli_help_lists_every_command"):
        suite.check("cli_help_lists_every_command", p.returncode == 0 and not missing,
                    f"exit {p.returncode}; missing {missing}; listed {listed}", f"{len(listed)} commands")
    for cmd in sorted(set(listed) | set(EXPECTED_FLAGS) | {"tokenizer"}):
        name = "cli_help_" + cmd.replace(" ", "_")
        if suite.wanted(name):
            problems = []
            for args in (cmd.split() + ["--help"], cmd.split() + ["-h"], ["help"] + cmd.split()):
                q = jm(*args)
                if q.returncode != 0 or q.stderr or crashed(q) or \
                        not any(l.startswith("usage:") for l in q.stdout.splitlines()):
                    problems.append(f"{' '.join(args)}: exit {q.returncode}, stdout {q.stdout[:120]!r}, "
                                    f"stderr {q.stderr[-200:]!r}")
            suite.check(name, not problems, "; ".join(problems))
        name = "cli_usage_lists_flags_" + cmd.replace(" ", "_")
        if cmd != "tokenizer" and suite.wanted(name):
            usage = jm(*cmd.split(), "--help").stdout
            q = jm("help", "--flags", *cmd.split())
            flags = q.stdout.split()
            absent = [f for f in flags if not re.search(r"(?<![\w-])" + re.escape(f) + r"(?![\w-])", usage)]
            lost = [f for f in EXPECTED_FLAGS.get(cmd, []) if f not in flags]
            suite.check(name, q.returncode == 0 and "--help" in flags and not absent and not lost,
                        f"exit {q.returncode}: not in the usage: {absent}; not in the table: {lost}",
                        f"{len(flags)} spellings")
    if suite.wanted("cli_help_has_no_other_effect"):
        d = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cli-help-effect-{os.getpid()}")
        q = jm("pretrain", "--recipe", "/nonexistent.json", "--out", d, "--help")
        r = jm("init", d, "--config", "/nonexistent.json", "-h")
        s = jm("generate", "/nonexistent", "--threads", "-5", "--prompt", "-h")  # -h as a value is no help
        ok = q.returncode == 0 and r.returncode == 0 and not os.path.exists(d) and "usage:" in q.stdout + r.stdout \
            and s.returncode == 2 and "--threads" in s.stderr
        suite.check("cli_help_has_no_other_effect", ok,
                    f"exit {q.returncode}/{r.returncode}/{s.returncode}; {d} exists {os.path.exists(d)}; "
                    f"{s.stderr[-200:]!r}")
    return listed


def source_tables(suite, jm, commands):
    """The flag tables as written in cli/*.c and cli/*.h (read independently of the binary) == the union of what
    `jetmoe help --flags CMD` lists for all commands."""
    in_source = set()
    for path in glob.glob(os.path.join(ROOT, "cli", "*.[ch]")):  # flags.h holds the shared sampling flags
        for m in re.finditer(r'\{"(-[\w-]+)", \{([^}]*)\}, FLAG_', open(path).read()):
            in_source.add(m.group(1))
            in_source.update(re.findall(r'"(-[\w-]+)"', m.group(2)))
    listed = set()
    for cmd in commands:
        listed.update(jm("help", "--flags", *cmd.split()).stdout.split())
    listed -= {"-h", "--help"}
    if suite.wanted("cli_flag_tables_all_listed"):
        suite.check("cli_flag_tables_all_listed", in_source and in_source == listed,
                    f"only in the source: {sorted(in_source - listed)}; only listed: {sorted(listed - in_source)}",
                    f"{len(in_source)} spellings in {len(commands)} commands")
    # the README names no flag the parser does not take (its CLI section is the user's first stop)
    if suite.wanted("cli_readme_flags_exist"):
        readme = open(os.path.join(ROOT, "README.md")).read()
        section = readme[readme.index("## The CLI"):readme.index("### Inference weights")]
        named = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", section))
        unknown = sorted(named - listed - {"-h", "--help", "--version", "--flag"})
        suite.check("cli_readme_flags_exist", len(named) > 20 and not unknown,
                    f"README names flags no command takes: {unknown}",
                    f"{len(named)} flags named in README's CLI section, all in the tables")


def range_errors(suite, jm):
    if not suite.wanted("cli_range_errors_name_the_range"):
        return
    cases = [
        (["generate", "DIR", "--threads", "-1"], "jetmoe generate: --threads wants an integer in [0, 4096], got '-1'"),
        (["generate", "DIR", "-n", "0"], "jetmoe generate: -n wants an integer in [1, 1048576], got '0'"),
        (["generate", "DIR", "--temp", "101"], "jetmoe generate: --temp wants a number in [0, 100], got '101'"),
        (["chat", "DIR", "--top-p", "0"], "jetmoe chat: --top-p wants a number in (0, 1], got '0'"),
        (["chat", "DIR", "--repeat-penalty", "0"],
         "jetmoe chat: --repeat-penalty wants a number in (0, 100], got '0'"),
        (["chat", "DIR", "--repeat-last-n=x"], "jetmoe chat: --repeat-last-n wants an integer in [-1, 1048576], "
                                               "got 'x'"),
        (["eval", "DIR", "--data", "D", "--seq-len", "1"], "jetmoe eval: --seq-len wants an integer in [2, 1048576], "
                                                           "got '1'"),
        (["tokenizer", "train", "--byte-fallback", "2"],
         "jetmoe tokenizer train: --byte-fallback wants an integer in [0, 1], got '2'"),
        (["init", "OUT", "--config", "c.json", "--seed", "1e3"],
         "jetmoe init: --seed wants an integer in [0, 2147483647], got '1e3'"),
        (["generate", "DIR", "--greedy=1"], "jetmoe generate: --greedy takes no value"),
        (["chat", "DIR", "--temp"], "jetmoe chat: --temp needs a value"),
        (["forward", "DIR"], "jetmoe forward: --tokens is required; usage: jetmoe forward DIR --tokens IDS [options]"),
        (["quantize", "--to", "q8"], "jetmoe quantize: missing DIR; usage:"),
        (["tokenizer"], "jetmoe tokenizer: missing subcommand"),
        (["tokenizer", "frob"], "jetmoe tokenizer: unknown subcommand 'frob'"),
        (["generate", "DIR", "--stop", "a"] + ["--stop", "b"] * 16,
         "jetmoe generate: --stop given too many times (at most 16)"),
    ]
    problems = []
    for args, want in cases:
        p = jm(*args)
        err = p.stderr.rstrip("\n")
        if p.returncode != 2 or p.stdout or "\n" in err or not err.startswith(want):
            problems.append(f"{args[:4]}: exit {p.returncode}: {err!r}, want {want!r}")
    suite.check("cli_range_errors_name_the_range", not problems, "; ".join(problems), f"{len(cases)} cases")


def version(suite, jm):
    if not suite.wanted("cli_version"):
        return
    a, b = jm("--version"), jm("version")
    out = a.stdout
    ok = a.returncode == 0 and b.returncode == 0 and a.stdout == b.stdout and not a.stderr and \
        re.match(r"jetmoe \d+\.\d+\.\d+\n", out) and all(k in out for k in ("compiler", "OPT", "SAN", "BLAS")) \
        and "-march=" in out and "gcc" in out
    suite.check("cli_version", bool(ok), f"exit {a.returncode}/{b.returncode}: {out!r} {a.stderr!r}",
                out.splitlines()[0] if out else "")


def tiny_model(suite, jm, d, context=128, check="cli_model_setup"):
    """A tokenizer trained on ASCII text and a freshly initialised model with its vocabulary, tokenizer
    files beside the weights (as the test model of run_tests.py's generation tests is made), in
    d/model; a context of `context` tokens. A failing step fails the check named `check`."""
    os.makedirs(d, exist_ok=True)
    text = os.path.join(d, "text.txt")
    lic = "/usr/share/common-licenses"
    prose = "".join(open(os.path.join(lic, f), errors="replace").read() for f in sorted(os.listdir(lic))
                    if os.path.isfile(os.path.join(lic, f)))
    with open(text, "w") as f:
        f.write("".join(c for c in prose if c == "\n" or " " <= c <= "~")[:120000])
    tok, model, cfg = os.path.join(d, "tok"), os.path.join(d, "model"), os.path.join(d, "config.json")
    with open(cfg, "w") as f:
        json.dump(dict(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                       intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=context), f)
    for args in (["tokenizer", "train", "--input", text, "--vocab-size", "400", "--out", tok, "--threads", "1"],
                 ["init", model, "--config", cfg, "--seed", "3"]):
        p = jm(*args)
        if p.returncode != 0:
            suite.check(check, False, f"{' '.join(args[:2])}: {p.stderr.strip()[-400:]}")
            return None
    for f in os.listdir(tok):
        shutil.copy(os.path.join(tok, f), model)
    return model


def read_logits(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    t = json.loads(buf[8:8 + n])["logits"]
    b, e = t["data_offsets"]
    return np.frombuffer(buf[8 + n + b:8 + n + e], dtype=np.float32).reshape(t["shape"])


def with_model(suite, jm, crashed, model, tmp):
    gen = ["generate", model, "--threads", "1"]

    def same_output(name, a, b, detail=""):
        p, q = jm(*gen, *a), jm(*gen, *b)
        ok = p.returncode == 0 and q.returncode == 0 and p.stdout == q.stdout and len(p.stdout) > 20 and \
            not crashed(p) and not crashed(q)
        suite.check(name, ok, f"exit {p.returncode}/{q.returncode}: {p.stdout[-120:]!r} vs {q.stdout[-120:]!r}; "
                    f"{p.stderr[-200:]!r} {q.stderr[-200:]!r}", detail)
        return p, q

    if suite.wanted("cli_aliases_match_long_forms"):
        same_output("cli_aliases_match_long_forms",
                    ["-p", "the license", "-n", "24", "--temp", "1.5", "--seed", "7", "--repetition-penalty", "1.2"],
                    ["--prompt", "the license", "--max-new", "24", "--temperature", "1.5", "--seed", "7",
                     "--repeat-penalty", "1.2"], "-p -n --temp --repetition-penalty")
    if suite.wanted("cli_temperature_zero_is_greedy"):
        p, _ = same_output("cli_temperature_zero_is_greedy", ["-p", "the license", "-n", "24", "--temperature", "0"],
                           ["-p", "the license", "-n", "24", "--greedy"])
        if "seed:" in p.stderr:
            suite.check("cli_temperature_zero_prints_no_seed", False, p.stderr[-200:])

    if suite.wanted("cli_random_seed_printed_and_reproducible"):
        args = ["-p", "the license", "-n", "32", "--temp", "2"]
        a, b = jm(*gen, *args), jm(*gen, *args)
        seeds = [re.findall(r"^seed: (\d+)$", x.stderr, re.M) for x in (a, b)]
        problems = []
        if a.returncode != 0 or b.returncode != 0 or [len(s) for s in seeds] != [1, 1]:
            problems.append(f"exit {a.returncode}/{b.returncode}; seeds {seeds}; {a.stderr[-200:]!r}")
        else:
            again = jm(*gen, *args, "--seed", seeds[0][0])
            if again.stdout != a.stdout or "seed:" in again.stderr:
                problems.append(f"--seed {seeds[0][0]}: {again.stdout[-100:]!r} vs {a.stdout[-100:]!r}")
            if seeds[0] == seeds[1]:
                problems.append(f"two runs drew the same seed {seeds[0]}")
        suite.check("cli_random_seed_printed_and_reproducible", not problems, "; ".join(problems),
                    f"seeds {seeds}")

    if suite.wanted("cli_timing_line_on_its_own_line"):
        problems = []
        enc = jm("tokenizer", "encode", "--model", model, stdin="the license\n").stdout.split()
        for extra in ([], ["--ids"], ["--stop", "e"]):
            p = jm(*gen, "-p", "the license", "-n", "16", "--greedy", *extra, merged=True)
            m = TIMING.search(p.stdout)
            if p.returncode != 0 or not m or (m.start() > 0 and p.stdout[m.start() - 1] != "\n") or \
                    p.stdout[m.end():] not in ("\n", " | ended at a stop string\n"):
                problems.append(f"{extra}: exit {p.returncode}: {p.stdout[-300:]!r}")
            elif int(m.group(1)) != len(enc) + 1 or (not extra and int(m.group(3)) != 16):
                problems.append(f"{extra}: counts {m.group(1)} prompt (want {len(enc) + 1}), {m.group(3)} generated")
        q = jm(*gen, "-p", "the license", "-n", "4", "--quiet")
        if TIMING.search(q.stderr):
            problems.append("--quiet still prints the timing line")
        suite.check("cli_timing_line_on_its_own_line", not problems, "; ".join(problems),
                    "after text, --ids and a stop string; none with --quiet")

    if suite.wanted("cli_chat_top_k_stop_and_timing"):
        # the penalty keeps the untrained model from repeating one token, so the replies have text to stop in
        chat = ["chat", model, "--threads", "1", "-n", "12", "--repeat-penalty", "100", "--repeat-last-n", "8"]
        script = "hello there\nwhat is it\n/exit\n"
        a = jm(*chat, "--temp", "0", stdin=script)
        b = jm(*chat, "--top-k", "1", "--temp", "3", "--seed", "5", stdin=script)  # top-1 sampling is greedy
        one = jm(*chat, "--temp", "0", stdin="hello there\n")
        first = one.stdout[:-1]  # the first reply (each ends with a newline)
        problems = []
        if a.returncode != 0 or b.returncode != 0 or a.stdout != b.stdout or crashed(a) or crashed(b):
            problems.append(f"exit {a.returncode}/{b.returncode}: {a.stdout!r} vs {b.stdout!r} {b.stderr[-200:]!r}")
        if len(TIMING.findall(a.stderr)) != 2 or any(not TIMING.match(l) for l in a.stderr.splitlines()
                                                     if l.startswith("prompt:")):
            problems.append(f"not one timing line per reply: {a.stderr!r}")
        # a stop string taken from the first reply: that reply ends right before it
        stop = next((first[i:i + 2] for i in range(2, len(first) - 1) if first[i:i + 2].isalnum() and
                     first.find(first[i:i + 2]) == i), None)
        if stop is None:
            problems.append(f"no stop string to take from {first!r}")
        else:
            c = jm(*chat, "--temp", "0", "--stop", stop, "--quiet", stdin="hello there\n")
            if c.returncode != 0 or c.stdout != first[:first.index(stop)] + "\n" or TIMING.search(c.stderr):
                problems.append(f"--stop {stop!r}: exit {c.returncode}: {c.stdout!r}, want first reply "
                                f"{first[:first.index(stop)]!r}; {c.stderr[-200:]!r}")
        suite.check("cli_chat_top_k_stop_and_timing", not problems, "; ".join(problems),
                    f"--top-k 1 == --temp 0; --stop {stop!r}")
    if suite.wanted("cli_chat_turn_after_a_cut_reply"):
        # greedy on the untrained model: a reply of one token repeated, cut at -n, re-encodes to the very ids
        # cached, whose last never went through the model; the next turn must not reuse it
        p = jm("chat", model, "--threads", "1", "-n", "12", "--greedy", stdin="hello there\nwhat is it\n")
        suite.check("cli_chat_turn_after_a_cut_reply", p.returncode == 0 and p.stderr.count("reply cut") == 2 and
                    len(TIMING.findall(p.stderr)) == 2 and not crashed(p), f"exit {p.returncode}: {p.stderr[-300:]!r}")

    if suite.wanted("cli_weights_place"):
        # the copy in RAM (Q8/Q4 rows interleaved there) decodes the same tokens as the mapping; auto
        # copies a model this small; generate maps by default, chat copies; a bad place is refused by name
        args = ["-p", "the license", "-n", "24", "--temp", "1.5", "--seed", "3"]
        runs = {w: jm(*gen, *args, *(["--weights", w] if w else [])) for w in ("map", "ram", "auto", "")}
        runs["chat"] = jm("chat", model, "--threads", "1", "-n", "4", "--greedy", stdin="hello\n")
        places = {w: (TIMING.search(p.stderr) or [None] * 7)[6] for w, p in runs.items()}
        bad = jm(*gen, *args, "--weights", "disk")
        problems = [f"{w}: exit {p.returncode}: {p.stderr[-200:]!r}" for w, p in runs.items()
                    if p.returncode != 0 or crashed(p)]
        if not problems and len({p.stdout for w, p in runs.items() if w != "chat"}) != 1:
            problems.append(f"outputs differ: {[p.stdout[-60:] for p in runs.values()]}")
        if places != {"map": "mapped", "ram": "in RAM", "auto": "in RAM", "": "mapped", "chat": "in RAM"}:
            problems.append(f"timing lines say {places}")
        if bad.returncode == 0 or crashed(bad) or "--weights" not in bad.stderr or "disk" not in bad.stderr:
            problems.append(f"--weights disk: exit {bad.returncode}: {bad.stderr[-200:]!r}")
        suite.check("cli_weights_place", not problems, "; ".join(problems), "map, ram and auto alike; defaults map (generate), auto (chat); disk refused")

    if any(suite.wanted(n) for n in MODEL_CHECKS if n.startswith("cli_repetition_penalty")):
        repetition_penalty(suite, jm, crashed, model, tmp)
    if suite.wanted("cli_info_weight_format"):
        info_weight_format(suite, jm, model, tmp)


def repetition_penalty(suite, jm, crashed, model, tmp):
    """Greedy ids with the penalty from the CLI == the penalty computed here in numpy (HF / llama.cpp:
    each distinct id of the last N tokens, prompt included: a positive logit / R, a negative one * R)
    followed by argmax, on the logits `jetmoe forward` gives for the same sequence."""
    prompt = [1, 45, 200, 45, 9, 310, 45, 77]
    R, N, new = 4.0, 6, 24
    base = ["generate", model, "--threads", "1", "--tokens", ",".join(map(str, prompt)), "--greedy", "--ids",
            "-n", str(new), "--quiet"]
    p = jm(*base, "--repeat-penalty", str(R), "--repeat-last-n", str(N))
    gen = [int(x) for x in p.stdout.split()]
    problems, changed, margin = [], 0, float("inf")
    if p.returncode != 0 or crashed(p) or len(gen) < 8:
        problems.append(f"generate: exit {p.returncode}: {p.stdout!r} {p.stderr[-300:]!r}")
    else:
        seq = prompt + gen
        dump = os.path.join(tmp, "cli_penalty_logits.st")
        f = jm("forward", model, "--tokens", ",".join(map(str, seq[:-1])), "--dump", dump, "--threads", "1")
        if f.returncode != 0:
            problems.append(f"forward: {f.stderr[-300:]}")
        else:
            logits = read_logits(dump).astype(np.float64)
            for i, got in enumerate(gen):
                t = len(prompt) + i  # the token at position t is chosen from the logits at t - 1
                row = logits[t - 1].copy()
                plain_choice = int(np.argmax(row))
                for tok in set(seq[max(0, t - N):t]):
                    row[tok] = row[tok] / R if row[tok] > 0 else row[tok] * R
                want = int(np.argmax(row))
                top2 = np.sort(row)[-2:]
                margin = min(margin, float(top2[1] - top2[0]))
                changed += want != plain_choice
                if got != want:
                    problems.append(f"step {i}: {got}, numpy says {want}")
                    break
        if not changed:
            problems.append("test too weak: the penalty changed no choice")
    suite.check("cli_repetition_penalty_matches_numpy", not problems, "; ".join(problems),
                f"{len(gen)} tokens, {changed} choices changed by the penalty, smallest top-2 gap {margin:.2e}")

    # greedy on this model repeats itself; with a strong penalty no token comes back within the window
    def repeats(ids, window):
        return sum(ids[i] in ids[max(0, i - window):i] for i in range(1, len(ids)))
    base = ["generate", model, "--threads", "1", "-p", "the license", "--greedy", "--ids", "-n", "40", "--quiet"]
    loop = [int(x) for x in jm(*base).stdout.split()]
    fixed = jm(*base, "--repeat-penalty", "100", "--repeat-last-n", "8")
    ids = [int(x) for x in fixed.stdout.split()]
    suite.check("cli_repetition_penalty_breaks_greedy_loop",
                fixed.returncode == 0 and len(ids) == 40 and repeats(loop, 8) >= 30 and repeats(ids, 8) == 0,
                f"repeats within 8 tokens: {repeats(loop, 8)} without, {repeats(ids, 8)} with --repeat-penalty 100: "
                f"{ids} {fixed.stderr[-200:]!r}",
                f"{repeats(loop, 8)} of 39 tokens repeat one of the last 8 without the penalty, 0 with it")


def info_weight_format(suite, jm, model, tmp):
    """`info` names the weight format (from the dtypes) and aligns the table for the long *_scale names."""
    problems, seen = [], []
    for fmt in ("f32", "q8", "q4"):
        d = model
        if fmt != "f32":
            d = os.path.join(tmp, "cli_" + fmt)
            q = jm("quantize", model, "--to", fmt, "--out", d, "--threads", "1")
            if q.returncode != 0:
                problems.append(f"quantize {fmt}: {q.stderr[-200:]}")
                continue
        p = jm("info", d)
        m = re.search(r"^weights +(\S+) \(", p.stdout, re.M)
        seen.append(m.group(1) if m else None)
        rows = [l for l in p.stdout.splitlines() if l.startswith("  model.") or l.startswith("  lm_head")]
        fields = [[f.start() for f in re.finditer(r"\S+", l)] for l in rows]
        dtype_cols, file_cols = {f[1] for f in fields}, {f[-1] for f in fields}
        if p.returncode != 0 or not m or m.group(1) != fmt:
            problems.append(f"{fmt}: exit {p.returncode}: {p.stdout[:300]!r}")
        if not rows or len(dtype_cols) != 1 or len(file_cols) != 1:
            problems.append(f"{fmt}: table not aligned: {rows[:3]}")
        if fmt != "f32" and not any("_scale" in l for l in rows):
            problems.append(f"{fmt}: no _scale tensors in the table")
    suite.check("cli_info_weight_format", not problems, "; ".join(problems), f"formats {seen}")
