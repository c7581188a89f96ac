"""No command replaces or deletes what it did not write (issue 11, points 1-5; README: What writes where).

Every case snapshots the whole directory it works in - each entry's type, a regular file's bytes (SHA-256)
and inode, a symlink's target, a device's numbers - runs one command and compares. A refusal must exit
non-zero with one line on stderr that names the path and says what to do, and leave the snapshot exactly
as it was (nothing changed, nothing added). An allowed write may change only what it names.

  output_safety_forward_*     forward --dump: the model's own files (also through a symlink, a hard link,
                              a symlinked directory, ..), an existing file without --overwrite, a directory,
                              a link to nothing; with --overwrite a file and a symlink's target are replaced
                              (the link stays a link); a character device (a /dev/null made with mknod in the
                              test's directory, then /dev/null itself) and a FIFO with a reader are written
                              through and stay what they are; a FIFO with no reader is refused
  output_safety_quantize_*    --out holding another's files, the input's parent, the input, a file, a symlink
                              to the input, a checkpoint without --overwrite; with --overwrite a checkpoint
                              it wrote is replaced whole, no temporary directory left
  output_safety_init_*        over a sharded checkpoint (refused; with --overwrite exactly the new model,
                              no old shard or index left), over a trained model, over the config it reads,
                              beside another's file
  output_safety_pretrain_*    over an existing run without --resume (refused, whichever recipe), --resume with
                              --overwrite, --overwrite (a clean fresh run: no old checkpoint, metric or
                              latest; another's file untouched), another's file in checkpoints/, a recipe
                              whose tokenizer lives in the checkpoints --overwrite would remove
  output_safety_tokenizer_*   tokenizer train over a tokenizer, over its own input, with --overwrite
  output_safety_prepare_*     over shards, over another's shard_NNNNN.bin or manifest.json, over its input;
                              with --overwrite stale shards go and another's files stay
  output_safety_resume_latest_*  checkpoints/latest naming ../.., an absolute path or step_N/../..: refused

run(suite, build, tmp) is called from tests/run_tests.py.
"""
import hashlib
import json
import os
import select
import shutil
import stat
import subprocess
import time

import run_tests  # its fixtures, used at call time (run_tests imports this module too)
from testlib import sanitizer_report

PREFIX = "output_safety_"


