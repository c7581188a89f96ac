"""The names the Hugging Face ecosystem keys on (issue 17): config.json's
architectures is transformers' JetMoeForCausalLM (the older JetMoEForCausalLM
still loads, and quantize rewrites it) and its fields JetMoeConfig's; every
model jetmoe writes has generation_config.json and every
tokenizer special_tokens_map.json, in the shapes save_pretrained writes; and
generate/chat take their sampling defaults from generation_config.json when
the flag is not given.

run(suite, jetmoe, run_dir, tok_dir, tmp): run_dir is a finished training run,
tok_dir the tokenizer `jetmoe tokenizer train` wrote for it.
"""
import json
import os
import shutil
import subprocess

from testlib import sanitizer_report

PREFIX = "pretrain_hf_names_"
# config.json's fields as transformers' JetMoeConfig names them (models/jetmoe/configuration_jetmoe.py,
# v4.47: rope_theta a field of its own; v5 reads it into rope_parameters), with what
# PretrainedConfig.to_json_string adds (architectures, model_type, torch_dtype, transformers_version).
# save_pretrained writes every one of them; num_attention_heads too (JetMoeConfig derives it:
# num_key_value_heads * num_experts_per_tok), and z_loss_coef is jetmoe's own.
HF_CONFIG = {"vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels",
             "intermediate_size", "max_position_embeddings", "activation_function", "num_local_experts",
             "num_experts_per_tok", "output_router_logits", "aux_loss_coef", "use_cache", "bos_token_id",
             "eos_token_id", "tie_word_embeddings", "rope_theta", "rms_norm_eps", "initializer_range",
             "attention_dropout", "model_type", "architectures", "torch_dtype", "transformers_version"}
CONFIG_EXTRA = {"num_attention_heads", "z_loss_coef"}
SPECIAL = {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
           for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}


def _run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace", input="")


def _load(path):
    with open(path) as f:
        return json.load(f)


def model_files(d, config):
    """[] or what is wrong with model directory d's HF names (config: its config.json's bos/eos)."""
    problems = []
    try:
        c = _load(os.path.join(d, "config.json"))
        if c.get("architectures") != ["JetMoeForCausalLM"] or c.get("model_type") != "jetmoe":
            problems.append(f"{d}: config.json architectures {c.get('architectures')} model_type "
                            f"{c.get('model_type')}")
        missing, extra = HF_CONFIG - set(c), set(c) - HF_CONFIG - CONFIG_EXTRA
        if missing or extra:
            problems.append(f"{d}: config.json lacks {sorted(missing)}, has unknown {sorted(extra)}")
        if c.get("num_attention_heads") != c.get("num_key_value_heads", 0) * c.get("num_experts_per_tok", 0):
            problems.append(f"{d}: config.json num_attention_heads {c.get('num_attention_heads')}")
        g = _load(os.path.join(d, "generation_config.json"))
        want = {"_from_model_config": True, "bos_token_id": config["bos_token_id"],
                "eos_token_id": config["eos_token_id"], "transformers_version": "4.47.0"}
        if g != want:
            problems.append(f"{d}: generation_config.json {g}")
    except (OSError, ValueError) as e:
        problems.append(f"{d}: {e}")
    return problems


def tokenizer_files(d):
    try:
        m = _load(os.path.join(d, "special_tokens_map.json"))
        return [] if m == SPECIAL else [f"{d}: special_tokens_map.json {m}"]
    except (OSError, ValueError) as e:
        return [f"{d}: {e}"]


