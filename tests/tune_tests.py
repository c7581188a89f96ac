"""Fine-tuning runs end to end through the CLI: jetmoe sft, jetmoe dpo and pretrain --init (issue 12).
align_ref_tests.py proves the objectives' gradients; this module proves the runs: what they write, that
they resume bit-exactly, what they refuse, and that they learn.

  tune_sft_run_metrics             pre-tokenized records: every step's metrics.jsonl line has loss,
                                   aux_loss, z_loss, lr, grad_norm, epoch, tokens_per_s (finite), epoch
                                   = examples visited / examples; held-out records (--eval-data) at step
                                   0, every eval_every steps and at the end
  tune_sft_steps_and_schedule      steps = ceil(packed rows x epochs / (batch_size x grad_accum)) with
                                   records of one length (so the rows do not depend on the shuffle), a
                                   partial last step; lr at every step = jm_schedule_lr's cosine with
                                   warmup int(warmup_ratio x steps), computed here
  tune_sft_checkpoint_files        checkpoints/step_N: config.json, generation_config.json, model.safetensors,
                                   trainer_state.safetensors, the tokenizer files; latest; loss.svg
                                   parses with its three panels; recipe.json is the recipe
  tune_hf_names                    sft's and dpo's checkpoints: JetMoeForCausalLM, transformers' config.json
                                   fields, generation_config.json, special_tokens_map.json (hf_names_tests);
                                   also from a model whose config.json says JetMoEForCausalLM
  tune_sft_messages_run            {"messages": [...]} records on a checkpoint with a tokenizer: learned
                                   tokens only the assistant's (fewer than all), metrics, checkpoints
  tune_sft_no_tokenizer            a checkpoint without tokenizer files: pre-tokenized records train;
                                   {"messages"} records are refused (file:line, "tokenizer")
  tune_sft_loss_decreases          4 records over 20 epochs: the loss of the last epoch is far below the
                                   first's
  tune_sft_resume_bit_exact        --stop-after 3 (an eval_every step) then --resume == straight: every
                                   file of the final checkpoint (the tokenizer's too), metrics lines but
                                   tokens_per_s (held-out and final records too); the recipe sets the
                                   router-loss weights, which the resumed model must keep; resuming the
                                   finished run again changes nothing
  tune_sft_sigint_resume           SIGINT mid-run: exit 130, "stopped at step N", a checkpoint at N;
                                   --resume ends with the straight run's final checkpoint and metrics
  tune_sft_sigint_before_first_step  SIGINT during the step-0 held-out evaluation: exit 130, a step_0
                                   checkpoint, and --resume ends with the straight run's weights
  tune_batch_spans_epochs          a micro-batch holding more examples than the data (sft: 5 records of
                                   one row an epoch, batch_size 3; dpo: 3 pairs, batch_size 8): it runs,
                                   with the steps and epochs that follow (ASan: nothing written past)
  tune_dpo_resume_bit_exact        the same for dpo, with --ref a copy of the model that is deleted
                                   after the first part: the resume reuses ref_logps.safetensors (no
                                   "reference log-probs" line) and ends identical to the straight run
  tune_dpo_run_metrics             rewards/chosen, rewards/rejected, rewards/margins (= their difference),
                                   rewards/accuracies, logps/chosen, logps/rejected; step 1 (policy ==
                                   reference): loss ln 2, rewards 0
  tune_dpo_ref_logps_cache         ref_logps.safetensors: 2 x (train + held-out) F64 log-probs; the
                                   step-0 held-out logps are their held-out means
  tune_dpo_heldout_learns          --eval-data: held-out records at step 0 (loss ln 2, accuracy 0 on
                                   ties) and at the end; chosen always token A, rejected always B: the
                                   held-out rewards/accuracies reach 1.0 and the margin grows
  tune_dpo_text_records            {"prompt", "chosen", "rejected"} strings and message lists train
  tune_model_is_run_dir            --model RUN (sft) and --ref RUN (dpo): the run's newest checkpoint,
                                   named on stderr ("jetmoe sft: using RUN/checkpoints/step_N")
  tune_refuse_resume_other_data    --resume with other records (sft: other or fewer; dpo), another recipe,
                                   dpo's --beta or --label-smoothing changed: exit 1, the run untouched
  tune_refuse_resume_overwrite     --resume with --overwrite: one line naming both, for sft and dpo
  tune_refuse_existing_run         a run directory holding a run, without --resume/--overwrite: refused,
                                   untouched (sft and dpo)
  tune_refuse_too_many_files       65 files in --data or --eval-data: exit 2 naming the flag (all 64 of
                                   the most it takes are read)
  tune_refuse_dump_grad_exists     --dump-grad to an existing file without --overwrite: refused before
                                   any work (no reference log-probs line), the file unchanged
  tune_inputs_never_replaced       --dump-grad onto the data, the recipe, the model's weights; --out over
                                   a run whose checkpoint is --model or --ref; --data inside the run
                                   directory with --overwrite: all refused, nothing changed; a recipe.json
                                   in the run directory that the run reads is kept as it is
  tune_bad_line_fail_<case>        sft and dpo: each bad record stops the run with FILE:LINE and the
                                   reason, exit 1, no run directory made
  tune_bad_line_skip               --on-bad-line skip: every bad line reported with FILE:LINE, the count
                                   on stderr (also with --quiet), training proceeds on the good ones
  tune_too_long_counted            records longer than max_len: truncated or dropped (truncation), and
                                   counted on stderr either way (--quiet too)
  tune_recipe_unknown_keys         unknown keys (at the top and in optimizer/schedule), DPO's keys in an
                                   SFT recipe, pretraining's keys: exit 1, the recipe and field named
  tune_pretrain_init_continues     pretrain --init RUN (its newest checkpoint): steps count from 1 with
                                   the recipe's warmup, a fresh AdamW (adamw.step == the new run's
                                   steps), the first loss ~ the checkpoint's eval loss on that data and
                                   far below a fresh model's
  tune_pretrain_init_refusals      a recipe model of another shape (the field named), --init with --resume,
                                   --overwrite over the run the --init checkpoint is in

Called from tests/run_tests.py as run(suite, build, tmpdir); uses its pretrain fixture (tokenizer, shards).
"""
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import time
import xml.etree.ElementTree as ET

import run_tests  # its fixtures, used at call time (run_tests imports this module too)
from output_safety_tests import tree_diff, tree_state
import hf_names_tests
from testlib import sanitizer_report

PREFIX = "tune_"
CHECKS = ("tune_sft_run_metrics", "tune_sft_steps_and_schedule", "tune_sft_checkpoint_files", "tune_hf_names",
          "tune_sft_messages_run", "tune_sft_no_tokenizer", "tune_sft_loss_decreases", "tune_sft_resume_bit_exact",
          "tune_sft_sigint_resume", "tune_sft_sigint_before_first_step", "tune_batch_spans_epochs",
          "tune_dpo_resume_bit_exact", "tune_dpo_run_metrics", "tune_dpo_ref_logps_cache", "tune_dpo_heldout_learns",
          "tune_dpo_text_records", "tune_model_is_run_dir", "tune_refuse_resume_other_data",
          "tune_refuse_resume_overwrite", "tune_refuse_existing_run", "tune_refuse_too_many_files",
          "tune_refuse_dump_grad_exists", "tune_inputs_never_replaced", "tune_bad_line_fail_", "tune_bad_line_skip",
          "tune_too_long_counted", "tune_recipe_unknown_keys", "tune_pretrain_init_continues",
          "tune_pretrain_init_refusals")

V = 400  # the fixture tokenizer's vocabulary (pretrain_fixture)
MODEL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
             intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
SFT_FIELDS = ("loss", "aux_loss", "z_loss", "lr", "grad_norm", "epoch", "tokens_per_s")
DPO_FIELDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected")
TOKEN_A, TOKEN_B = 77, 88  # the toy preference: chosen always A, rejected always B

# SFT on records of one length: 13 records of 20 tokens, 3 to a row of max_len 64 -> 5 rows an epoch
SFT_N, SFT_LEN, SFT_PER_ROW = 13, 20, 3
SFT_RECIPE = {"epochs": 5, "max_len": 64, "batch_size": 2, "grad_accum": 2, "optimizer": {"lr": 2e-3},
              "schedule": {"warmup_ratio": 0.3}, "checkpoint_every": 2, "eval_every": 3, "aux_loss_coef": 0.03,
              "z_loss_coef": 0.004, "seed": 5}
LEARN_RECIPE = {"epochs": 20, "max_len": 64, "batch_size": 1, "grad_accum": 1, "optimizer": {"lr": 5e-3},
                "schedule": {"warmup_ratio": 0.1}, "checkpoint_every": 1000, "seed": 3}
DPO_RECIPE = {"epochs": 2, "max_len": 32, "batch_size": 2, "grad_accum": 2, "optimizer": {"lr": 1e-2},
              "beta": 0.1, "checkpoint_every": 3, "seed": 9}


# ---------------------------------------------------------------- helpers