def tree_state(root):
    """Every entry under root (root itself excluded), never following a link or opening a special file."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    state[rel] = ("file", hashlib.sha256(f.read()).hexdigest(), st.st_ino)
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir",)
            elif stat.S_ISCHR(st.st_mode):
                state[rel] = ("chardev", os.major(st.st_rdev), os.minor(st.st_rdev))
            elif stat.S_ISFIFO(st.st_mode):
                state[rel] = ("fifo",)
            else:
                state[rel] = ("other", st.st_mode)
    return state


def tree_diff(before, after, allowed=()):
    """What changed between two tree_state snapshots, outside the allowed paths (and what they hold)."""
    def free(rel):
        return not any(rel == a or rel.startswith(a + os.sep) for a in allowed)
    out = []
    for rel in sorted(set(before) | set(after)):
        if not free(rel):
            continue
        if rel not in after:
            out.append(f"{rel} removed")
        elif rel not in before:
            out.append(f"{rel} added")
        elif before[rel] != after[rel]:
            out.append(f"{rel} changed {before[rel][0]} -> {after[rel][0]}")
    return out


class Cases:
    def __init__(self, suite, jetmoe):
        self.suite, self.jetmoe = suite, jetmoe

    def wanted(self, name):
        return self.suite.wanted(PREFIX + name)

    def group(self, name):
        """Any check of the group name_* is wanted (--only may name the group or one check in it)."""
        only = self.suite.only
        return only is None or only in PREFIX + name or (PREFIX + name) in only

    def refused(self, name, args, root, expect, stdin=None):
        """args must fail with one line naming expect (each string in it), and root must be as it was."""
        if not self.wanted(name):
            return
        before = tree_state(root)
        p = subprocess.run([self.jetmoe] + args, capture_output=True, text=True, timeout=600, errors="replace",
                           input=stdin)
        err = p.stderr.strip()
        problems = tree_diff(before, tree_state(root))
        if p.returncode == 0:
            problems.append("exit 0")
        if len(err.splitlines()) != 1:
            problems.append(f"{len(err.splitlines())} lines on stderr")
        problems += [f"message lacks {e!r}" for e in expect if e not in err]
        if sanitizer_report(err):
            problems.append("sanitizer report")
        self.suite.check(PREFIX + name, not problems, f"{problems}: exit {p.returncode}: {err[-400:]!r}",
                         f"exit {p.returncode}: {err[-150:]}")

    def allowed(self, name, args, root, changes, check=None):
        """args must succeed and change nothing under root but changes; check() -> a list of problems."""
        if not self.wanted(name):
            return None
        before = tree_state(root)
        p = run_tests.run([self.jetmoe] + args)[0]
        problems = tree_diff(before, tree_state(root), changes)
        if p.returncode != 0:
            problems.append(f"exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
        elif check:
            try:
                problems += check()
            except (OSError, ValueError, KeyError) as e:  # what the command left cannot be read: a finding
                problems.append(f"{type(e).__name__}: {e}")
        if sanitizer_report(p.stderr):
            problems.append("sanitizer report")
        self.suite.check(PREFIX + name, not problems, "; ".join(problems)[:1200])
        return not problems


def temps(d):
    return [n for n in os.listdir(d) if ".tmp." in n]


def dump_ok(path, T):
    """A forward dump of T tokens, read back: [] or the problem."""
    try:
        t = run_tests.read_safetensors(path)
        return [] if "logits" in t and t["logits"].shape[0] == T else [f"{path}: no logits for {T} tokens"]
    except Exception as e:  # noqa: BLE001  (a broken file is the finding)
        return [f"{path}: {e}"]


# ---------------------------------------------------------------- 1. forward --dump

def forward_dump(c, tmp):
    root = os.path.join(tmp, "forward")
    m = os.path.join(root, "model")
    if run_tests.reference_model("tiny", m).returncode != 0:
        c.suite.check(PREFIX + "forward_setup", False, "the reference could not make its tiny model")
        return
    fwd = ["forward", m, "--tokens", "1,2,3"]
    os.symlink(os.path.join(m, "model.safetensors"), os.path.join(root, "link_to_weights"))
    os.link(os.path.join(m, "config.json"), os.path.join(root, "hardlink_to_config"))
    os.symlink(m, os.path.join(root, "link_to_model_dir"))
    os.symlink(os.path.join(root, "nowhere"), os.path.join(root, "dangling"))
    os.makedirs(os.path.join(root, "a_dir"))
    for n in ("kept.st", "replaced.st", "target.st"):
        with open(os.path.join(root, n), "w") as f:
            f.write(f"{n}: not a dump\n")
    os.symlink("target.st", os.path.join(root, "link_to_target"))
    os.mkfifo(os.path.join(root, "fifo"))
    never = "it is never replaced"
    for name, out, extra, expect in (
            ("forward_refuses_model_weights", "model/model.safetensors", [], ["model.safetensors", never]),
            ("forward_refuses_model_config", "model/config.json", [], ["config.json", never]),
            ("forward_refuses_model_weights_overwrite", "model/model.safetensors", ["--overwrite"], [never]),
            ("forward_refuses_model_config_overwrite", "model/config.json", ["--overwrite"], [never]),
            ("forward_refuses_dotdot_path_to_input", "model/../model/config.json", ["--overwrite"], [never]),
            ("forward_refuses_symlink_to_input", "link_to_weights", ["--overwrite"], ["link_to_weights", never]),
            ("forward_refuses_hard_link_to_input", "hardlink_to_config", ["--overwrite"], [never]),
            ("forward_refuses_input_via_symlinked_dir", "link_to_model_dir/config.json", ["--overwrite"], [never]),
            ("forward_refuses_model_dir", "model", ["--overwrite"], [never]),
            ("forward_refuses_existing_file", "kept.st", [], ["kept.st exists", "--overwrite"]),
            ("forward_refuses_existing_symlink_target", "link_to_target", [], ["link_to_target", "--overwrite"]),
            ("forward_refuses_directory", "a_dir", ["--overwrite"], ["a_dir is a directory"]),
            ("forward_refuses_dangling_symlink", "dangling", ["--overwrite"], ["dangling", "symlink to nothing"]),
            ("forward_refuses_fifo_without_reader", "fifo", [], ["fifo", "no reader"])):
        c.refused(name, fwd + ["--dump", os.path.join(root, out)] + extra, root, expect)

    # replaced only with --overwrite, atomically, where the file is: a symlink stays a link to it
    c.allowed("forward_overwrite_replaces_file", fwd + ["--dump", os.path.join(root, "replaced.st"), "--overwrite"],
              root, ["replaced.st"], lambda: dump_ok(os.path.join(root, "replaced.st"), 3) + temps(root))

    def link_kept():
        link = os.path.join(root, "link_to_target")
        return dump_ok(os.path.join(root, "target.st"), 3) + temps(root) + (
            [] if os.path.islink(link) and os.readlink(link) == "target.st" else ["the link is no longer a link"])
    c.allowed("forward_overwrite_follows_symlink", fwd + ["--dump", os.path.join(root, "link_to_target"),
                                                          "--overwrite"], root, ["target.st"], link_kept)
    c.allowed("forward_new_file_beside_model", fwd + ["--dump", os.path.join(m, "dump.st")], root,
              ["model/dump.st"], lambda: dump_ok(os.path.join(m, "dump.st"), 3))

    # a character device is written through: a /dev/null of the test's own first (mknod, as root), then
    # /dev/null itself - only once the first has passed, so a regression cannot replace the machine's
    if c.wanted("forward_char_device_written_through"):
        null = os.path.join(root, "null")
        try:
            os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            null = None
        if null is None:
            c.suite.check(PREFIX + "forward_char_device_written_through", True, "",
                          "skipped: mknod needs root")
        else:
            ok = c.allowed("forward_char_device_written_through", fwd + ["--dump", null], root, [])
            st = os.stat("/dev/null")
            if ok and stat.S_ISCHR(st.st_mode) and os.geteuid() == 0:
                p = run_tests.run([c.jetmoe] + fwd + ["--dump", "/dev/null"])[0]
                st2 = os.stat("/dev/null")
                c.suite.check(PREFIX + "forward_dev_null_stays_a_device", p.returncode == 0 and
                              stat.S_ISCHR(st2.st_mode) and st2.st_rdev == st.st_rdev and st2.st_ino == st.st_ino,
                              f"exit {p.returncode}: {p.stderr.strip()[-200:]}; mode {st2.st_mode:o}")

    # a FIFO with a reader: the dump goes through it, the FIFO stays a FIFO
    if c.wanted("forward_fifo_with_reader"):
        fifo = os.path.join(root, "fifo")
        before = tree_state(root)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        proc = subprocess.Popen([c.jetmoe] + fwd + ["--dump", fifo], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        data, t_end = b"", time.time() + 120
        while time.time() < t_end:
            select.select([fd], [], [], 0.1)
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                chunk = None
            if chunk:
                data += chunk
            elif proc.poll() is not None and chunk is not None:
                break
            else:
                time.sleep(0.01)  # no writer yet: select reports end of file at once
        os.close(fd)
        err = proc.communicate(timeout=60)[1].decode(errors="replace")
        got = os.path.join(tmp, "from_fifo.st")
        with open(got, "wb") as f:
            f.write(data)
        problems = tree_diff(before, tree_state(root)) + dump_ok(got, 3)
        c.suite.check(PREFIX + "forward_fifo_with_reader", proc.returncode == 0 and not problems,
                      f"exit {proc.returncode}: {err[-200:]!r}; {problems}", f"{len(data)} bytes through the FIFO")


# ---------------------------------------------------------------- 2. quantize --out

def quantize_out(c, tmp):
    root = os.path.join(tmp, "quantize")
    proj = os.path.join(root, "proj")
    m = os.path.join(proj, "model")
    if run_tests.reference_model("tiny", m).returncode != 0:
        c.suite.check(PREFIX + "quantize_setup", False, "the reference could not make its tiny model")
        return
    other = os.path.join(root, "other")
    os.makedirs(os.path.join(other, "sub"))
    for p in ("notes.txt", "sub/data.txt"):
        with open(os.path.join(other, p), "w") as f:
            f.write(p + "\n")
    with open(os.path.join(root, "a_file"), "w") as f:
        f.write("a file\n")
    os.symlink(m, os.path.join(root, "link_to_model"))
    os.symlink(os.path.join(root, "nowhere"), os.path.join(root, "dangling"))
    q = ["quantize", m, "--to", "q8", "--out"]
    never = "it is never replaced"
    for name, out, extra, expect in (
            ("quantize_refuses_foreign_dir", "other", [], ["other holds", "did not write"]),
            ("quantize_refuses_foreign_dir_overwrite", "other", ["--overwrite"], ["did not write"]),
            ("quantize_refuses_input_parent", "proj", ["--overwrite"], ["proj holds", never]),
            ("quantize_refuses_input_grandparent", ".", ["--overwrite"], [never]),
            ("quantize_refuses_input_itself", "proj/model", ["--overwrite"], [never]),
            ("quantize_refuses_symlink_to_input", "link_to_model", ["--overwrite"], [never]),
            ("quantize_refuses_regular_file", "a_file", ["--overwrite"], ["a_file exists and is not a directory"]),
            ("quantize_refuses_dangling_symlink", "dangling", ["--overwrite"], ["symlink to nothing"])):
        c.refused(name, q + [os.path.join(root, out) if out != "." else root] + extra, root, expect)

    # its own output: refused without --overwrite, replaced whole with it (no temp directory left)
    out = os.path.join(root, "q")
    if c.wanted("quantize_overwrite") and run_tests.run([c.jetmoe] + q + [out])[0].returncode != 0:
        c.suite.check(PREFIX + "quantize_overwrite", False, "the first quantize failed")
        return
    c.refused("quantize_refuses_checkpoint_without_overwrite", q + [out], root, ["holds a checkpoint",
                                                                                  "--overwrite"])

    def is_q4():
        info = run_tests.run([c.jetmoe, "info", out])[0]
        return ([] if "weights           q4" in info.stdout else [f"info: {info.stdout[:200]!r}"]) + temps(root)
    c.allowed("quantize_overwrite", ["quantize", m, "--to", "q4", "--out", out, "--overwrite"], root, ["q"], is_q4)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine\n")
    c.refused("quantize_refuses_checkpoint_with_foreign_file", q + [out, "--overwrite"], root,
              ["notes.txt", "did not write"])
    # an empty directory is filled where it is (the same directory: a shell working in it sees the model)
    empty = os.path.join(root, "empty")
    os.makedirs(empty)
    ino = os.stat(empty).st_ino

    def filled():
        names = sorted(os.listdir(empty))
        return temps(root) + ([] if os.stat(empty).st_ino == ino else ["empty/ was replaced"]) + (
            [] if names == ["config.json", "generation_config.json", "model.safetensors"] else [f"empty/ holds {names}"])
    c.allowed("quantize_into_empty_dir", q + [empty], root, ["empty"], filled)


# ---------------------------------------------------------------- 3. init OUT

def init_out(c, tmp):
    root = os.path.join(tmp, "init")
    sharded, trained = os.path.join(root, "sharded"), os.path.join(root, "trained")
    if run_tests.reference_model("topk_eq_E_bf16_sharded", sharded).returncode != 0 or \
            run_tests.reference_model("tiny", trained).returncode != 0:
        c.suite.check(PREFIX + "init_setup", False, "the reference could not make its models")
        return
    cfg = os.path.join(root, "config.json")
    shutil.copy(os.path.join(sharded, "config.json"), cfg)
    c.refused("init_refuses_sharded_checkpoint", ["init", sharded, "--config", cfg], root,
              ["sharded holds a checkpoint", "--overwrite"])
    c.refused("init_refuses_trained_model", ["init", trained, "--config", cfg, "--seed", "5"], root,
              ["trained holds a checkpoint", "--overwrite"])
    c.refused("init_refuses_dir_holding_its_config", ["init", trained, "--config",
                                                      os.path.join(trained, "config.json"), "--overwrite"],
              root, ["config.json", "it is never replaced"])
    with open(os.path.join(root, "a_file"), "w") as f:
        f.write("a file\n")
    c.refused("init_refuses_regular_file", ["init", os.path.join(root, "a_file"), "--config", cfg, "--overwrite"],
              root, ["a_file exists and is not a directory"])

    def exactly_new():
        names = sorted(os.listdir(sharded))
        info = run_tests.run([c.jetmoe, "info", sharded])[0]
        return ([] if names == ["config.json", "generation_config.json", "model.safetensors"] else [f"left: {names}"]) + temps(root) + (
            [] if info.returncode == 0 and "weights           f32" in info.stdout else [f"info: {info.stderr!r}"])
    c.allowed("init_overwrite_sharded_leaves_no_old_shard", ["init", sharded, "--config", cfg, "--overwrite"],
              root, ["sharded"], exactly_new)
    with open(os.path.join(trained, ".notes"), "w") as f:
        f.write("a hidden file of someone else's\n")
    c.refused("init_refuses_checkpoint_with_foreign_file", ["init", trained, "--config", cfg, "--overwrite"], root,
              [".notes", "did not write"])


# ---------------------------------------------------------------- 4. pretrain, tokenizer train, prepare

def run_dirs(c, build, tmp):
    if not any(c.group(n) for n in ("pretrain", "tokenizer", "prepare", "resume_latest")):
        return
    fixture = run_tests.pretrain_fixture(c.suite, build, tmp, "outputs")
    if fixture is None:
        return
    _, d, recipe = fixture
    r1, r2 = os.path.join(d, "recipe.json"), os.path.join(d, "other.json")
    with open(r1, "w") as f:
        json.dump(recipe, f)
    with open(r2, "w") as f:
        json.dump(dict(recipe, seed=99), f)
    run_dir = os.path.join(d, "run")
    p = run_tests.run([c.jetmoe, "pretrain", "--recipe", r1, "--out", run_dir, "--stop-after", "5", "--quiet"])[0]
    if p.returncode != 0:
        c.suite.check(PREFIX + "pretrain_setup", False, p.stderr.strip()[-300:])
        return
    with open(os.path.join(run_dir, "notes.txt"), "w") as f:
        f.write("the user's notes beside the run\n")
    resume_latest(c, d, run_dir, r1)
    pretrain_cases(c, d, run_dir, r1, r2, recipe)
    tokenizer_cases(c, d)
    prepare_cases(c, d)


def pretrain_cases(c, d, run_dir, r1, r2, recipe):
    pre = ["pretrain", "--out", run_dir, "--quiet", "--recipe"]
    c.refused("pretrain_refuses_existing_run_other_recipe", pre + [r2], d,
              ["run already holds a training run", "--overwrite"])
    c.refused("pretrain_refuses_existing_run_same_recipe", pre + [r1], d, ["already holds a training run"])
    c.refused("pretrain_refuses_resume_with_overwrite", pre + [r1, "--resume", "--overwrite"], d,
              ["--resume", "--overwrite", "pass one"])
    with open(os.path.join(d, "a_file"), "w") as f:
        f.write("a file\n")
    c.refused("pretrain_refuses_regular_file_as_run", ["pretrain", "--recipe", r1, "--out",
                                                       os.path.join(d, "a_file")], d, ["not a directory"])
    # the tokenizer the recipe names lives in the checkpoints --overwrite would remove
    tok_in_run = os.path.join(d, "tok_in_run.json")
    with open(tok_in_run, "w") as f:
        json.dump(dict(recipe, tokenizer=os.path.join(run_dir, "checkpoints", "step_5")), f)
    c.refused("pretrain_refuses_overwrite_removing_its_tokenizer", pre + [tok_in_run, "--overwrite"], d,
              ["checkpoints holds", "it is never replaced"])
    mine = os.path.join(run_dir, "checkpoints", "mine.txt")
    with open(mine, "w") as f:
        f.write("not a checkpoint\n")
    c.refused("pretrain_refuses_overwrite_foreign_in_checkpoints", pre + [r2, "--overwrite"], d,
              ["checkpoints was not written by jetmoe"])
    if os.path.exists(mine):  # (a regression may have removed it: the check above says so)
        os.remove(mine)

    def fresh():
        ck = os.path.join(run_dir, "checkpoints")
        problems = [] if sorted(os.listdir(ck)) == ["latest", "step_2"] else [f"checkpoints: {os.listdir(ck)}"]
        with open(os.path.join(ck, "latest")) as f:
            problems += [] if f.read().strip() == "step_2" else ["latest is not step_2"]
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
        problems += [] if steps == [1, 2] else [f"metrics steps {steps}"]
        with open(os.path.join(run_dir, "recipe.json")) as f, open(r2) as g:
            problems += [] if f.read() == g.read() else ["recipe.json is not the new recipe"]
        return problems
    c.allowed("pretrain_overwrite_starts_clean", pre + [r2, "--overwrite", "--stop-after", "2"], d,
              ["run/checkpoints", "run/metrics.jsonl", "run/recipe.json", "run/loss.svg"], fresh)
    # a run directory holding only the recipe it is started from: a fresh run, the recipe left as it is
    own = os.path.join(d, "own")
    os.makedirs(own)
    shutil.copy(r1, os.path.join(own, "recipe.json"))
    c.allowed("pretrain_recipe_inside_fresh_run_dir", ["pretrain", "--recipe", os.path.join(own, "recipe.json"),
                                                       "--out", own, "--stop-after", "1", "--quiet"], d,
              ["own/checkpoints", "own/metrics.jsonl", "own/loss.svg"])


# ---------------------------------------------------------------- 5. checkpoints/latest on --resume

def resume_latest(c, d, run_dir, r1):
    # a checkpoint outside the run, where a latest with ../ would lead
    base = os.path.join(d, "base")
    ck = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ck, "latest")) as f:
        newest = f.read().strip()
    shutil.copytree(os.path.join(ck, newest), base)
    latest = os.path.join(ck, "latest")
    for name, content in (("dotdot", "../../base"), ("dotdot3", "../../../base"), ("absolute", base),
                          ("step_dotdot", newest + "/../../../base"), ("inside_but_not_step_n", "../checkpoints/" +
                                                                          newest)):
        with open(latest, "w") as f:
            f.write(content + "\n")
        c.refused("resume_latest_" + name, ["pretrain", "--recipe", r1, "--out", run_dir, "--resume", "--quiet"], d,
                  ["latest", "step_N"])
    with open(latest, "w") as f:
        f.write(newest + "\n")
    # the same run resumes when latest says step_N (the refusals above are about the path, nothing else)
    steps = int(newest.split("_")[1])
    c.allowed("resume_latest_step_n_followed", ["pretrain", "--recipe", r1, "--out", run_dir, "--resume",
                                                "--stop-after", str(steps + 1), "--quiet"], d,
              ["run/checkpoints", "run/metrics.jsonl", "run/loss.svg"])


def tokenizer_cases(c, d):
    tok = os.path.join(d, "tok")
    text = os.path.join(d, "text", "prose", "licenses.txt")
    tt = ["tokenizer", "train", "--vocab-size", "400", "--out", tok, "--input"]
    c.refused("tokenizer_refuses_existing_tokenizer", tt + [text], d, ["tok already holds a tokenizer",
                                                                     "--overwrite"])
    c.refused("tokenizer_refuses_its_own_input", tt + [text + "," + os.path.join(tok, "tokenizer_config.json"),
                                                       "--overwrite"], d, ["tokenizer_config.json",
                                                                           "it is never replaced"])
    with open(os.path.join(tok, "README"), "w") as f:
        f.write("the user's file beside the tokenizer\n")
    c.allowed("tokenizer_overwrite_replaces_its_files", tt + [text, "--overwrite"], d,
              ["tok/tokenizer.model", "tok/tokenizer.json", "tok/tokenizer_config.json",
               "tok/special_tokens_map.json"],
              lambda: [n for n in os.listdir(tok) if n.startswith(".") or ".tmp." in n])


def prepare_cases(c, d):
    tok = os.path.join(d, "tok")
    prose = os.path.join(d, "text", "prose")
    shards = os.path.join(d, "many_shards")
    pp = ["prepare", "--tokenizer", tok, "--input", prose, "--out", shards]
    if run_tests.run([c.jetmoe] + pp + ["--shard-tokens", "20000"])[0].returncode != 0:
        c.suite.check(PREFIX + "prepare_setup", False, "prepare failed")
        return
    n_old = len([n for n in os.listdir(shards) if n.startswith("shard_")])
    with open(os.path.join(shards, "notes.txt"), "w") as f:
        f.write("the user's notes\n")
    c.refused("prepare_refuses_existing_shards", pp, d, ["many_shards already holds token shards", "--overwrite"])
    c.refused("prepare_refuses_its_own_input", ["prepare", "--tokenizer", tok, "--input", shards, "--out", shards,
                                                "--overwrite"], d, ["it is never replaced"])
    foreign = os.path.join(shards, f"shard_{n_old + 3:05d}.bin")
    with open(foreign, "wb") as f:
        f.write(b"not a token shard\n")
    c.refused("prepare_refuses_foreign_shard", pp + ["--overwrite"], d, ["was not written by jetmoe"])
    if os.path.exists(foreign):
        os.remove(foreign)
    manifest = os.path.join(shards, "manifest.json")
    os.replace(manifest, manifest + ".ours")
    with open(manifest, "w") as f:
        json.dump({"format": "someone else's"}, f)
    c.refused("prepare_refuses_foreign_manifest", pp + ["--overwrite"], d, ["manifest.json was not written"])
    os.replace(manifest + ".ours", manifest)

    def stale_gone():
        left = sorted(n for n in os.listdir(shards) if n.startswith("shard_"))
        return ([] if left == ["shard_00000.bin"] else [f"shards left: {left}"]) + (
            [] if os.path.exists(os.path.join(shards, "notes.txt")) else ["notes.txt removed"])
    ours = ["many_shards/manifest.json"] + [f"many_shards/shard_{i:05d}.bin" for i in range(n_old)]
    c.allowed("prepare_overwrite_removes_only_its_stale_shards", pp + ["--overwrite"], d, ours, stale_gone)


def run(suite, build, tmp):
    jetmoe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), build, "jetmoe")
    c = Cases(suite, jetmoe)
    root = os.path.join(tmp, "output_safety")
    os.makedirs(root, exist_ok=True)
    if c.group("forward"):
        forward_dump(c, root)
    if c.group("quantize"):
        quantize_out(c, root)
    if c.group("init"):
        init_out(c, root)
    run_dirs(c, build, root)