def run(suite, jetmoe, run_dir, tok_dir, tmp):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        ck = os.path.join(run_dir, "checkpoints", f.read().strip())
    d = os.path.join(tmp, "hf_names")
    os.makedirs(d, exist_ok=True)

    # what init, quantize, a pretrain checkpoint and tokenizer train write
    if suite.wanted(PREFIX + "outputs"):
        problems = tokenizer_files(tok_dir) + tokenizer_files(ck)
        cfg = _load(os.path.join(ck, "config.json"))
        problems += model_files(ck, cfg)
        small = dict(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8,
                     intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                     bos_token_id=1, eos_token_id=2)
        cpath = os.path.join(d, "small.json")
        with open(cpath, "w") as f:
            json.dump(small, f)
        init, q = os.path.join(d, "init"), os.path.join(d, "q8")
        for argv in (["init", init, "--config", cpath], ["quantize", ck, "--to", "q8", "--out", q]):
            p = _run([jetmoe] + argv)
            if p.returncode != 0 or sanitizer_report(p.stderr):
                problems.append(f"{argv[0]}: exit {p.returncode} {p.stderr.strip()[-200:]!r}")
        problems += model_files(init, small) + model_files(q, cfg) + tokenizer_files(q)
        info = _run([jetmoe, "info", init])
        if "architecture      JetMoeForCausalLM" not in info.stdout:
            problems.append(f"info: {info.stdout[:300]!r} {info.stderr[-200:]!r}")
        suite.check(PREFIX + "outputs", not problems, "; ".join(problems)[:1500],
                    "init, quantize, a checkpoint: JetMoeForCausalLM + generation_config.json; "
                    "tokenizer train, checkpoint, quantize: special_tokens_map.json; info")

    # a model directory of our own to edit: the checkpoint's files, the trainer's state left out
    m = os.path.join(d, "model")
    shutil.rmtree(m, ignore_errors=True)
    os.makedirs(m)
    for n in os.listdir(ck):
        if n != "trainer_state.safetensors":
            shutil.copy(os.path.join(ck, n), os.path.join(m, n))
    gen = [jetmoe, "generate", m, "--tokens", "1,5,9", "--ids", "--quiet"]

    def config_with(**fields):
        c = _load(os.path.join(ck, "config.json"))
        c.update(fields)
        with open(os.path.join(m, "config.json"), "w") as f:
            json.dump(c, f)

    def gen_config(obj):
        with open(os.path.join(m, "generation_config.json"), "w") as f:
            f.write(obj if isinstance(obj, str) else json.dumps(obj))

    # quantize writes transformers' spelling whatever its input's config.json says, and keeps the rest
    if suite.wanted(PREFIX + "quantize_old_name"):
        problems = []
        for arch in (["JetMoEForCausalLM"], None):
            config_with(architectures=arch)
            src = _load(os.path.join(m, "config.json"))
            q = os.path.join(d, "q4_old_name")
            p = _run([jetmoe, "quantize", m, "--to", "q4", "--out", q, "--overwrite"])
            if p.returncode != 0 or sanitizer_report(p.stderr):
                problems.append(f"{arch}: exit {p.returncode} {p.stderr.strip()[-200:]!r}")
                continue
            c = _load(os.path.join(q, "config.json"))
            if c.get("architectures") != ["JetMoeForCausalLM"] or c.get("model_type") != "jetmoe":
                problems.append(f"{arch}: quantized config.json architectures {c.get('architectures')}")
            rest = {k: v for k, v in c.items() if k != "architectures"}
            if rest != {k: v for k, v in src.items() if k != "architectures"}:
                problems.append(f"{arch}: the other fields changed: {rest} from {src}")
        config_with()
        suite.check(PREFIX + "quantize_old_name", not problems, "; ".join(problems)[:1500],
                    "JetMoEForCausalLM or no architectures in, JetMoeForCausalLM out; the other fields kept")

    # the authors' spelling still loads, and so does a config.json without architectures
    if suite.wanted(PREFIX + "old_architecture_loads"):
        problems = []
        for arch in (["JetMoEForCausalLM"], None):
            config_with(architectures=arch)
            p = _run(gen + ["--greedy", "--max-new", "3"])
            if p.returncode != 0 or len(p.stdout.split()) != 3:
                problems.append(f"{arch}: exit {p.returncode} {p.stdout!r} {p.stderr.strip()[-200:]!r}")
        config_with(architectures=["LlamaForCausalLM"])
        p = _run(gen + ["--greedy", "--max-new", "3"])
        if p.returncode == 0 or "LlamaForCausalLM" not in p.stderr or "config.json" not in p.stderr:
            problems.append(f"Llama: exit {p.returncode} {p.stderr.strip()[-200:]!r}")
        config_with()
        suite.check(PREFIX + "old_architecture_loads", not problems, "; ".join(problems)[:1200],
                    "JetMoEForCausalLM and none load; another architecture is refused")

    # generation_config.json's defaults: greedy (temperature 0) makes every seed the same, max_new_tokens
    # bounds the length; the flags win over it
    if suite.wanted(PREFIX + "generation_config_defaults"):
        gen_config({"bos_token_id": 1, "eos_token_id": 2, "temperature": 0, "max_new_tokens": 4, "top_k": 50})
        a, b = _run(gen + ["--seed", "1"]), _run(gen + ["--seed", "2"])
        greedy = _run(gen + ["--greedy", "--max-new", "4"])
        gen_config({"do_sample": False, "max_new_tokens": 4})
        c = _run(gen + ["--seed", "3"])
        gen_config({"temperature": 0, "max_new_tokens": 4})
        longer = _run(gen + ["--seed", "1", "--max-new", "7"])
        hot = [_run(gen + ["--seed", str(s), "--temperature", "1.5", "--max-new", "12"]).stdout for s in range(1, 5)]
        ok = all(p.returncode == 0 for p in (a, b, greedy, c, longer)) and len(a.stdout.split()) <= 4 and \
            a.stdout == b.stdout == greedy.stdout == c.stdout and len(longer.stdout.split()) > 4 and \
            len(set(hot)) > 1
        suite.check(PREFIX + "generation_config_defaults", ok,
                    f"seed 1 {a.stdout!r} seed 2 {b.stdout!r} greedy {greedy.stdout!r} do_sample {c.stdout!r} "
                    f"--max-new 7 {longer.stdout!r} --temperature 1.5 {hot} {a.stderr[-200:]!r}",
                    "temperature 0 / do_sample false: seeds agree; --max-new and --temperature override")

    # a malformed file is one clear error naming it and the field, for generate and chat
    if suite.wanted(PREFIX + "generation_config_malformed"):
        problems = []
        path = os.path.join(m, "generation_config.json")
        for text, field in (('{"temperature": "hot"}', "temperature"), ('{"top_p": 0}', "top_p"),
                            ('{"top_k": 2.5}', "top_k"), ('{"max_new_tokens": 0}', "max_new_tokens"),
                            ('{"do_sample": "yes"}', "do_sample"), ('[1, 2]', "JSON object"), ('{"a": ', "")):
            gen_config(text)
            for argv in (gen + ["--temperature", "0.5"], [jetmoe, "chat", m]):
                p = _run(argv)
                err = p.stderr.strip()
                if p.returncode == 0 or path not in err or field not in err or len(err.splitlines()) != 1 or \
                        sanitizer_report(err):
                    problems.append(f"{argv[1]} {text}: exit {p.returncode} {err[-200:]!r}")
        os.unlink(path)
        suite.check(PREFIX + "generation_config_malformed", not problems, "; ".join(problems)[:1500],
                    "7 malformed files x generate, chat: one line naming the file and field")