class Rng:
    """A small LCG, so the records are the same on every Python."""
    def __init__(self, seed):
        self.s = seed

    def below(self, n):
        self.s = (self.s * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return (self.s >> 33) % n


def write_jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_st(path):
    """name -> list of numbers, for the dtypes a trainer state or the reference cache holds."""
    buf = read_bytes(path)
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    fmt = {"F64": "d", "F32": "f", "I64": "q", "U64": "Q", "I32": "i"}
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] not in fmt:
            continue
        b, e = t["data_offsets"]
        size = struct.calcsize(fmt[t["dtype"]])
        out[name] = list(struct.unpack(f"<{(e - b) // size}{fmt[t['dtype']]}", buf[8 + n + b:8 + n + e]))
    return out


def metrics(out):
    """(step records, held-out records) of a run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f]
    return [r for r in lines if "loss" in r], [r for r in lines if "heldout_loss" in r]


def comparable(out):
    """metrics.jsonl lines without tokens_per_s (a rate: the one field a resume may change)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in f]


def latest(out):
    ck = os.path.join(out, "checkpoints")
    return os.path.join(ck, open(os.path.join(ck, "latest")).read().strip())


def final_weights(out):
    return read_bytes(os.path.join(latest(out), "model.safetensors"))


def one_line(p):
    err = p.stderr.strip()
    return err.splitlines()[-1] if err else ""


def same_run(straight, out):
    """What a resumed run must share with the straight one: every file of the final checkpoint, byte for
    byte, and every metrics.jsonl line but tokens_per_s."""
    problems = []
    for name in sorted(set(os.listdir(latest(straight))) | set(os.listdir(latest(out)))):
        a, b = (os.path.join(latest(x), name) for x in (straight, out))
        if not (os.path.exists(a) and os.path.exists(b) and read_bytes(a) == read_bytes(b)):
            problems.append(f"{os.path.basename(latest(out))}/{name}: {'differs' if os.path.exists(b) else 'missing'}"
                            " in the resumed run")
    a, b = comparable(straight), comparable(out)
    if a != b:
        diff = [(x, y) for x, y in zip(a, b) if x != y][:1]
        problems.append(f"metrics differ ({len(a)} vs {len(b)} lines): {str(diff)[:400]}")
    return problems


def schedule_lr(step, peak, warmup, total, min_ratio=0.0):
    """jm_schedule_lr's cosine (src/train/optim.c), written again: the lr of update step + 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = total - warmup
    t = min((step - warmup) / span, 1.0) if span > 0 else 1.0
    floor = peak * min_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


class Tune:
    """The fixture and the runs several checks share, each made once, when first needed."""

    def __init__(self, suite, build, tmp):
        self.suite, self.build = suite, build
        self.jetmoe = os.path.join(run_tests.ROOT, build, "jetmoe")
        self.d = os.path.join(tmp, "tune")
        self.san = []
        self.memo = {}
        self.fixture = None
        self.times = []  # (seconds, check): each check's own, with the shared runs it was first to need

    # ---- running things

    def jet(self, *args, timeout=300):
        p, _ = run_tests.run([self.jetmoe] + [str(a) for a in args], timeout=timeout)
        if sanitizer_report(p.stderr):
            self.san.append(f"{args[0]}: {p.stderr.strip()[-600:]}")
        return p

    def must(self, *args):
        p = self.jet(*args)
        if p.returncode != 0:
            raise RuntimeError(f"jetmoe {' '.join(str(a) for a in args[:1])} ... exit {p.returncode}: "
                               f"{p.stderr.strip()[-400:]}")
        return p

    def check(self, name, fn):
        if not self.suite.wanted(name):
            return
        self.san = []
        t0, c0 = time.time(), os.times()
        try:
            problems, detail = fn()
        except (RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError, ET.ParseError,
                subprocess.TimeoutExpired) as e:
            problems, detail = [f"{type(e).__name__}: {e}"], ""
        problems = list(problems) + [f"sanitizer: {s}" for s in self.san]
        c1 = os.times()
        self.times.append((time.time() - t0, c1.children_user + c1.children_system - c0.children_user -
                           c0.children_system, name))
        self.suite.check(name, not problems, "; ".join(problems)[:1500], detail)

    def once(self, key, fn):
        if key not in self.memo:
            try:
                self.memo[key] = (fn(), None)
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                self.memo[key] = (None, f"{key}: {type(e).__name__}: {e}")
        value, why = self.memo[key]
        if why:
            raise RuntimeError(why)
        return value

    def path(self, *names):
        return os.path.join(self.d, *names)

    # ---- the fixture: a tokenizer (pretrain_fixture's, 400 pieces) and a tiny model carrying it

    def setup(self):
        def make():
            fx = run_tests.pretrain_fixture(self.suite, self.build, os.path.dirname(self.d), "tune")
            if fx is None:
                raise RuntimeError("the pretrain fixture failed (see tune_setup)")
            self.fixture = fx
            cfg = write_json(self.path("model_config.json"), MODEL)
            self.must("init", self.path("model"), "--config", cfg, "--seed", "1")
            for name in os.listdir(self.path("tok")):
                shutil.copy(self.path("tok", name), self.path("model"))
            return self.path("model")
        return self.once("setup", make)

    def recipe(self, name, r):
        return write_json(self.path(name + ".json"), r)

    # ---- data

    def sft_records(self, n, length, seed, prompt=5):
        rng = Rng(seed)
        recs = []
        for i in range(n):
            ids = [1] + [3 + rng.below(V - 3) for _ in range(length - 1)]
            if i == 0:
                recs.append({"input_ids": ids})  # no labels: every token
            else:
                p = prompt + i % 3
                recs.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
        return recs

    def pref_records(self, n, seed):
        rng = Rng(seed)
        return [{"prompt_input_ids": [1] + [3 + rng.below(V - 3) for _ in range(3 + rng.below(6))],
                 "chosen_input_ids": [TOKEN_A, 2], "rejected_input_ids": [TOKEN_B, 2]} for _ in range(n)]

    def data(self, kind):
        """(records, held-out records, recipe) of the shared sft or dpo run."""
        def make():
            self.setup()
            if kind == "sft":
                train, held = self.sft_records(SFT_N, SFT_LEN, 11), self.sft_records(4, SFT_LEN, 12)
            else:
                train, held = self.pref_records(16, 31), self.pref_records(6, 32)
            return (write_jsonl(self.path(f"{kind}.jsonl"), train),
                    write_jsonl(self.path(f"{kind}_eval.jsonl"), held),
                    self.recipe(f"{kind}_recipe", SFT_RECIPE if kind == "sft" else DPO_RECIPE))
        return self.once(kind + "_data", make)

    def args(self, kind, out, *extra):
        data, ev, rec = self.data(kind)
        return [kind, "--model", self.path("model"), "--data", data, "--eval-data", ev, "--out", out,
                "--recipe", rec] + list(extra)

    def straight(self, kind):
        """The shared run straight through: (its directory, its stderr)."""
        def make():
            out = self.path(kind + "_straight")
            return out, self.must(*self.args(kind, out)).stderr
        return self.once(kind + "_straight", make)

    def learn_run(self):
        """4 records of 30 tokens, 2 to a row, 20 epochs: 40 steps of one row."""
        def make():
            self.setup()
            data = write_jsonl(self.path("learn.jsonl"), self.sft_records(4, 30, 21, prompt=3))
            rec = self.recipe("learn_recipe", LEARN_RECIPE)
            out = self.path("learn_straight")
            self.must("sft", "--model", self.path("model"), "--data", data, "--out", out, "--recipe", rec,
                      "--quiet")
            return out, data, rec
        return self.once("learn", make)


# ---------------------------------------------------------------- SFT runs

def sft_run_metrics(t):
    out, _ = t.straight("sft")
    steps, held = metrics(out)
    problems = []
    for s in steps:
        missing = [k for k in SFT_FIELDS if not isinstance(s.get(k), (int, float)) or not math.isfinite(s[k])]
        if missing:
            problems.append(f"step {s.get('step')}: {missing} missing or not finite")
        elif not (s["loss"] > 0 and s["aux_loss"] > 0 and s["z_loss"] > 0 and s["grad_norm"] > 0 and
                  s["tokens_per_s"] > 0):
            problems.append(f"step {s['step']}: non-positive values {s}")
    # epoch: examples visited / examples; rows of 3, 3, 3, 3, 1 examples each epoch, 4 rows a step
    rows_epoch = -(-SFT_N // SFT_PER_ROW)
    rows_step = SFT_RECIPE["batch_size"] * SFT_RECIPE["grad_accum"]
    rows = rows_epoch * SFT_RECIPE["epochs"]
    for s in steps:
        r = min(s["step"] * rows_step, rows)
        want = ((r // rows_epoch) * SFT_N + min(SFT_PER_ROW * (r % rows_epoch), SFT_N)) / SFT_N
        if abs(s.get("epoch", -1) - want) > 1e-5:
            problems.append(f"step {s['step']}: epoch {s.get('epoch')}, want {want:.6g}")
    total = len(steps)
    want = [0] + list(range(SFT_RECIPE["eval_every"], total, SFT_RECIPE["eval_every"])) + [total]
    if [h["step"] for h in held] != want:
        problems.append(f"held-out records at steps {[h['step'] for h in held]}, want {want}")
    for h in held:
        if not (math.isfinite(h["heldout_loss"]) and abs(h["heldout_perplexity"] / math.exp(h["heldout_loss"]) - 1)
                < 1e-4 and h.get("heldout_tokens", 0) > 0):
            problems.append(f"held-out record {h}")
    if held and not held[-1]["heldout_loss"] < held[0]["heldout_loss"] + 0.5:
        problems.append(f"held-out loss {held[0]['heldout_loss']} -> {held[-1]['heldout_loss']}")
    return problems, (f"{total} steps, loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}, epoch "
                      f"{steps[-1]['epoch']}; held-out at {[h['step'] for h in held]}" if steps else "")


def sft_steps_and_schedule(t):
    out, err = t.straight("sft")
    steps, _ = metrics(out)
    rows = -(-SFT_N // SFT_PER_ROW) * SFT_RECIPE["epochs"]
    per_step = SFT_RECIPE["batch_size"] * SFT_RECIPE["grad_accum"]
    total = -(-rows // per_step)
    problems = []
    if rows % per_step == 0:
        problems.append("test too weak: no partial last step")
    if [s["step"] for s in steps] != list(range(1, total + 1)):
        problems.append(f"steps {[s['step'] for s in steps]}, want 1..{total} (ceil({rows} rows / {per_step}))")
    if f"{total} steps" not in err:
        problems.append(f"stderr does not say {total} steps: {err[-300:]!r}")
    peak = SFT_RECIPE["optimizer"]["lr"]
    warmup = int(SFT_RECIPE["schedule"]["warmup_ratio"] * total)
    if warmup < 2 or warmup >= total - 2:
        problems.append(f"test too weak: warmup {warmup} of {total}")
    for s in steps:
        want = schedule_lr(s["step"] - 1, peak, warmup, total)
        if not abs(s["lr"] - want) <= 1e-5 * want:
            problems.append(f"step {s['step']}: lr {s['lr']}, want {want:.6g}")
    if steps and not steps[warmup - 1]["lr"] == peak:
        problems.append(f"the peak is not reached at the end of warmup: {steps[warmup - 1]['lr']}")
    return problems, f"{rows} rows / {per_step} per step = {total} steps, warmup {warmup}, lr checked at each"


def sft_checkpoint_files(t):
    out, _ = t.straight("sft")
    problems = []
    ck = latest(out)
    total = len(metrics(out)[0])
    if os.path.basename(ck) != f"step_{total}":
        problems.append(f"latest is {os.path.basename(ck)}, want step_{total}")
    want = {"config.json", "generation_config.json", "model.safetensors", "trainer_state.safetensors",
            "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    have = set(os.listdir(ck))
    if have != want:
        problems.append(f"{os.path.basename(ck)} holds {sorted(have)}, want {sorted(want)}")
    cfg = json.load(open(os.path.join(ck, "config.json")))
    for k, v in MODEL.items():
        if cfg.get(k) != v:
            problems.append(f"config.json {k} = {cfg.get(k)}, want {v}")
    state = read_st(os.path.join(ck, "trainer_state.safetensors"))
    if state.get("step") != [total] or state.get("adamw.step") != [total]:
        problems.append(f"trainer state step {state.get('step')}, adamw.step {state.get('adamw.step')}")
    tc = json.load(open(os.path.join(ck, "tokenizer_config.json")))
    if tc.get("model_max_length") != MODEL["max_position_embeddings"]:
        problems.append(f"tokenizer_config model_max_length {tc.get('model_max_length')}")
    for name in ("tokenizer.model", "tokenizer.json"):
        if read_bytes(os.path.join(ck, name)) != read_bytes(t.path("model", name)):
            problems.append(f"{name} is not the model's")
    kept = sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n != "latest")
    every = SFT_RECIPE["checkpoint_every"]
    want_kept = sorted({f"step_{total}", f"step_{(total - 1) // every * every}"})
    if kept != want_kept:
        problems.append(f"checkpoints {kept}, want {want_kept}")
    svg = ET.parse(os.path.join(out, "loss.svg")).getroot()
    panels = sorted(r.get("data-panel") for r in svg.iter("{http://www.w3.org/2000/svg}rect")
                    if r.get("class") == "panel")
    if panels != ["expert-load", "loss", "lr"]:
        problems.append(f"loss.svg panels {panels}")
    if json.load(open(os.path.join(out, "recipe.json"))) != SFT_RECIPE:
        problems.append("recipe.json is not the recipe")
    # the run loads as a model: forward on the final checkpoint, through the run directory
    p = t.jet("forward", out, "--tokens", "1,5,9")
    if p.returncode != 0:
        problems.append(f"forward on the run: {one_line(p)}")
    return problems, f"{sorted(have)}; kept {kept}"


def hf_names(t):
    """sft's and dpo's checkpoints carry transformers' names (hf_names_tests), also when the model they
    start from is the authors' JetMoEForCausalLM."""
    problems = []
    for kind in ("sft", "dpo"):
        ck = latest(t.straight(kind)[0])
        cfg = json.load(open(os.path.join(ck, "config.json")))
        problems += hf_names_tests.model_files(ck, cfg) + hf_names_tests.tokenizer_files(ck)
    old = t.path("model_old_name")
    shutil.rmtree(old, ignore_errors=True)
    shutil.copytree(t.path("model"), old)
    cfg = json.load(open(os.path.join(old, "config.json")))
    cfg["architectures"] = ["JetMoEForCausalLM"]
    write_json(os.path.join(old, "config.json"), cfg)
    out = t.path("sft_from_old_name")
    shutil.rmtree(out, ignore_errors=True)
    args = t.args("sft", out, "--stop-after", "1", "--quiet")
    args[args.index("--model") + 1] = old
    t.must(*args)
    problems += hf_names_tests.model_files(latest(out), cfg)
    return problems, "sft, dpo, sft from JetMoEForCausalLM: JetMoeForCausalLM, generation_config.json, " \
        "special_tokens_map.json"


