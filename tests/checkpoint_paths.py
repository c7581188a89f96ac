"""Where a model is: every command that reads a checkpoint accepts the model
directory, a training run (its newest checkpoint), the run's checkpoints/
folder and checkpoints/latest; a file where a directory is expected, or a
latest that names anything but step_N, is one clear error.

run(suite, jetmoe, run_dir, tmp): run_dir is a finished training run.
"""
import os
import shutil
import subprocess

from testlib import sanitizer_report

EXPECT_DIR = "expected a model directory (config.json + *.safetensors)"


def _run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace")


def run(suite, jetmoe, run_dir, tmp):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        newest = os.path.join(run_dir, "checkpoints", f.read().strip())

    # the same greedy ids from the model directory and from each way of naming the run
    if suite.wanted("checkpoint_paths_run_dir"):
        gen = ["generate", "--tokens", "1,5,9", "--greedy", "--ids", "--max-new", "6"]
        want = _run([jetmoe, gen[0], newest] + gen[1:])
        got, problems = {}, []
        for name, path in (("run", run_dir), ("checkpoints", os.path.join(run_dir, "checkpoints")),
                           ("latest", os.path.join(run_dir, "checkpoints", "latest"))):
            p = _run([jetmoe, gen[0], path] + gen[1:])
            got[name] = p.stdout.split()
            if p.returncode != 0 or sanitizer_report(p.stderr) or p.stdout != want.stdout:
                problems.append(f"{name}: exit {p.returncode} {p.stdout!r} {p.stderr.strip()[-200:]!r}")
        info = _run([jetmoe, "info", run_dir])
        if info.returncode != 0 or "model.embed_tokens.weight" not in info.stdout:
            problems.append(f"info RUN: exit {info.returncode} {info.stderr.strip()[-200:]!r}")
        suite.check("checkpoint_paths_run_dir", want.returncode == 0 and len(want.stdout.split()) == 6 and
                    not problems, f"model dir: exit {want.returncode} {want.stdout!r}; {problems}",
                    "generate RUN, RUN/checkpoints, RUN/checkpoints/latest == the newest checkpoint; info RUN")

    # a file where a directory is expected: one line that says so, for every command that reads a model
    if suite.wanted("checkpoint_paths_file_for_dir"):
        problems = []
        files = [os.path.join(newest, n) for n in ("model.safetensors", "config.json", "tokenizer.model")]
        for cmd in (["generate", "{}", "--prompt", "hi", "--max-new", "2"], ["chat", "{}"], ["info", "{}"],
                    ["eval", "{}", "--data", "/nonexistent"], ["forward", "{}", "--tokens", "1,2"],
                    ["quantize", "{}", "--to", "q8", "--out", os.path.join(tmp, "never_written")]):
            for f in files:
                argv = [jetmoe] + [a.replace("{}", f) for a in cmd]
                p = subprocess.run(argv, capture_output=True, text=True, input="", timeout=120, errors="replace")
                err = p.stderr.strip()
                if p.returncode == 0 or len(err.splitlines()) != 1 or EXPECT_DIR not in err or \
                        sanitizer_report(err):
                    problems.append(f"{cmd[0]} {os.path.basename(f)}: exit {p.returncode} {err[-200:]!r}")
        suite.check("checkpoint_paths_file_for_dir", not problems and not os.path.exists(
            os.path.join(tmp, "never_written")), "; ".join(problems)[:1500],
                    f"6 commands x {len(files)} files: '{EXPECT_DIR}'")

    # checkpoints/latest must say step_N: never followed outside the run, never a crash
    if suite.wanted("checkpoint_paths_latest_checked"):
        bad_run = os.path.join(tmp, "bad_run")
        shutil.copytree(newest, os.path.join(bad_run, "checkpoints", "step_1"))
        latest = os.path.join(bad_run, "checkpoints", "latest")
        problems = []
        for content in ("../../../base", "/etc", "step_1/../../..", "step_-1", "step_01", "step_", "", "step_2",
                        "step_1 junk", "\x00", "step_1" * 100):
            with open(latest, "w") as f:
                f.write(content + "\n")
            p = _run([jetmoe, "generate", bad_run, "--tokens", "1,2", "--max-new", "2", "--ids"])
            err = p.stderr.strip()
            if p.returncode == 0 or len(err.splitlines()) != 1 or sanitizer_report(err) or \
                    ("step_N" not in err and "not a directory" not in err):
                problems.append(f"{content[:20]!r}: exit {p.returncode} {err[-200:]!r}")
        with open(latest, "w") as f:
            f.write("step_1\n")
        p = _run([jetmoe, "generate", bad_run, "--tokens", "1,2", "--max-new", "2", "--ids"])
        if p.returncode != 0:
            problems.append(f"step_1: exit {p.returncode} {p.stderr.strip()[-200:]!r}")
        empty = os.path.join(tmp, "empty_dir")
        os.makedirs(empty, exist_ok=True)
        p = _run([jetmoe, "generate", empty, "--tokens", "1,2"])
        if p.returncode == 0 or "training run (checkpoints/latest)" not in p.stderr:
            problems.append(f"empty dir: exit {p.returncode} {p.stderr.strip()[-200:]!r}")
        suite.check("checkpoint_paths_latest_checked", not problems, "; ".join(problems)[:1500],
                    "11 bad latest files refused, step_1 followed, an empty directory explained")
