#!/usr/bin/python3
"""Inputs refused before any work, and messages that say why (issue 11, points 6, 9 and 10), through the CLI.

Each case runs a command on a copy of the tiny model (tests/cli_tests.py's tiny_model) with one
thing wrong, and checks the exit status, the one-line message (the file and the field named, the
cause present), and that every file under the case's directory is byte-identical afterwards.

  input_chat_template_empty_*          "chat_template": "" (string or the list's "default"): chat and
                                       generate refuse the tokenizer directory, naming the file and field
  input_chat_template_renders_nothing  a template that renders no text for the conversation: chat stops
                                       with that error instead of sending the model nothing
  input_tensor_name_nul_*              "model.embed_tokens.weight\\u0000junk" (and a name ending in \\u0000):
                                       refused by info, generate and forward, never loaded as the embedding
  input_quant_meta_*                   a q8 checkpoint with jetmoe.quant "q3", jetmoe.quant_block "abc" or
                                       jetmoe.quant_interleave "8", or the last without the first two:
                                       refused, naming the file and the key
  input_model_type_*                   config.json model_type "llama" (or a number): refused by info, generate
                                       and init (which then writes nothing); absent is accepted
  input_tokenizer_empty_*              an empty tokenizer.model / tokenizer.json: "the file is empty"
  input_tokenizer_json_bom             a UTF-8 BOM before tokenizer.json's '{': read as JSON, the same ids
  input_long_path_keeps_cause          a ~3,000-byte path: the message keeps its start and its cause
  input_control_chars_escaped_*        control characters in paths, arguments and tensor names are shown
                                       as \\xNN, never sent raw to the terminal

Called from tests/run_tests.py as run(suite, jetmoe, tmpdir).
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess

from cli_tests import tiny_model
from testlib import sanitizer_report

CASES = ["input_chat_template_empty_string", "input_chat_template_empty_list", "input_chat_template_renders_nothing",
         "input_tensor_name_nul_junk", "input_tensor_name_nul_end", "input_quant_meta_q3",
         "input_quant_meta_block_abc", "input_quant_meta_interleave_8", "input_quant_meta_interleave_alone",
         "input_model_type_llama", "input_model_type_number",
         "input_model_type_init_writes_nothing", "input_model_type_absent_ok", "input_tokenizer_empty_model",
         "input_tokenizer_empty_json", "input_tokenizer_json_bom", "input_long_path_keeps_cause",
         "input_control_chars_escaped_path", "input_control_chars_escaped_arguments",
         "input_control_chars_escaped_tensor_name"]


def snapshot(root):
    """Every file under root: relative path -> sha256 (links and special files by what they are)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def read_st(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    return json.loads(buf[8:8 + n]), buf[8 + n:]


def write_st(path, header, data):
    h = json.dumps(header, separators=(",", ":")).encode()  # ensure_ascii: \u0000 and \u001b stay escapes
    h += b" " * (-(8 + len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def run(suite, jetmoe, tmp):
    if not any(suite.wanted(c) for c in CASES):
        return
    root = os.path.join(tmp, "input_checks")
    shutil.rmtree(root, ignore_errors=True)

    def jm(*args, stdin=None):
        p = subprocess.run([jetmoe] + list(args), input=stdin, capture_output=True, timeout=300)
        p.out = p.stdout.decode("utf-8", "replace")
        p.err = p.stderr.decode("utf-8", "replace")
        return p

    model = tiny_model(suite, lambda *a: jm(*a), os.path.join(root, "base"))
    if model is None:
        return

    def variant(name, edit=None, source=None):
        d = os.path.join(root, name)
        shutil.copytree(source or model, d)
        if edit:
            edit(d)
        return d

    def refused(name, d, commands, want, status=1):
        """Every command exits with status, one line on stderr naming what is in want, nothing on stdout
        but what the command printed before reading (none here), and d unchanged."""
        if not suite.wanted(name):
            return
        before = snapshot(d)
        problems = []
        for args in commands:
            p = jm(*args[0], stdin=args[1] if len(args) > 1 else None)
            lines = p.err.strip().splitlines()
            last = lines[-1] if lines else ""
            missing = [w for w in want if w not in last]
            if p.returncode != status or missing or sanitizer_report(p.err) or "\x1b" in p.err:
                problems.append(f"{args[0][0]}: exit {p.returncode}, missing {missing} in {last[-400:]!r}")
        after = snapshot(d)
        if before != after:
            problems.append(f"files changed: {sorted(set(before.items()) ^ set(after.items()))[:4]}")
        suite.check(name, not problems, "; ".join(problems), last[-160:] if not problems else "")

    chat = lambda d: (["chat", d, "--greedy", "-n", "3", "--quiet"], b"hello\n")  # noqa: E731
    gen = lambda d: (["generate", d, "--tokens", "1,5", "-n", "2", "--ids"],)  # noqa: E731
    info = lambda d: (["info", d],)  # noqa: E731
    fwd = lambda d: (["forward", d, "--tokens", "1,2"],)  # noqa: E731

    # ---- 6: the chat template
    def template(value):
        def edit(d):
            p = os.path.join(d, "tokenizer_config.json")
            with open(p) as f:
                c = json.load(f)
            c["chat_template"] = value
            with open(p, "w") as f:
                json.dump(c, f)
        return edit

    d = variant("tpl_empty", template(""))
    refused("input_chat_template_empty_string", d, [chat(d), (["generate", d, "-p", "hello", "-n", "2"],)],
            ["tokenizer_config.json", "chat_template is empty", d])
    d = variant("tpl_list", template([{"name": "tool_use", "template": "{{ 1 }}"}, {"name": "default", "template": ""}]))
    refused("input_chat_template_empty_list", d, [chat(d)], ["tokenizer_config.json", "chat_template is empty"])
    d = variant("tpl_nothing", template("{# every message dropped #}"))
    refused("input_chat_template_renders_nothing", d, [chat(d)],
            [os.path.join(d, "tokenizer_config.json") + ": chat_template rendered nothing for 1 message"])

    # ---- 9: tensor names, quantized metadata, model_type
    def rename_embedding(new):
        def edit(d):
            p = os.path.join(d, "model.safetensors")
            h, data = read_st(p)
            h[new] = h.pop("model.embed_tokens.weight")
            write_st(p, h, data)
        return edit

    for case, new in (("junk", "model.embed_tokens.weight\u0000junk"), ("end", "model.embed_tokens.weight\u0000")):
        d = variant("nul_" + case, rename_embedding(new))
        refused("input_tensor_name_nul_" + case, d, [info(d), gen(d), fwd(d)],
                ["model.safetensors", "\\u0000 (NUL)"])

    q8 = os.path.join(root, "q8")
    p = jm("quantize", model, "--to", "q8", "--out", q8)
    if p.returncode != 0:
        suite.check("input_quant_meta_setup", False, p.err[-300:])
    else:
        for case, key, value in (("q3", "jetmoe.quant", "q3"), ("block_abc", "jetmoe.quant_block", "abc"),
                                 ("interleave_8", "jetmoe.quant_interleave", "8")):
            def edit(d, key=key, value=value):
                path = os.path.join(d, "model.safetensors")
                h, data = read_st(path)
                h["__metadata__"][key] = value
                write_st(path, h, data)
            d = variant("quant_" + case, edit, source=q8)
            refused("input_quant_meta_" + case, d, [info(d), gen(d)],
                    ["model.safetensors", f'metadata {key} is "{value}"'])

        def interleave_alone(d):
            path = os.path.join(d, "model.safetensors")
            h, data = read_st(path)
            del h["__metadata__"]["jetmoe.quant"], h["__metadata__"]["jetmoe.quant_block"]
            write_st(path, h, data)
        d = variant("quant_interleave_alone", interleave_alone, source=q8)
        refused("input_quant_meta_interleave_alone", d, [info(d), gen(d)],
                ["model.safetensors", "metadata has jetmoe.quant_interleave but not jetmoe.quant"])

    def model_type(value):
        def edit(d):
            p = os.path.join(d, "config.json")
            with open(p) as f:
                c = json.load(f)
            if value is None:
                c.pop("model_type")
            else:
                c["model_type"] = value
            with open(p, "w") as f:
                json.dump(c, f)
        return edit

    d = variant("type_llama", model_type("llama"))
    refused("input_model_type_llama", d, [info(d), gen(d), chat(d)],
            ["config.json", 'model_type is "llama"; only "jetmoe"'])
    d = variant("type_number", model_type(7))
    refused("input_model_type_number", d, [info(d)], ["config.json", "model_type must be the string"])
    if suite.wanted("input_model_type_init_writes_nothing"):
        cfg = os.path.join(root, "llama_config.json")
        with open(os.path.join(model, "config.json")) as f:
            c = json.load(f)
        c["model_type"] = "llama"
        with open(cfg, "w") as f:
            json.dump(c, f)
        out = os.path.join(root, "init_out")
        p = jm("init", out, "--config", cfg)
        suite.check("input_model_type_init_writes_nothing",
                    p.returncode == 1 and 'model_type is "llama"' in p.err and not os.path.exists(out),
                    f"exit {p.returncode}, {p.err[-300:]!r}, {out} exists: {os.path.exists(out)}")
    if suite.wanted("input_model_type_absent_ok"):
        d = variant("type_absent", model_type(None))
        p = jm("info", d)
        suite.check("input_model_type_absent_ok", p.returncode == 0 and "model.embed_tokens.weight" in p.out,
                    f"exit {p.returncode}: {p.err[-300:]!r}")

    # ---- 10: tokenizer files by content and name, long paths, control characters
    enc = lambda path: (["tokenizer", "encode", "--model", path], b"hello world\n")  # noqa: E731
    tk = os.path.join(root, "tk")
    for name, fname, want in (("input_tokenizer_empty_model", "tokenizer.model", "the file is empty (not a SentencePiece"),
                              ("input_tokenizer_empty_json", "tokenizer.json", "the file is empty (not a tokenizer.json)")):
        d = os.path.join(tk, name)
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, fname), "wb").close()
        refused(name, d, [enc(d), enc(os.path.join(d, fname))], [os.path.join(d, fname), want])
        if suite.wanted(name):  # and not the old, wrong causes
            p = jm(*enc(d)[0], stdin=b"x\n")
            suite.check(name + "_not_protobuf", "UNIGRAM" not in p.err and "ModelProto" not in p.err, p.err[-300:])
    if suite.wanted("input_tokenizer_json_bom"):
        d = os.path.join(tk, "bom")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(model, "tokenizer.json"), "rb") as f:
            plain = f.read()
        with open(os.path.join(d, "tokenizer.json"), "wb") as f:
            f.write(b"\xef\xbb\xbf" + plain)
        text = b"the license, its terms\nand conditions\n"
        a = jm("tokenizer", "encode", "--model", os.path.join(model, "tokenizer.json"), stdin=text)
        b = jm("tokenizer", "encode", "--model", d, stdin=text)
        suite.check("input_tokenizer_json_bom", a.returncode == 0 and b.returncode == 0 and a.out == b.out and
                    len(a.out.split()) > 5, f"exit {a.returncode}/{b.returncode}: {a.out!r} vs {b.out!r} {b.err!r}")

    if suite.wanted("input_long_path_keeps_cause"):
        deep = os.path.join(root, *(["d" * 200] * 14))  # ~2,900 bytes
        os.makedirs(deep)
        open(os.path.join(deep, "tokenizer.model"), "wb").close()
        problems = []
        for args, cause in ((["info", os.path.join(deep, "nope")], "No such file or directory"),
                            (enc(deep)[0], "the file is empty (not a SentencePiece model)")):
            p = jm(*args, stdin=b"x\n")
            line = p.err.strip()
            if p.returncode == 0 or "\n" in line or not line.endswith(cause) or os.path.join(root, "d") not in line \
                    or len(line.encode()) > 1100:
                problems.append(f"{args[0]}: exit {p.returncode}, {len(line)} chars: {line[:80]!r}...{line[-120:]!r}")
        suite.check("input_long_path_keeps_cause", not problems, "; ".join(problems))

    if suite.wanted("input_control_chars_escaped_path"):
        bad = os.path.join(root, "red\x1b[31m\nline\x07")
        problems = []
        for args in (["info", bad], enc(bad)[0], ["generate", bad, "--tokens", "1"]):
            p = jm(*args, stdin=b"x\n")
            if p.returncode == 0 or p.err.count("\n") != 1 or "\x1b" in p.err or "\x07" in p.err or \
                    "red\\x1b[31m\\x0aline\\x07" not in p.err:
                problems.append(f"{args[0]}: exit {p.returncode} {p.err!r}")
        suite.check("input_control_chars_escaped_path", not problems, "; ".join(problems))
    if suite.wanted("input_control_chars_escaped_arguments"):
        problems = []
        for args, want in ((["generate", model, "--tokens", "1", "--top-k", "1\x1b[2J"], "got '1\\x1b[2J'"),
                           (["generate", model, "--bogus\x1b[2J"], "unknown flag --bogus\\x1b[2J"),
                           (["run\x1b]0;title\x07"], "unknown command 'run\\x1b]0;title\\x07'"),
                           (["tokenizer", "\x1bx"], "unknown subcommand '\\x1bx'")):
            p = jm(*args)
            if p.returncode != 2 or "\x1b" in p.err or want not in p.err:
                problems.append(f"{args}: exit {p.returncode} {p.err!r}")
        suite.check("input_control_chars_escaped_arguments", not problems, "; ".join(problems))

    def extra_tensor(d):
        p = os.path.join(d, "model.safetensors")
        h, data = read_st(p)
        h["evil\u001b[2J\u0007name"] = {"dtype": "U8", "shape": [1], "data_offsets": [len(data), len(data) + 1]}
        write_st(p, h, data + b"\0")

    d = variant("evil_name", extra_tensor)
    refused("input_control_chars_escaped_tensor_name", d, [info(d), gen(d)],
            ["unexpected tensor evil\\x1b[2J\\x07name"])