def sft_messages_run(t):
    t.setup()
    rng = Rng(41)
    recs = []
    for i in range(6):
        a, b = rng.below(50), rng.below(50)
        msgs = [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        if i % 2:
            msgs = [{"role": "system", "content": "You add numbers."}] + msgs + \
                   [{"role": "user", "content": "And twice that?"},
                    {"role": "assistant", "content": f"Twice that is {2 * (a + b)}."}]
        recs.append({"messages": msgs, "id": f"rec{i}"})  # other fields are ignored
    data = write_jsonl(t.path("sft_messages.jsonl"), recs)
    rec = t.recipe("messages_recipe", {"epochs": 2, "max_len": 128, "batch_size": 2, "optimizer": {"lr": 1e-3}})
    out = t.path("sft_messages")
    p = t.must("sft", "--model", t.path("model"), "--data", data, "--out", out, "--recipe", rec)
    problems = []
    line = [l for l in p.stderr.splitlines() if l.startswith("sft data:")]
    try:
        w = line[0].split()
        n_ex, n_tok, n_learned = int(w[2]), int(w[7]), int(w[9].strip("("))
        if n_ex != 6 or not 0 < n_learned < n_tok / 2:
            problems.append(f"{n_ex} examples, {n_learned} of {n_tok} tokens learned: {line[0]!r}")
    except (IndexError, ValueError):
        problems.append(f"no parsable summary line: {p.stderr[-400:]!r}")
        n_learned, n_tok = 0, 0
    steps, _ = metrics(out)
    if not steps or any(not all(isinstance(s.get(k), (int, float)) for k in SFT_FIELDS) for s in steps):
        problems.append(f"metrics {steps[:1]}")
    elif steps[-1]["epoch"] != 2:
        problems.append(f"last epoch {steps[-1]['epoch']}")
    ck = latest(out)
    if not {"tokenizer.model", "tokenizer_config.json", "model.safetensors"} <= set(os.listdir(ck)):
        problems.append(f"checkpoint holds {sorted(os.listdir(ck))}")
    return problems, f"6 conversations (3 with two assistant turns), {n_learned} of {n_tok} tokens learned, " \
                     f"{len(steps)} steps"


def sft_no_tokenizer(t):
    t.setup()
    bare = t.path("model_bare")
    if not os.path.isdir(bare):
        os.makedirs(bare)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(t.path("model", name), bare)
    data = write_jsonl(t.path("bare.jsonl"), t.sft_records(3, 12, 5))
    rec = t.recipe("bare_recipe", {"epochs": 1, "max_len": 64, "batch_size": 1})
    out = t.path("sft_bare")
    problems = []
    p = t.jet("sft", "--model", bare, "--data", data, "--out", out, "--recipe", rec, "--quiet")
    if p.returncode != 0:
        problems.append(f"pre-tokenized without a tokenizer: exit {p.returncode}: {one_line(p)}")
    elif {"tokenizer.model", "tokenizer.json"} & set(os.listdir(latest(out))):
        problems.append("tokenizer files in a checkpoint of a model that had none")
    msgs = write_jsonl(t.path("bare_messages.jsonl"), [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    out2 = t.path("sft_bare_messages")
    p = t.jet("sft", "--model", bare, "--data", msgs, "--out", out2, "--recipe", rec)
    if not (p.returncode == 1 and f"{msgs}:1:" in p.stderr and "tokenizer" in one_line(p)):
        problems.append(f"messages without a tokenizer: exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
    if os.path.exists(out2):
        problems.append(f"{out2} was made by a refused run")
    return problems, f"messages refused: {one_line(p)[-120:]}"


def sft_loss_decreases(t):
    out, _, _ = t.learn_run()
    steps, _ = metrics(out)
    per_epoch = len(steps) // LEARN_RECIPE["epochs"]
    first = sum(s["loss"] for s in steps[:per_epoch]) / per_epoch
    last = sum(s["loss"] for s in steps[-per_epoch:]) / per_epoch
    problems = []
    if len(steps) != 2 * LEARN_RECIPE["epochs"] or per_epoch != 2:
        problems.append(f"{len(steps)} steps, want {2 * LEARN_RECIPE['epochs']} (2 rows an epoch)")
    if not last < first - 2.0:
        problems.append(f"loss {first:.3f} (first epoch) -> {last:.3f} (last): not learning")
    return problems, f"first epoch {first:.3f} -> last epoch {last:.3f} over {len(steps)} steps"


def sft_resume_bit_exact(t):
    straight, _ = t.straight("sft")
    out = t.path("sft_resumed")
    t.must(*t.args("sft", out, "--stop-after", "3", "--quiet"))
    problems = []
    if os.path.basename(latest(out)) != "step_3":
        problems.append(f"stopped at {os.path.basename(latest(out))}, want step_3")
    cfg = json.load(open(os.path.join(latest(out), "config.json")))
    if (cfg.get("aux_loss_coef"), cfg.get("z_loss_coef")) != (SFT_RECIPE["aux_loss_coef"], SFT_RECIPE["z_loss_coef"]):
        problems.append(f"checkpoint router-loss weights {cfg.get('aux_loss_coef')}, {cfg.get('z_loss_coef')}: "
                        "not the recipe's")
    p = t.must(*t.args("sft", out, "--resume"))
    if "resuming at step 3" not in p.stderr:
        problems.append(f"stderr does not say it resumes at step 3: {p.stderr[-300:]!r}")
    # the tokenizer files too, although the checkpoint the resume read them from (step_3) was removed on
    # the way (only the two newest are kept)
    problems += same_run(straight, out)
    a = comparable(straight)
    # resuming the finished run evaluates again: the same final record, nothing repeated
    t.must(*t.args("sft", out, "--resume", "--quiet"))
    if comparable(out) != a:
        problems.append("resuming the finished run changed metrics.jsonl")
    return problems, f"3 + resume == {len(metrics(out)[0])} straight: every file of the final checkpoint and " \
                     f"{len(a)} metrics lines identical; resuming the finished run changes nothing"


def sft_sigint_resume(t):
    straight, data, rec = t.learn_run()
    out = t.path("learn_sigint")
    # the signal once two steps are logged; should the run finish first (a fast machine, a slow poll), once
    # more with the signal as soon as the run says it starts (the handler is set by then)
    for after_steps in (2, 0):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([t.jetmoe, "sft", "--model", t.path("model"), "--data", data, "--out", out,
                                 "--recipe", rec], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        mpath, t_end = os.path.join(out, "metrics.jsonl"), time.time() + 120
        while time.time() < t_end and proc.poll() is None and after_steps:
            if os.path.exists(mpath) and open(mpath).read().count("\n") >= after_steps:
                break
            time.sleep(0.002)
        while proc.poll() is None and not after_steps:  # stderr: "sft data: ..." comes before the first step
            if proc.stderr.readline().startswith(b"sft data:"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        err = err.decode(errors="replace")
        if sanitizer_report(err):
            t.san.append(f"sft (SIGINT): {err[-600:]}")
        if proc.returncode != 0:
            break
    problems = []
    if proc.returncode != 130:
        return [f"exit {proc.returncode} after SIGINT, want 130: {err[-300:]!r}"], ""
    step = os.path.basename(latest(out))
    if f"stopped at {step.replace('_', ' ')}" not in err or step == f"step_{2 * LEARN_RECIPE['epochs']}":
        problems.append(f"latest {step}; stderr {err[-300:]!r}")
    p = t.jet("sft", "--model", t.path("model"), "--data", data, "--out", out, "--recipe", rec, "--resume",
              "--quiet")
    if p.returncode != 0:
        return problems + [f"--resume: exit {p.returncode}: {one_line(p)}"], ""
    problems += same_run(straight, out)
    return problems, f"SIGINT at {step}, exit 130; resumed to the straight run's checkpoint and metrics"


def sft_sigint_before_first_step(t):
    """SIGINT while the step-0 held-out evaluation runs (a large --eval-data): the stop comes before any
    step, and still leaves a checkpoint (step_0) that --resume continues from."""
    straight, data, rec = t.learn_run()
    out = t.path("learn_sigint0")
    for n in (100, 600):  # held-out records; more, should the signal come too late with fewer
        shutil.rmtree(out, ignore_errors=True)
        ev = write_jsonl(t.path("learn_big_eval.jsonl"), t.sft_records(n, 30, 23))
        proc = subprocess.Popen([t.jetmoe, "sft", "--model", t.path("model"), "--data", data, "--eval-data", ev,
                                 "--out", out, "--recipe", rec], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        head = []
        while proc.poll() is None:  # "sft: N parameters, ... from step 0" comes right before the evaluation
            line = proc.stderr.readline().decode(errors="replace")
            head.append(line)
            if not line or "from step 0" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        err = "".join(head) + err.decode(errors="replace")
        if sanitizer_report(err):
            t.san.append(f"sft (SIGINT): {err[-600:]}")
        if proc.returncode != 130 or "stopped at step 0" in err:
            break
    if proc.returncode != 130 or "stopped at step 0" not in err:
        return [f"exit {proc.returncode}, want 130 and a stop at step 0: {err[-300:]!r}"], ""
    problems = []
    if not os.path.exists(os.path.join(out, "checkpoints", "step_0", "model.safetensors")):
        problems.append(f"no step_0 checkpoint: {sorted(os.listdir(out))}")
    p = t.jet("sft", "--model", t.path("model"), "--data", data, "--eval-data", ev, "--out", out, "--recipe", rec,
              "--resume", "--quiet")
    if p.returncode != 0:
        return problems + [f"--resume: exit {p.returncode}: {one_line(p)}"], ""
    if final_weights(out) != final_weights(straight):  # held-out evaluation changes no weight
        problems.append("final weights differ from the straight run's")
    steps, held = metrics(out)
    if [h["step"] for h in held] != [0, len(steps)] or [s["loss"] for s in steps] != \
            [s["loss"] for s in metrics(straight)[0]]:
        problems.append(f"held-out records at {[h['step'] for h in held]}; losses equal to the straight run's: "
                        f"{[s['loss'] for s in steps] == [s['loss'] for s in metrics(straight)[0]]}")
    return problems, f"stopped at step 0 during the step-0 evaluation of {n} records; step_0 saved; resumed " \
                     "to the straight run's weights"


def batch_spans_epochs(t):
    """A micro-batch larger than an epoch: sft with 5 records that fill one row an epoch and batch_size 3
    (3 epochs' examples in one micro-batch), dpo with 3 pairs and batch_size 8. The steps and epochs
    follow; the ASan build sees any write past what was allocated for one epoch's examples."""
    t.setup()
    problems, seen = [], []
    sft = write_jsonl(t.path("span_sft.jsonl"), t.sft_records(5, 12, 81))
    dpo = write_jsonl(t.path("span_dpo.jsonl"), t.pref_records(3, 82))
    for kind, data, r, want_epochs in (
            ("sft", sft, {"epochs": 4, "max_len": 64, "batch_size": 3, "optimizer": {"lr": 1e-3}}, [3, 4]),
            ("dpo", dpo, {"epochs": 3, "max_len": 32, "batch_size": 8, "optimizer": {"lr": 1e-3}}, [8 / 3, 3])):
        out = t.path(f"span_{kind}")
        p = t.jet(kind, "--model", t.path("model"), "--data", data, "--out", out, "--recipe",
                  t.recipe(f"span_{kind}", r), "--quiet")
        if p.returncode != 0:
            problems.append(f"{kind}: exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
            continue
        epochs = [s["epoch"] for s in metrics(out)[0]]
        if len(epochs) != 2 or any(abs(a - b) > 1e-5 for a, b in zip(epochs, want_epochs)):
            problems.append(f"{kind}: epochs {epochs} at its steps, want {want_epochs}")
        seen.append(f"{kind} epochs {[round(e, 3) for e in epochs]}")
    return problems, "; ".join(seen)


# ---------------------------------------------------------------- DPO runs

def dpo_resume_bit_exact(t):
    straight, _ = t.straight("dpo")
    ref = t.path("dpo_ref_copy")
    shutil.rmtree(ref, ignore_errors=True)
    shutil.copytree(t.path("model"), ref)
    out = t.path("dpo_resumed")
    p = t.must(*t.args("dpo", out, "--ref", ref, "--stop-after", "5"))
    problems = []
    cache = os.path.join(out, "ref_logps.safetensors")
    if "reference log-probs" not in p.stderr or not os.path.exists(cache):
        problems.append(f"first part: no reference log-probs line or no {cache}")
    if os.path.basename(latest(out)) != "step_5":
        problems.append(f"stopped at {os.path.basename(latest(out))}, want step_5 (off the checkpoint grid)")
    shutil.rmtree(ref)  # the resume must not need the reference: its log-probs are in the run
    before = read_bytes(cache)
    p = t.jet(*t.args("dpo", out, "--ref", ref, "--resume"))
    if p.returncode != 0:
        return problems + [f"--resume without the --ref directory: exit {p.returncode}: {one_line(p)}"], ""
    if "reference log-probs" in p.stderr:
        problems.append("the resume computed the reference log-probs again")
    if read_bytes(cache) != before:
        problems.append("ref_logps.safetensors changed on resume")
    problems += same_run(straight, out)
    return problems, f"5 + resume (reference deleted) == straight: every file of the final checkpoint and " \
                     f"{len(comparable(out))} metrics lines identical"


def dpo_run_metrics(t):
    out, err = t.straight("dpo")
    steps, _ = metrics(out)
    problems = []
    total = -(-16 * DPO_RECIPE["epochs"] // (DPO_RECIPE["batch_size"] * DPO_RECIPE["grad_accum"]))
    if [s["step"] for s in steps] != list(range(1, total + 1)):
        problems.append(f"steps {[s['step'] for s in steps]}, want 1..{total}")
    for s in steps:
        missing = [k for k in DPO_FIELDS + SFT_FIELDS if not isinstance(s.get(k), (int, float))
                   or not math.isfinite(s[k])]
        if missing:
            problems.append(f"step {s['step']}: {missing} missing or not finite")
            continue
        if abs(s["rewards/margins"] - (s["rewards/chosen"] - s["rewards/rejected"])) > 1e-5:
            problems.append(f"step {s['step']}: margins {s['rewards/margins']} != chosen - rejected")
        if not 0 <= s["rewards/accuracies"] <= 1 or not s["logps/chosen"] < 0 or not s["logps/rejected"] < 0:
            problems.append(f"step {s['step']}: accuracies/logps out of range {s}")
    if steps:
        s = steps[0]  # before the first update the policy is the reference
        # (the reference is scored once, opened in place and packed in data order, not the step's: equal to
        # rounding, not bit for bit)
        if abs(s["loss"] - math.log(2)) > 1e-5 or abs(s["rewards/chosen"]) > 1e-5 or \
                abs(s["rewards/rejected"]) > 1e-5:
            problems.append(f"step 1: loss {s['loss']}, rewards {s['rewards/chosen']}, {s['rewards/rejected']}; "
                            "want ln 2 and 0")
        if not steps[-1]["loss"] < steps[0]["loss"]:
            problems.append(f"loss {steps[0]['loss']} -> {steps[-1]['loss']}")
    if "beta 0.1" not in err:
        problems.append(f"stderr does not name beta: {err[-300:]!r}")
    return problems, f"{len(steps)} steps, loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}, margin " \
                     f"{steps[-1]['rewards/margins']:.3f}" if steps else ""


def dpo_ref_logps_cache(t):
    out, err = t.straight("dpo")
    problems = []
    st = read_st(os.path.join(out, "ref_logps.safetensors"))
    lp = st.get("logps", [])
    if len(lp) != 2 * (16 + 6):
        return [f"ref_logps holds {len(lp)} log-probs, want {2 * 22}; tensors {sorted(st)}"], ""
    if "reference log-probs of 44 sequences" not in err:
        problems.append(f"stderr: {err[-300:]!r}")
    _, held = metrics(out)
    h0 = held[0] if held and held[0]["step"] == 0 else {}
    ev = lp[32:]
    for key, vals in (("heldout_logps/chosen", ev[0::2]), ("heldout_logps/rejected", ev[1::2])):
        want = sum(vals) / len(vals)
        if not abs(h0.get(key, 0) - want) <= 1e-4 * abs(want):
            problems.append(f"step 0 {key} {h0.get(key)}, the cache's mean {want:.6g}")
    if not all(x < 0 and math.isfinite(x) for x in lp):
        problems.append("log-probs not all negative and finite")
    return problems, f"{len(lp)} F64 log-probs; step-0 held-out means match"


def dpo_heldout_learns(t):
    out, _ = t.straight("dpo")
    steps, held = metrics(out)
    problems = []
    if [h["step"] for h in held] != [0, len(steps)]:
        return [f"held-out records at {[h['step'] for h in held]}, want [0, {len(steps)}]"], ""
    first, last = held
    for h in held:
        missing = [k for k in ["heldout_loss"] + ["heldout_" + f for f in DPO_FIELDS] if k not in h]
        if missing:
            problems.append(f"step {h['step']}: {missing} missing")
    if problems:
        return problems, ""
    if abs(first["heldout_loss"] - math.log(2)) > 1e-6 or first["heldout_rewards/margins"] != 0 or \
            first["heldout_rewards/accuracies"] != 0:
        problems.append(f"step 0: {first} (the policy is the reference: ln 2, margins 0, accuracy 0 on ties)")
    if last["heldout_rewards/accuracies"] != 1.0:
        problems.append(f"held-out rewards/accuracies {last['heldout_rewards/accuracies']} at the end, want 1.0")
    if not last["heldout_rewards/margins"] > 0.1 or not last["heldout_loss"] < first["heldout_loss"] - 0.05:
        problems.append(f"held-out margin {last['heldout_rewards/margins']}, loss {last['heldout_loss']}")
    return problems, f"held-out accuracy {first['heldout_rewards/accuracies']} -> " \
                     f"{last['heldout_rewards/accuracies']}, margin {last['heldout_rewards/margins']:.3f}, " \
                     f"loss {first['heldout_loss']:.4f} -> {last['heldout_loss']:.4f}"


def dpo_text_records(t):
    t.setup()
    recs = [{"prompt": "Is the sky blue?", "chosen": "Yes, it is.", "rejected": "No."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
             "chosen": "Hi!", "rejected": "Goodbye."},
            {"chosen": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
             "rejected": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Five."}]},
            {"prompt": "Name a color.", "chosen": [{"role": "user", "content": "Name a color."},
                                                   {"role": "assistant", "content": "Red."}],
             "rejected": [{"role": "user", "content": "Name a color."},
                          {"role": "assistant", "content": "Seven."}]}]
    data = write_jsonl(t.path("dpo_text.jsonl"), recs)
    rec = t.recipe("dpo_text_recipe", {"epochs": 2, "max_len": 96, "batch_size": 2, "optimizer": {"lr": 1e-3}})
    out = t.path("dpo_text")
    p = t.must("dpo", "--model", t.path("model"), "--data", data, "--out", out, "--recipe", rec)
    steps, _ = metrics(out)
    problems = []
    if "4 pairs from 4 lines" not in p.stderr:
        problems.append(f"stderr: {p.stderr[:300]!r}")
    if len(steps) != 4 or any(k not in steps[-1] for k in DPO_FIELDS):
        problems.append(f"{len(steps)} steps, last {steps[-1:]}")
    return problems, f"4 pairs (string, message-list and conversation layouts), {len(steps)} steps"


def model_is_run_dir(t):
    """--model and --ref may name a run directory: its newest checkpoint, named on stderr."""
    sft, _ = t.straight("sft")
    data, _, rec = t.data("sft")
    ddata, _, drec = t.data("dpo")
    ck = latest(sft)
    problems = []
    for args, flag in ((["sft", "--model", sft, "--data", data, "--recipe", rec], "--model"),
                       (["dpo", "--model", t.path("model"), "--ref", sft, "--data", ddata, "--recipe", drec], "--ref")):
        out = t.path(f"from_run_{args[0]}")
        p = t.jet(*args, "--out", out, "--stop-after", "1", "--quiet")
        if p.returncode != 0:
            problems.append(f"{args[0]} {flag} RUN: exit {p.returncode}: {one_line(p)}")
        elif f"jetmoe {args[0]}: using {ck}" not in p.stderr:
            problems.append(f"{args[0]} {flag} RUN: the checkpoint used is not named: {p.stderr[-300:]!r}")
    return problems, f"sft --model RUN and dpo --ref RUN: 'using {os.path.relpath(ck, sft)}'"


# ---------------------------------------------------------------- refusals

def refused(t, args, root, expect, rc=1):
    """args fail with exit rc, the last stderr line naming each of expect; root unchanged."""
    before = tree_state(root) if os.path.exists(root) else None
    p = t.jet(*args)
    after = tree_state(root) if os.path.exists(root) else None
    problems = []
    if p.returncode != rc:
        problems.append(f"exit {p.returncode}, want {rc}")
    line = one_line(p)
    problems += [f"message lacks {e!r}" for e in expect if e not in line]
    if before != after:
        problems.append(f"{root} changed: {tree_diff(before or {}, after or {})[:4]}")
    return [f"{args[0]} {' '.join(a for a in map(str, args) if a.startswith('--'))}: {x} ({line[-200:]!r})"
            for x in problems]


def refuse_resume_other_data(t):
    sft, _ = t.straight("sft")
    dpo, _ = t.straight("dpo")
    data, ev, rec = t.data("sft")
    other = write_jsonl(t.path("sft_other.jsonl"), t.sft_records(SFT_N, SFT_LEN, 99))
    fewer = write_jsonl(t.path("sft_fewer.jsonl"), t.sft_records(SFT_N - 1, SFT_LEN, 11))
    ddata, dev, drec = t.data("dpo")
    dother = write_jsonl(t.path("dpo_other.jsonl"), t.pref_records(16, 77))
    problems = []
    for d in (other, fewer):
        problems += refused(t, ["sft", "--model", t.path("model"), "--data", d, "--eval-data", ev, "--out", sft,
                                "--recipe", rec, "--resume"], sft, ["data", "resume with the same"])
    problems += refused(t, ["dpo", "--model", t.path("model"), "--data", dother, "--eval-data", dev, "--out", dpo,
                            "--recipe", drec, "--resume"], dpo, ["other data"])
    # DPO's --beta and --label-smoothing are the run's as much as the recipe's values are
    for flag, value in (("--beta", "0.5"), ("--label-smoothing", "0.1")):
        problems += refused(t, t.args("dpo", dpo, "--resume", flag, value), dpo, ["other"])
    # another recipe is another run too
    rec2 = t.recipe("sft_recipe_lr", dict(SFT_RECIPE, optimizer={"lr": 1e-3}))
    problems += refused(t, ["sft", "--model", t.path("model"), "--data", data, "--eval-data", ev, "--out", sft,
                            "--recipe", rec2, "--resume"], sft, ["another recipe"])
    return problems, "sft: other records, fewer records, another recipe; dpo: other records, --beta, " \
                     "--label-smoothing"


def refuse_resume_overwrite(t):
    sft, _ = t.straight("sft")
    dpo, _ = t.straight("dpo")
    problems = []
    problems += refused(t, t.args("sft", sft, "--resume", "--overwrite"), sft, ["--resume", "--overwrite"])
    problems += refused(t, t.args("dpo", dpo, "--resume", "--overwrite"), dpo, ["--resume", "--overwrite"])
    return problems, "sft and dpo: one line naming both flags, the run untouched"


def refuse_existing_run(t):
    sft, _ = t.straight("sft")
    dpo, _ = t.straight("dpo")
    problems = []
    problems += refused(t, t.args("sft", sft), sft, [sft, "--overwrite"])
    problems += refused(t, t.args("dpo", dpo), dpo, [dpo, "--overwrite"])
    problems += refused(t, t.args("dpo", sft), sft, [sft, "--overwrite"])  # an SFT run under a DPO command
    return problems, "sft over its run, dpo over its run, dpo over an sft run"


def refuse_too_many_files(t):
    """More --data files than the command takes: an argument error (exit 2), never the first 64 alone."""
    t.setup()
    d = t.path("many_files")
    os.makedirs(d, exist_ok=True)
    rec = t.sft_records(1, 12, 71)[0]
    files = [write_jsonl(os.path.join(d, f"part{i:02d}.jsonl"), [rec]) for i in range(65)]
    problems = []
    for flag in ("--data", "--eval-data"):
        data = files[:1] if flag == "--eval-data" else files
        ev = files if flag == "--eval-data" else files[:1]
        out = t.path("many_files_run")
        problems += refused(t, ["sft", "--model", t.path("model"), "--data", ",".join(data), "--eval-data",
                                ",".join(ev), "--out", out], out, [flag, "65"], rc=2)
    out = t.path("many_files_run")
    p = t.jet("sft", "--model", t.path("model"), "--data", ",".join(files[:64]), "--out", out, "--stop-after", "1")
    if p.returncode != 0 or "64 examples from 64 lines" not in p.stderr:
        problems.append(f"64 files: exit {p.returncode}: {p.stderr[-300:]!r}")
    return problems, "65 files refused (--data and --eval-data); 64 read, every one"


def refuse_dump_grad_exists(t):
    t.setup()
    data, _, _ = t.data("sft")
    ddata, _, _ = t.data("dpo")
    dump = t.path("dumps", "g.safetensors")
    os.makedirs(os.path.dirname(dump), exist_ok=True)
    with open(dump, "wb") as f:
        f.write(b"someone's file")
    problems = []
    for args in (["sft", "--model", t.path("model"), "--data", data, "--dump-grad", dump],
                 ["dpo", "--model", t.path("model"), "--data", ddata, "--dump-grad", dump]):
        problems += refused(t, args, os.path.dirname(dump), [dump, "--overwrite"])
        p = t.jet(*args)
        if "reference log-probs" in p.stderr:
            problems.append(f"{args[0]}: the reference was run before the output was checked")
    # --dump-grad with --resume (it reads --model, not a run): one line, not a crash
    problems += refused(t, ["sft", "--data", data, "--dump-grad", t.path("dumps", "new.safetensors"), "--resume"],
                        os.path.dirname(dump), ["--dump-grad", "--resume"])
    # with --overwrite it is replaced by a dump
    p = t.jet("sft", "--model", t.path("model"), "--data", data, "--dump-grad", dump, "--overwrite")
    if p.returncode != 0 or "loss" not in read_st(dump):
        problems.append(f"--overwrite: exit {p.returncode}: {one_line(p)}")
    return problems, "sft and dpo refused without --overwrite (file unchanged); replaced with it"


def inputs_never_replaced(t):
    sft, _ = t.straight("sft")
    dpo, _ = t.straight("dpo")
    data, ev, rec = t.data("sft")
    ddata, dev, drec = t.data("dpo")
    model = t.path("model")
    problems = []
    # --dump-grad onto what the command reads
    for target in (data, rec, os.path.join(model, "model.safetensors"), os.path.join(model, "config.json")):
        problems += refused(t, ["sft", "--model", model, "--data", data, "--recipe", rec, "--dump-grad", target,
                                "--overwrite"], t.d if target != data else os.path.dirname(target), ["never"])
    problems += refused(t, ["dpo", "--model", model, "--data", ddata, "--ref", latest(dpo), "--dump-grad",
                            os.path.join(latest(dpo), "model.safetensors"), "--overwrite"], dpo, ["never"])
    # --overwrite over a run whose checkpoint (or the run itself) is what the command reads
    problems += refused(t, ["sft", "--model", latest(sft), "--data", data, "--out", sft, "--recipe", rec,
                            "--overwrite"], sft, ["never"])
    problems += refused(t, ["sft", "--model", sft, "--data", data, "--out", sft, "--recipe", rec, "--overwrite"],
                        sft, ["never"])
    problems += refused(t, ["dpo", "--model", model, "--ref", latest(dpo), "--data", ddata, "--out", dpo,
                            "--recipe", drec, "--overwrite"], dpo, ["never"])
    # records inside the output directory under a name a run writes: --overwrite would remove them
    other = t.path("data_named_metrics")
    os.makedirs(other, exist_ok=True)
    inside = os.path.join(other, "metrics.jsonl")
    shutil.copy(data, inside)
    problems += refused(t, ["sft", "--model", model, "--data", inside, "--out", other, "--recipe", rec,
                            "--overwrite"], other, ["never"])
    # a recipe kept in the run directory as recipe.json: --overwrite starts afresh and leaves it as it is
    own = t.path("own_recipe_run")
    os.makedirs(own, exist_ok=True)
    own_rec = write_json(os.path.join(own, "recipe.json"), dict(SFT_RECIPE, epochs=1))
    keep = read_bytes(own_rec), os.stat(own_rec).st_ino
    for extra in ([], ["--overwrite"]):
        p = t.jet("sft", "--model", model, "--data", data, "--out", own, "--recipe", own_rec, "--quiet", *extra)
        if p.returncode != 0:
            problems.append(f"recipe.json in the run directory {extra}: exit {p.returncode}: {one_line(p)}")
    if (read_bytes(own_rec), os.stat(own_rec).st_ino) != keep:
        problems.append("the run replaced the recipe.json it read")
    return problems, "dump onto data/recipe/weights/config/ref weights, --overwrite over the model's or the " \
                     "reference's run, data inside the run: refused; recipe.json in the run kept"


# ---------------------------------------------------------------- bad records

def bad_cases(t):
    """(name, kind, file lines (the bad one last), expected words, recipe fields)"""
    good_tok = json.dumps({"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]})
    good_msg = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    good_pref = json.dumps({"prompt_input_ids": [1, 5, 6], "chosen_input_ids": [TOKEN_A, 2],
                            "rejected_input_ids": [TOKEN_B, 2]})
    good_text = json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "no"})
    long_text = " ".join(f"word{i}" for i in range(60))
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    sft = [
        ("malformed_json", [good_tok, '{"input_ids": [1, 5, 6]'], ["JSON"]),
        ("missing_fields", [good_tok, json.dumps({"text": "hello"})], ['"messages"', '"input_ids"']),
        ("empty_completion", [good_msg, json.dumps({"messages": [u("hi"), a("")]})], ["empty"]),
        ("unknown_role", [good_msg, json.dumps({"messages": [{"role": "robot", "content": "x"}, a("ok")]})],
         ["role", "robot"]),
        ("prompt_too_long", [good_msg, json.dumps({"messages": [u(long_text), a("ok")]})],
         ["no room", "max_len 40"]),
        ("token_out_of_range", [good_tok, json.dumps({"input_ids": [1, 5, V], "labels": [-100, 5, V]})],
         [f"[0, {V})"]),
        ("no_assistant_turn", [good_msg, json.dumps({"messages": [u("hi"), u("anyone?")]})], ["no assistant"]),
        ("labels_length", [good_tok, json.dumps({"input_ids": [1, 5, 6], "labels": [-100, 5]})], ["labels"]),
    ]
    dpo = [
        ("malformed_json", [good_pref, '{"prompt": "x", "chosen": "y", "rejected": }'], ["JSON"]),
        ("missing_fields", [good_text, json.dumps({"prompt": "hi", "chosen": "yes"})], ['"rejected"', "missing"]),
        ("empty_completion", [good_text, json.dumps({"prompt": "hi", "chosen": "", "rejected": "no"})],
         ["chosen", "empty"]),
        ("empty_completion_ids", [good_pref, json.dumps({"prompt_input_ids": [1, 5], "chosen_input_ids": [],
                                                         "rejected_input_ids": [3]})], ["chosen_input_ids", "empty"]),
        ("unknown_role", [good_text, json.dumps({"prompt": [{"role": "narrator", "content": "x"}], "chosen": "a",
                                                 "rejected": "b"})], ["role", "narrator"]),
        ("prompt_too_long", [good_pref, json.dumps({"prompt_input_ids": [1] + [5] * 45, "chosen_input_ids": [6],
                                                    "rejected_input_ids": [7]})], ["no room", "max_len 40"]),
        ("token_out_of_range", [good_pref, json.dumps({"prompt_input_ids": [1, 5], "chosen_input_ids": [V + 3],
                                                       "rejected_input_ids": [7]})], [f"[0, {V})"]),
        ("no_assistant_turn", [good_text, json.dumps({"chosen": [u("hi"), u("again")],
                                                      "rejected": [u("hi"), a("no")]})], ["assistant"]),
    ]
    return sft, dpo


BAD_RECIPE = {"epochs": 1, "max_len": 40, "batch_size": 2, "optimizer": {"lr": 1e-3}, "checkpoint_every": 100}


def bad_line_fail(t):
    t.setup()
    rec = t.recipe("bad_recipe", BAD_RECIPE)
    sft, dpo = bad_cases(t)
    for kind, cases in (("sft", sft), ("dpo", dpo)):
        for case, lines, expect in cases:
            name = f"tune_bad_line_fail_{kind}_{case}"
            if not t.suite.wanted(name):
                continue

            def one(kind=kind, case=case, lines=lines, expect=expect):
                path = write_jsonl(t.path(f"bad_{kind}_{case}.jsonl"), [lines[0], ""] + lines[1:])  # blank line 2
                out = t.path(f"bad_{kind}_{case}_run")
                p = t.jet(kind, "--model", t.path("model"), "--data", path, "--out", out, "--recipe", rec)
                line = one_line(p)
                problems = []
                if p.returncode != 1:
                    problems.append(f"exit {p.returncode}, want 1")
                if f"{path}:3:" not in line:
                    problems.append(f"message lacks {path}:3:")
                problems += [f"message lacks {e!r}" for e in expect if e not in line]
                if len(p.stderr.strip().splitlines()) != 1:
                    problems.append(f"{len(p.stderr.strip().splitlines())} lines on stderr")
                if os.path.exists(out):
                    problems.append(f"{out} was made")
                return [f"{x}: {line[-250:]!r}" for x in problems], line[line.find(":3:") + 4:][:110]
            t.check(name, one)


def bad_line_skip(t):
    t.setup()
    rec = t.recipe("bad_recipe", BAD_RECIPE)
    sft, dpo = bad_cases(t)
    problems, counts = [], []
    for kind, cases in (("sft", sft), ("dpo", dpo)):
        lines, bad_at = [], []
        for _, case_lines, _ in cases:
            lines += case_lines  # a good line, then the bad one
            bad_at.append(len(lines))
        path = write_jsonl(t.path(f"skip_{kind}.jsonl"), lines)
        for quiet in ([], ["--quiet"]):
            out = t.path(f"skip_{kind}_run{'_quiet' if quiet else ''}")
            p = t.jet(kind, "--model", t.path("model"), "--data", path, "--out", out, "--recipe", rec,
                      "--on-bad-line", "skip", *quiet)
            tag = f"{kind} {' '.join(quiet)}".strip()
            if p.returncode != 0:
                problems.append(f"{tag}: exit {p.returncode}: {one_line(p)}")
                continue
            if f"{len(cases)} bad lines skipped" not in p.stderr:
                problems.append(f"{tag}: no count of {len(cases)} bad lines on stderr: {p.stderr[-400:]!r}")
            if not quiet:
                reported = [n for n in bad_at if f"{path}:{n}:" in p.stderr]
                if reported != bad_at:
                    problems.append(f"{tag}: lines {bad_at} bad, reported {reported}")
                good = [n for n in range(1, len(lines) + 1) if n not in bad_at and f"{path}:{n}:" in p.stderr]
                if good:
                    problems.append(f"{tag}: good lines {good} reported")
            steps, _ = metrics(out)
            if not steps or not os.path.exists(os.path.join(latest(out), "model.safetensors")):
                problems.append(f"{tag}: no training after skipping")
        counts.append(f"{kind}: {len(cases)} of {len(lines)} lines skipped")
    return problems, "; ".join(counts) + ", reported with FILE:LINE and counted (also with --quiet)"


def too_long_counted(t):
    """Records longer than max_len: cut (truncation "truncate", the default) or dropped ("drop"), and either
    way counted on stderr, --quiet or not."""
    t.setup()
    sft = write_jsonl(t.path("long_sft.jsonl"), t.sft_records(3, 20, 61) + t.sft_records(1, 80, 62))
    long_pair = {"prompt_input_ids": [1, 5, 6], "chosen_input_ids": [TOKEN_A] * 50 + [2],
                 "rejected_input_ids": [TOKEN_B, 2]}
    dpo = write_jsonl(t.path("long_dpo.jsonl"), t.pref_records(3, 63) + [long_pair])
    problems, seen = [], []
    for trunc, quiet, want in (("truncate", [], "1 truncated, 0 dropped"), ("drop", ["--quiet"], "0 truncated, 1 "
                                                                                             "dropped as too long")):
        rec = t.recipe(f"long_{trunc}", dict(BAD_RECIPE, truncation=trunc))
        for kind, data, n in (("sft", sft, "examples"), ("dpo", dpo, "pairs")):
            out = t.path(f"long_{kind}_{trunc}")
            p = t.jet(kind, "--model", t.path("model"), "--data", data, "--out", out, "--recipe", rec, *quiet)
            kept = 4 if trunc == "truncate" else 3
            line = [l for l in p.stderr.splitlines() if l.startswith(f"{kind} data:")]
            if p.returncode != 0:
                problems.append(f"{kind} {trunc}: exit {p.returncode}: {one_line(p)}")
            elif not line or want not in line[0] or f"{kind} data: {kept} {n}" not in line[0]:
                problems.append(f"{kind} {trunc} {' '.join(quiet)}: want {kept} {n}, '{want}': {p.stderr[-300:]!r}")
            else:
                seen.append(f"{kind} {trunc}: {want}")
    return problems, "; ".join(seen)


def recipe_unknown_keys(t):
    t.setup()
    data, _, _ = t.data("sft")
    ddata, _, _ = t.data("dpo")
    cases = [("sft", {"epochs": 1, "lerning_rate": 0.1}, ["lerning_rate"]),
             ("sft", {"epochs": 1, "beta": 0.2}, ["beta", "DPO"]),
             ("sft", {"label_smoothing": 0.1}, ["label_smoothing", "DPO"]),
             ("sft", {"sources": {"a": "b"}}, ["sources"]),
             ("sft", {"optimizer": {"lr": 1e-3, "momentum": 0.9}}, ["optimizer", "momentum"]),
             ("dpo", {"schedule": {"warmup_ratio": 0.1, "warmup": 3}}, ["schedule", "warmup"]),
             ("dpo", {"beta": 0.1, "max_length": 64}, ["max_length", "max_len"]),
             ("dpo", {"epochs": 2.5}, ["epochs"])]
    problems = []
    for i, (kind, r, expect) in enumerate(cases):
        path = t.recipe(f"unknown_{i}", r)
        out = t.path(f"unknown_{i}_run")
        problems += refused(t, [kind, "--model", t.path("model"), "--data", data if kind == "sft" else ddata,
                                "--out", out, "--recipe", path], out, [path] + expect)
        if os.path.exists(out):
            problems.append(f"{kind} {r}: {out} was made")
    return problems, f"{len(cases)} recipes refused naming the field"


# ---------------------------------------------------------------- pretrain --init

def init_runs(t):
    def make():
        t.setup()
        jetmoe, d, recipe = t.fixture
        # the fixture's recipe on the tiny model, on one source: 12 steps at a high lr reach about the
        # unigram entropy (~4.4 nats against ln 400 = 6.0)
        small = {k: v for k, v in recipe.items() if k not in ("heldout", "eval_tokens")}
        small.update(model=dict(MODEL, max_position_embeddings=64), checkpoint_every=100, grad_accum=1,
                     phases=[{"name": "base", "steps": 12, "mixture": {"prose": 1}}], optimizer={"lr": 2e-2})
        base_r = write_json(t.path("init_base_recipe.json"), small)
        base = t.path("init_base")
        t.must("pretrain", "--recipe", base_r, "--out", base, "--quiet")
        cont = dict(small, phases=[{"name": "cont", "steps": 4, "mixture": {"prose": 1}}], grad_accum=2,
                    schedule={"type": "cosine", "warmup_steps": 2}, optimizer={"lr": 1e-3})
        cont_r = write_json(t.path("init_cont_recipe.json"), cont)
        return base, cont, cont_r
    return t.once("init", make)


def pretrain_init_continues(t):
    base, cont, cont_r = init_runs(t)
    ck = latest(base)
    out, fresh = t.path("init_cont"), t.path("init_fresh")
    t.must("pretrain", "--recipe", cont_r, "--init", base, "--out", out, "--quiet")  # a run: its newest
    t.must("pretrain", "--recipe", cont_r, "--out", fresh, "--quiet")
    steps, _ = metrics(out)
    fsteps, _ = metrics(fresh)
    problems = []
    if [s["step"] for s in steps] != [1, 2, 3, 4]:
        problems.append(f"steps {[s['step'] for s in steps]}, want 1..4: the counter starts afresh")
    peak = cont["optimizer"]["lr"]
    for s in steps:
        want = schedule_lr(s["step"] - 1, peak, 2, 4, min_ratio=0.1)  # pretraining's default floor
        if not abs(s["lr"] - want) <= 1e-5 * want:
            problems.append(f"step {s['step']}: lr {s['lr']}, want {want:.6g} (the recipe's own schedule)")
    state = read_st(os.path.join(latest(out), "trainer_state.safetensors"))
    if state.get("adamw.step") != [4] or state.get("step") != [4]:
        problems.append(f"trainer state step {state.get('step')}, adamw.step {state.get('adamw.step')}: want 4 "
                        "(a fresh optimizer)")
    ev = t.jet("eval", ck, "--data", os.path.join(t.fixture[1], "shards", "prose"), "--seq-len",
               str(cont["seq_len"]), "--max-tokens", "2048")
    if ev.returncode != 0:
        return problems + [f"eval: {one_line(ev)}"], ""
    init_loss = json.loads(ev.stdout)["loss"]
    first, fresh_first = steps[0]["loss"], fsteps[0]["loss"]
    if not abs(first - init_loss) < 0.5:  # one batch of 8 x 32 against 2048 tokens spread over the source
        problems.append(f"first loss {first:.3f}, the checkpoint's eval loss {init_loss:.3f}: not its weights?")
    if not fresh_first - first > 0.8:
        problems.append(f"first loss {first:.3f} vs a fresh model's {fresh_first:.3f}: not far below")
    return problems, f"first loss {first:.3f} (checkpoint's eval loss {init_loss:.3f}, a fresh model's first " \
                     f"{fresh_first:.3f}); steps 1..4 with warmup 2; adamw.step 4"


def pretrain_init_refusals(t):
    base, cont, cont_r = init_runs(t)
    ck = latest(base)
    problems = []
    for field, value in (("hidden_size", 48), ("num_local_experts", 8), ("num_hidden_layers", 3)):
        r = write_json(t.path(f"init_bad_{field}.json"), dict(cont, model=dict(cont["model"], **{field: value})))
        out = t.path(f"init_bad_{field}")
        problems += refused(t, ["pretrain", "--recipe", r, "--init", ck, "--out", out], out, ["--init", field])
        if os.path.exists(out):
            problems.append(f"{field}: {out} was made")
    out = t.path("init_cont")
    if not os.path.exists(out):
        t.must("pretrain", "--recipe", cont_r, "--init", ck, "--out", out, "--quiet")
    problems += refused(t, ["pretrain", "--recipe", cont_r, "--init", ck, "--out", out, "--resume"], out,
                        ["--init", "--resume"])
    # --overwrite over the run whose checkpoint is the --init: it is an input
    problems += refused(t, ["pretrain", "--recipe", cont_r, "--init", ck, "--out", base, "--overwrite"], base,
                        ["never"])
    return problems, "hidden_size, num_local_experts, num_hidden_layers named; --init with --resume refused; " \
                     "--overwrite over the --init's run refused"


# ---------------------------------------------------------------- the module

def run(suite, build, tmp):
    if not any(suite.wanted(n) or (suite.only and suite.only.startswith(n)) for n in CHECKS):
        return
    t0 = time.time()
    t = Tune(suite, build, tmp)
    os.makedirs(t.d, exist_ok=True)
    t.check("tune_sft_run_metrics", lambda: sft_run_metrics(t))
    t.check("tune_sft_steps_and_schedule", lambda: sft_steps_and_schedule(t))
    t.check("tune_sft_checkpoint_files", lambda: sft_checkpoint_files(t))
    t.check("tune_hf_names", lambda: hf_names(t))
    t.check("tune_sft_messages_run", lambda: sft_messages_run(t))
    t.check("tune_sft_no_tokenizer", lambda: sft_no_tokenizer(t))
    t.check("tune_sft_loss_decreases", lambda: sft_loss_decreases(t))
    t.check("tune_sft_resume_bit_exact", lambda: sft_resume_bit_exact(t))
    t.check("tune_sft_sigint_resume", lambda: sft_sigint_resume(t))
    t.check("tune_sft_sigint_before_first_step", lambda: sft_sigint_before_first_step(t))
    t.check("tune_batch_spans_epochs", lambda: batch_spans_epochs(t))
    t.check("tune_dpo_run_metrics", lambda: dpo_run_metrics(t))
    t.check("tune_dpo_ref_logps_cache", lambda: dpo_ref_logps_cache(t))
    t.check("tune_dpo_heldout_learns", lambda: dpo_heldout_learns(t))
    t.check("tune_dpo_resume_bit_exact", lambda: dpo_resume_bit_exact(t))
    t.check("tune_dpo_text_records", lambda: dpo_text_records(t))
    t.check("tune_model_is_run_dir", lambda: model_is_run_dir(t))
    t.check("tune_refuse_resume_other_data", lambda: refuse_resume_other_data(t))
    t.check("tune_refuse_resume_overwrite", lambda: refuse_resume_overwrite(t))
    t.check("tune_refuse_existing_run", lambda: refuse_existing_run(t))
    t.check("tune_refuse_too_many_files", lambda: refuse_too_many_files(t))
    t.check("tune_refuse_dump_grad_exists", lambda: refuse_dump_grad_exists(t))
    t.check("tune_inputs_never_replaced", lambda: inputs_never_replaced(t))
    bad_line_fail(t)
    t.check("tune_bad_line_skip", lambda: bad_line_skip(t))
    t.check("tune_too_long_counted", lambda: too_long_counted(t))
    t.check("tune_recipe_unknown_keys", lambda: recipe_unknown_keys(t))
    t.check("tune_pretrain_init_continues", lambda: pretrain_init_continues(t))
    t.check("tune_pretrain_init_refusals", lambda: pretrain_init_refusals(t))
    cpu = sum(c for _, c, _ in t.times)
    slow = ", ".join(f"{n[len(PREFIX):]} {s:.1f}s/{c:.1f}s" for s, c, n in sorted(t.times, reverse=True)[:5])
    print(f"# tune: {time.time() - t0:.1f}s, {cpu:.1f}s CPU in jetmoe (slowest, wall/CPU: {slow})", flush=True)
