#!/usr/bin/python3
"""jetmoe.c test driver: C unit tests, golden tests against the independent
PyTorch reference (tests/ref/jetmoe_ref.py), and bad-input tests of the CLI.

Every check prints `PASS name` or `FAIL name: why`; the last line is
`N passed, N failed`. Exit status is non-zero when anything failed.
Usage: run_tests.py [--build build|build-asan] [--only SUBSTRING]
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import align_ref_tests  # noqa: E402  (tests/align_ref_tests.py)
import check_layout  # noqa: E402  (tests/check_layout.py)
import chat_repl_tests  # noqa: E402  (tests/chat_repl_tests.py)
import checkpoint_paths  # noqa: E402  (tests/checkpoint_paths.py)
import hf_names_tests  # noqa: E402  (tests/hf_names_tests.py)
import cli_tests  # noqa: E402  (tests/cli_tests.py)
import distill_tests  # noqa: E402  (tests/distill_tests.py)
import serve_tests  # noqa: E402  (tests/serve_tests.py)
import serve_clients_tests  # noqa: E402  (tests/serve_clients_tests.py: the openai npm client, load, hostile input)
import browser_tests  # noqa: E402  (tests/browser_tests.py: the web page in headless Chromium)
import input_checks_tests  # noqa: E402  (tests/input_checks_tests.py)
import jinja_diff_tests  # noqa: E402  (tests/jinja_diff_tests.py: chat templates against @huggingface/jinja)
import tokenizer_exact  # noqa: E402  (tests/tokenizer_exact.py)
import train_tests  # noqa: E402  (tests/train_tests.py)
import output_safety_tests  # noqa: E402  (tests/output_safety_tests.py; after train_tests, see its imports)
import recipe_checks_tests  # noqa: E402  (tests/recipe_checks_tests.py; after train_tests: both import this file)
import prepare_tests  # noqa: E402  (tests/prepare_tests.py; after recipe_checks_tests, whose helpers it uses)
import tune_tests  # noqa: E402  (tests/tune_tests.py; after train_tests, as output_safety_tests)
import mpi_tests  # noqa: E402  (tests/mpi_tests.py; after train_tests, as output_safety_tests)
import eval_tests  # noqa: E402  (tests/eval_tests.py; after train_tests, whose write_shard it uses)
from testlib import Suite, sanitizer_report  # noqa: E402  (tests/testlib.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, "tests", "ref", "jetmoe_ref.py")
PY = "/usr/bin/python3"


def read_safetensors(path):
    """A minimal reader for the dumps (the C side's reader is what is under test)."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    base = 8 + n
    dtypes = {"F32": np.float32, "I32": np.int32, "F16": np.float16, "I64": np.int64}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        out[name] = np.frombuffer(buf[base + b:base + e], dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out


def run(cmd, timeout=600, env=None):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                       errors="replace")
    return p, time.time() - t0


# ---------------------------------------------------------------- C unit tests

def c_programs(suite, build):
    d = os.path.join(ROOT, build, "tests")
    if not os.path.isdir(d):
        suite.check("c_tests_built", False, f"{d} missing: run make first")
        return
    for prog in sorted(os.listdir(d)):
        path = os.path.join(d, prog)
        if not prog.startswith(("test_", "fuzz_")) or not os.access(path, os.X_OK) or not suite.wanted(prog):
            continue  # tool_* programs are helpers of the Python-driven tests
        p, secs = run([path], timeout=900)
        lines = suite.relay(p.stdout)
        bad = p.returncode != 0 or not lines or sanitizer_report(p.stderr)
        fails = sum(l.startswith("FAIL ") for l in lines)
        if bad and not fails:
            suite.check(f"{prog}_exit", False,
                        f"exit {p.returncode}, {len(lines)} checks; stderr: {p.stderr.strip()[-800:]}")
        print(f"# {prog}: {len(lines)} checks in {secs:.1f}s", flush=True)


# ---------------------------------------------------------------- golden tests

# Configs cover: tiny; odd sizes (hidden 72, head 12); top-1; top-k == E;
# several layers; untied embeddings; a BF16 and a sharded checkpoint.
GOLDEN_CONFIGS = {
    "tiny": dict(cfg=dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                          kv_channels=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
                 dtype="F32", shards=1),
    "odd_h72_d12_top1_untied": dict(cfg=dict(vocab_size=97, hidden_size=72, num_hidden_layers=3,
                                             num_key_value_heads=3, kv_channels=12, intermediate_size=40,
                                             num_local_experts=5, num_experts_per_tok=1,
                                             tie_word_embeddings=False, rope_theta=500.0),
                                    dtype="F32", shards=1),
    "topk_eq_E_bf16_sharded": dict(cfg=dict(vocab_size=128, hidden_size=48, num_hidden_layers=2,
                                            num_key_value_heads=2, kv_channels=16, intermediate_size=36,
                                            num_local_experts=3, num_experts_per_tok=3),
                                   dtype="BF16", shards=3),
    "deep6_e8_top2": dict(cfg=dict(vocab_size=256, hidden_size=64, num_hidden_layers=6, num_key_value_heads=4,
                                   kv_channels=16, intermediate_size=88, num_local_experts=8,
                                   num_experts_per_tok=2, tie_word_embeddings=False),
                          dtype="F16", shards=2),
}
GOLDEN_LENGTHS = [1, 7, 128]


def reference_model(name, ck):
    """The reference's checkpoint of GOLDEN_CONFIGS[name] (its dtype and shard count) in ck, seed 7:
    the finished process (returncode 0 when ck holds it)."""
    spec = GOLDEN_CONFIGS[name]
    return run([PY, REF, "make", "--out", ck, "--config", json.dumps(spec["cfg"]), "--seed", "7",
                "--dtype", spec["dtype"], "--shards", str(spec["shards"])])[0]


def golden(suite, build, tmp):
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    rng = np.random.default_rng(1234)
    for name, spec in GOLDEN_CONFIGS.items():
        if not suite.wanted("golden_" + name):
            continue
        ck = os.path.join(tmp, "golden_" + name)
        p = reference_model(name, ck)
        if p.returncode != 0:
            suite.check(f"golden_{name}_make", False, p.stderr.strip()[-800:])
            continue
        V = spec["cfg"]["vocab_size"]
        for T in GOLDEN_LENGTHS:
            test = f"golden_{name}_T{T}"
            ids = ",".join(str(int(x)) for x in rng.integers(0, V, size=T))
            ref_dump, c_dump = os.path.join(tmp, test + ".ref.st"), os.path.join(tmp, test + ".c.st")
            p, _ = run([PY, REF, "forward", ck, "--tokens", ids, "--dump", ref_dump, "--float64"])
            if p.returncode != 0:
                suite.check(test, False, "reference failed: " + p.stderr.strip()[-800:])
                continue
            p, _ = run([jetmoe, "forward", ck, "--tokens", ids, "--dump", c_dump])
            if p.returncode != 0 or sanitizer_report(p.stderr):
                suite.check(test, False, f"jetmoe forward exit {p.returncode}: {p.stderr.strip()[-800:]}")
                continue
            ref, got = read_safetensors(ref_dump), read_safetensors(c_dump)
            problems, stats = compare_dumps(ref, got, spec["cfg"].get("num_hidden_layers", 24))
            suite.check(test, not problems, "; ".join(problems), stats)


def compare_dumps(ref, got, layers):
    problems = []
    lr, lg = ref["logits"].astype(np.float64), got["logits"].astype(np.float64)
    if lr.shape != lg.shape:
        return [f"logits shape {lg.shape} != {lr.shape}"], ""
    err = np.abs(lr - lg).max()
    scale = np.abs(lr).max()
    stats = [f"logits err/max {err / scale:.1e}"]
    if not err <= 1e-4 * scale:
        problems.append(f"logits max abs err {err:.3g} > 1e-4 * {scale:.3g}")
    for key in ("loss", "aux_loss", "z_loss"):
        r, g = float(ref[key][0]), float(got[key][0])
        rel = abs(r - g) / max(abs(r), 1e-30)
        stats.append(f"{key} rel {rel:.1e}")
        if not rel <= 1e-5 and not (r == 0 and g == 0):
            problems.append(f"{key} {g!r} vs reference {r!r} (rel {rel:.2g})")
    for l in range(layers):
        for b in ("moa", "moe"):
            key = f"routing.layers.{l}.{b}"
            if not np.array_equal(ref[key], got[key]):
                n = int((ref[key] != got[key]).any(axis=1).sum())
                problems.append(f"{key}: {n} tokens routed differently")
    return problems, ", ".join(stats)


# ---------------------------------------------------------------- gradients and training

GRAD_CONFIGS = ["tiny", "odd_h72_d12_top1_untied", "topk_eq_E_bf16_sharded", "deep6_e8_top2"]


def gradients(suite, build, tmp):
    """Every parameter's gradient of loss + aux + z losses vs the reference
    (float64), norm-wise relative error <= 1e-4."""
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    rng = np.random.default_rng(99)
    for name in GRAD_CONFIGS:
        test = f"grad_{name}"
        if not suite.wanted(test):
            continue
        spec = GOLDEN_CONFIGS[name]
        ck = os.path.join(tmp, "grad_" + name)
        p, _ = run([PY, REF, "make", "--out", ck, "--config", json.dumps(spec["cfg"]), "--seed", "11",
                    "--dtype", spec["dtype"], "--shards", str(spec["shards"])])
        if p.returncode != 0:
            suite.check(test, False, "reference make failed: " + p.stderr.strip()[-500:])
            continue
        ids = ",".join(str(int(x)) for x in rng.integers(0, spec["cfg"]["vocab_size"], size=96))
        ref_dump, c_dump = os.path.join(tmp, test + ".ref.st"), os.path.join(tmp, test + ".c.st")
        p, _ = run([PY, REF, "forward", ck, "--tokens", ids, "--dump", ref_dump, "--float64", "--backward"])
        if p.returncode != 0:
            suite.check(test, False, "reference failed: " + p.stderr.strip()[-500:])
            continue
        p, _ = run([jetmoe, "forward", ck, "--tokens", ids, "--dump", c_dump, "--backward"])
        if p.returncode != 0 or sanitizer_report(p.stderr):
            suite.check(test, False, f"jetmoe forward --backward exit {p.returncode}: {p.stderr.strip()[-500:]}")
            continue
        ref, got = read_safetensors(ref_dump), read_safetensors(c_dump)
        grads = [k for k in ref if k.startswith("grad.")]
        worst, worst_name, problems = 0.0, "", []
        for k in grads:
            if k not in got:
                problems.append(f"{k} missing")
                continue
            a, b = ref[k].astype(np.float64), got[k].astype(np.float64)
            rel = np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)
            if not np.linalg.norm(a) > 0:
                problems.append(f"{k}: reference gradient is zero (test would not see a bug)")
            if rel > worst:
                worst, worst_name = rel, k
        if worst > 1e-4:
            problems.append(f"{worst_name}: relative error {worst:.2e} > 1e-4")
        suite.check(test, not problems and len(grads) > 0, "; ".join(problems[:5]),
                    f"{len(grads)} gradients, worst {worst:.1e} ({worst_name})")


def training_steps(suite, build, tmp):
    """10 AdamW steps with warmup + WSD decay + clipping, from the same init and
    batches: per-step losses and final weights within 1e-4 of the reference."""
    test = "train_10_adamw_steps_vs_reference"
    if not suite.wanted(test):
        return
    tool = os.path.join(ROOT, build, "tests", "tool_train_steps")
    spec = GOLDEN_CONFIGS["odd_h72_d12_top1_untied"]
    ck = os.path.join(tmp, "train_ref")
    cfg = dict(spec["cfg"], num_experts_per_tok=2)
    p, _ = run([PY, REF, "make", "--out", ck, "--config", json.dumps(cfg), "--seed", "5", "--no-perturb"])
    if p.returncode != 0:
        suite.check(test, False, "reference make failed: " + p.stderr.strip()[-500:])
        return
    # learnable batches (arithmetic runs with a few strides), so the loss can fall in 10 steps
    rng = np.random.default_rng(5)
    start = rng.integers(0, cfg["vocab_size"], size=(10, 2, 2, 1))
    stride = rng.integers(1, 4, size=(10, 2, 2, 1))
    toks = (start + stride * np.arange(24)) % cfg["vocab_size"]
    batches = os.path.join(tmp, "train_batches.st")
    write_st(batches, {"tokens": toks.astype(np.int32)})
    hp = dict(lr=5e-3, warmup=3, decay=4, min_ratio=0.1, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.1, clip=0.5)
    ref_dump, c_dump = os.path.join(tmp, "train.ref.st"), os.path.join(tmp, "train.c.st")
    p, _ = run([PY, REF, "train", ck, "--batches", batches, "--dump", ref_dump, "--schedule", "wsd"] +
               [a for k, v in hp.items() for a in ("--" + k, str(v))])
    if p.returncode != 0:
        suite.check(test, False, "reference train failed: " + p.stderr.strip()[-500:])
        return
    p, _ = run([tool, ck, batches, c_dump] + [str(hp[k]) for k in
               ("lr", "warmup", "decay", "min_ratio", "beta1", "beta2", "eps", "wd", "clip")] + ["wsd"])
    if p.returncode != 0 or sanitizer_report(p.stderr):
        suite.check(test, False, f"tool_train_steps exit {p.returncode}: {p.stderr.strip()[-500:]}")
        return
    ref, got = read_safetensors(ref_dump), read_safetensors(c_dump)
    loss_err = float(np.abs(ref["steps"][:, 0] - got["steps"][:, 0]).max())
    lr_err = float(np.abs(ref["steps"][:, 4] - got["steps"][:, 4]).max())
    w_err = max(float(np.abs(ref[k] - got[k]).max()) for k in ref if k != "steps")
    clipped = int((ref["steps"][:, 3] > hp["clip"]).sum())
    fell = float(ref["steps"][0, 0] - ref["steps"][-1, 0])
    problems = []
    if loss_err > 1e-4:
        problems.append(f"loss differs by {loss_err:.2e}")
    if lr_err > 1e-9:
        problems.append(f"schedule differs by {lr_err:.2e}")
    if w_err > 1e-4:
        problems.append(f"weights differ by {w_err:.2e}")
    if clipped == 0 or fell <= 0:
        problems.append(f"test too weak: {clipped} steps clipped, loss fell {fell:.3f}")
    suite.check(test, not problems, "; ".join(problems),
                f"loss err {loss_err:.1e}, weight err {w_err:.1e}, {clipped} clipped steps, loss "
                f"{ref['steps'][0, 0]:.3f} -> {ref['steps'][-1, 0]:.3f}")


def write_st(path, tensors):
    header, off, blobs = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dt = {np.dtype(np.int32): "I32", np.dtype(np.float32): "F32"}[a.dtype]
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        blobs.append(a.tobytes())
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


# ---------------------------------------------------------------- generation

def generation(suite, build, tmp):
    """Greedy generation with the KV cache == the reference's greedy decode
    without a cache, 64 tokens, on two configs."""
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    for name in ("odd_h72_d12_top1_untied", "deep6_e8_top2"):
        test = f"generate_greedy_{name}"
        if not suite.wanted(test):
            continue
        spec = GOLDEN_CONFIGS[name]
        cfg = dict(spec["cfg"], eos_token_id=spec["cfg"]["vocab_size"] - 1)  # rarely hit: the test runs long
        ck = os.path.join(tmp, "gen_" + name)
        p, _ = run([PY, REF, "make", "--out", ck, "--config", json.dumps(cfg), "--seed", "21"])
        if p.returncode != 0:
            suite.check(test, False, "reference make failed: " + p.stderr.strip()[-300:])
            continue
        prompt = "1,7,3,11,5"
        p, _ = run([PY, REF, "generate", ck, "--tokens", prompt, "--max-new", "64", "--float64"])
        q, _ = run([jetmoe, "generate", ck, "--tokens", prompt, "--greedy", "--ids", "--max-new", "64"])
        ref_ids, c_ids = p.stdout.split(), q.stdout.split()
        ok = p.returncode == 0 and q.returncode == 0 and not sanitizer_report(q.stderr) and ref_ids == c_ids
        suite.check(test, ok and len(ref_ids) >= 16, f"exit {p.returncode}/{q.returncode}; ref {ref_ids[:20]} "
                    f"c {c_ids[:20]}; {q.stderr.strip()[-200:]}", f"{len(c_ids)} tokens identical")


# ---------------------------------------------------------------- quantized checkpoints

def read_raw_st(path):
    """name -> (dtype, shape, raw bytes, metadata) of any safetensors file."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    meta = header.pop("__metadata__", {})
    return {k: (t["dtype"], t["shape"], buf[8 + n + t["data_offsets"][0]:8 + n + t["data_offsets"][1]])
            for k, t in header.items()}, meta


def bf16_copy(src, dst):
    """src's checkpoint with every F32 tensor rounded to BF16 (to nearest even, the reference's
    f32_to_bf16_bits), as a BF16 Hugging Face checkpoint holds it; the other files copied."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "ref"))
    import jetmoe_ref  # noqa: E402  (imports torch: only here, where it is needed)
    os.makedirs(dst)
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), dst)
            continue
        tensors, meta = read_raw_st(os.path.join(src, name))
        header, off, blobs = {"__metadata__": meta} if meta else {}, 0, []
        for k, (dt, shape, raw) in tensors.items():
            if dt == "F32":
                raw = jetmoe_ref.f32_to_bf16_bits(np.frombuffer(raw, dtype=np.float32)).tobytes()
                dt = "BF16"
            header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
            off += len(raw)
            blobs.append(raw)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(dst, name), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def dequantize_numpy(dtype, shape, raw, scale_raw):
    """The documented block formats, decoded independently of the C reader:
    Q8 = int8 values, Q4 = two nibbles per byte (byte j of a 32-block holds
    element j low and j+16 high, value = nibble - 8); one F16 scale per 32."""
    scales = np.frombuffer(scale_raw, dtype=np.float16).astype(np.float32).reshape(-1)
    if dtype == "I8":
        q = np.frombuffer(raw, dtype=np.int8).astype(np.float32).reshape(-1, 32)
    else:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 16)
        q = np.concatenate([(b & 15).astype(np.float32) - 8, (b >> 4).astype(np.float32) - 8], axis=1)
    w = q * scales[:, None]
    return w.reshape(shape[:-1] + [shape[-1] * (2 if dtype == "U8" else 1)])


def quantized(suite, build, tmp):
    """jetmoe quantize: the files decode (in numpy, from the documented layout)
    to weights within the format's error bound, and the C forward on them
    equals the PyTorch reference run on those decoded weights."""
    if not suite.wanted("quant"):
        return
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    cfg = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
               intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    ck = os.path.join(tmp, "quant_f32")
    p, _ = run([PY, REF, "make", "--out", ck, "--config", json.dumps(cfg), "--seed", "5", "--dtype", "BF16"])
    if p.returncode != 0:
        suite.check("quant_setup", False, p.stderr.strip()[-500:])
        return
    orig, _ = read_raw_st(os.path.join(ck, "model.safetensors"))
    ids = "3,17,90,4,4,61,29,0,77,12"
    for bits in ("q8", "q4"):
        out = os.path.join(tmp, "quant_" + bits)
        p, _ = run([jetmoe, "quantize", ck, "--to", bits, "--out", out])
        if p.returncode != 0 or sanitizer_report(p.stderr):
            suite.check(f"quant_{bits}_write", False, f"exit {p.returncode}: {p.stderr.strip()[-300:]}")
            continue
        got, meta = read_raw_st(os.path.join(out, "model.safetensors"))
        decoded, worst, kinds = {}, 0.0, set()
        for name, (dt, shape, raw) in orig.items():
            w0 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            w0 = w0.view(np.float32).reshape(shape)
            qdt, qshape, qraw = got[name]
            kinds.add(qdt)
            if qdt in ("I8", "U8"):
                sdt, sshape, sraw = got[name + "_scale"]
                w = dequantize_numpy(qdt, qshape, qraw, sraw)
                step = np.repeat(np.abs(np.frombuffer(sraw, dtype=np.float16).astype(np.float32)), 32).reshape(shape)
                bound = step * (0.5 if qdt == "I8" else 1.0) * 1.0001
                worst = max(worst, float(np.max(np.abs(w - w0) / np.maximum(bound, 1e-30))))
            else:
                w = w0
            decoded[name] = w
        want = "I8" if bits == "q8" else "U8"
        suite.check(f"quant_{bits}_file_format", want in kinds and meta.get("jetmoe.quant") == bits and worst <= 1.0,
                    f"dtypes {sorted(kinds)}, metadata {meta}, worst error {worst:.3f} of the bound",
                    f"decoded in numpy: worst error {worst:.3f} of the format's bound")
        # the reference on the numpy-decoded weights vs the C forward on the quantized files
        dec = os.path.join(tmp, "quant_dec_" + bits)
        os.makedirs(dec, exist_ok=True)
        shutil.copy(os.path.join(ck, "config.json"), dec)
        write_st(os.path.join(dec, "model.safetensors"), {k: v.astype(np.float32) for k, v in decoded.items()})
        rdump, cdump = os.path.join(tmp, f"quant_{bits}.ref.st"), os.path.join(tmp, f"quant_{bits}.c.st")
        p, _ = run([PY, REF, "forward", dec, "--tokens", ids, "--dump", rdump, "--float64"])
        q, _ = run([jetmoe, "forward", out, "--tokens", ids, "--dump", cdump])
        if p.returncode != 0 or q.returncode != 0:
            suite.check(f"quant_{bits}_forward_vs_reference", False,
                        f"exit {p.returncode}/{q.returncode}: {p.stderr[-200:]} {q.stderr[-200:]}")
            continue
        problems, stats = compare_dumps(read_safetensors(rdump), read_safetensors(cdump), 2)
        suite.check(f"quant_{bits}_forward_vs_reference", not problems, "; ".join(problems), stats)
        # generate on the file in place: runs, and is deterministic
        g = [run([jetmoe, "generate", out, "--tokens", ids, "--greedy", "--ids", "--max-new", "16"])[0]
             for _ in range(2)]
        suite.check(f"quant_{bits}_generate", all(x.returncode == 0 and not sanitizer_report(x.stderr) for x in g)
                    and g[0].stdout == g[1].stdout and len(g[0].stdout.split()) == 16,
                    f"exit {g[0].returncode}: {g[0].stderr[-300:]}; {g[0].stdout!r} vs {g[1].stdout!r}")

    # malformed quantized checkpoints: clear errors from every command that loads them
    q8 = os.path.join(tmp, "quant_q8")
    if not os.path.exists(os.path.join(q8, "model.safetensors")):
        return
    tensors, meta = read_raw_st(os.path.join(q8, "model.safetensors"))
    lst = [(k, v[0], v[1], v[2]) for k, v in tensors.items()]
    W = "model.layers.0.mlp.input_linear.weight"

    def edit(fn):
        return [t for t in (fn(*x) for x in lst) if t is not None]
    inf_scale = np.full(tensors[W + "_scale"][1], np.inf, dtype=np.float16).tobytes()
    cases = [
        ("scale_missing", edit(lambda k, d, s, r: None if k == W + "_scale" else (k, d, s, r)), "_scale are missing"),
        ("scale_not_f16", edit(lambda k, d, s, r: (k, "BF16", s, r) if k == W + "_scale" else (k, d, s, r)),
         "expected F16"),
        ("scale_wrong_shape", edit(lambda k, d, s, r: (k, d, [s[0], s[1] * 2, s[2] // 2], r)
                                   if k == W + "_scale" else (k, d, s, r)), "has shape"),
        ("scale_infinite", edit(lambda k, d, s, r: (k, d, s, inf_scale) if k == W + "_scale" else (k, d, s, r)),
         "non-finite scale"),
        ("q4_wrong_width", edit(lambda k, d, s, r: (k, "U8", s, r) if k == W else (k, d, s, r)), "has shape"),
        ("q4_dtype_in_q8_file", edit(lambda k, d, s, r: (k, "U8", s, r) if k == W else (k, d, s, r)),
         f'tensor {W} is U8, but metadata jetmoe.quant is "q8"'),
        ("quantized_norm", edit(lambda k, d, s, r: (k, "I8", s, r[:int(np.prod(s))])
                                if k == "model.norm.weight" else (k, d, s, r)), "only matrices"),
        ("stray_scale", lst + [("model.norm.weight_scale", "F16", [2], b"\0" * 4)], "unexpected tensor"),
    ]
    for case, ts, expect in cases:
        d = os.path.join(tmp, "quant_bad_" + case)
        os.makedirs(d, exist_ok=True)
        shutil.copy(os.path.join(q8, "config.json"), d)
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            # without jetmoe quantize's metadata the dtypes alone say what is stored (the shape check is reached)
            f.write(st_bytes(ts, meta={k: v for k, v in meta.items() if not k.startswith("jetmoe.")}
                             if case == "q4_wrong_width" else meta))
        bad = []
        for args in (["info", d], ["forward", d, "--tokens", "1,2"], ["generate", d, "--tokens", "1", "--ids"]):
            p, _ = run([jetmoe] + args)
            err = p.stderr.strip()
            if not (p.returncode > 0 and not sanitizer_report(err) and expect in err and len(err.splitlines()) == 1):
                bad.append(f"{args[0]}: exit {p.returncode}: {err[-300:]!r}")
        suite.check(f"bad_input_quant_{case}", not bad, "; ".join(bad))


# ---------------------------------------------------------------- training runs: resume, signals, crashes

def pretrain_fixture(suite, build, tmp, name):
    """A tokenizer (vocab 400) and two token sources under tmp/name, and the recipe of a tiny 20-step run
    over them (two phases, 12 + 8 steps): (jetmoe, that directory, recipe), or None with a failed check
    name_setup if a step fails."""
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    d = os.path.join(tmp, name)
    os.makedirs(os.path.join(d, "text", "prose"))
    os.makedirs(os.path.join(d, "text", "code"))
    lic = "/usr/share/common-licenses"
    prose = "".join(open(os.path.join(lic, f), errors="replace").read() for f in sorted(os.listdir(lic))
                    if os.path.isfile(os.path.join(lic, f)))[:300000]
    with open(os.path.join(d, "text", "prose", "licenses.txt"), "w") as f:
        f.write(prose)
    with open(os.path.join(d, "text", "code", "code.py"), "w") as f:
        f.write(open(os.path.abspath(__file__)).read() + open(REF).read())
    steps = [([jetmoe, "tokenizer", "train", "--input", os.path.join(d, "text", "prose", "licenses.txt") + "," +
               os.path.join(d, "text", "code", "code.py"), "--vocab-size", "400", "--out", os.path.join(d, "tok")]),
             ([jetmoe, "prepare", "--tokenizer", os.path.join(d, "tok"), "--input", os.path.join(d, "text", "prose"),
               "--out", os.path.join(d, "shards", "prose")]),
             ([jetmoe, "prepare", "--tokenizer", os.path.join(d, "tok"), "--input", os.path.join(d, "text", "code"),
               "--out", os.path.join(d, "shards", "code")])]
    for cmd in steps:
        p, _ = run(cmd)
        if p.returncode != 0:
            suite.check(f"{name}_setup", False, f"{' '.join(cmd[1:3])}: {p.stderr.strip()[-500:]}")
            return None
    recipe = {
        "model": dict(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                      intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64),
        "tokenizer": os.path.join(d, "tok"),
        "sources": {"prose": os.path.join(d, "shards", "prose"), "code": os.path.join(d, "shards", "code")},
        "heldout": os.path.join(d, "shards", "code"),
        "phases": [{"name": "p1", "steps": 12, "mixture": {"prose": 0.7, "code": 0.3}},
                   {"name": "p2", "steps": 8, "mixture": {"prose": 0.2, "code": 0.8}}],
        "seq_len": 32, "batch_size": 4, "grad_accum": 2, "optimizer": {"lr": 3e-3},
        "schedule": {"type": "wsd", "warmup_steps": 3}, "seed": 3, "checkpoint_every": 5, "log_every": 1,
        "eval_tokens": 2048}
    return jetmoe, d, recipe


def training_runs(suite, build, tmp):
    """End to end through the CLI: tokenizer train -> prepare -> pretrain.
    20 steps straight == 10 steps, stop, resume 10 (losses and weights bit-identical);
    SIGINT saves and resumes exactly; SIGKILL (also mid-checkpoint) leaves a loadable checkpoint."""
    if not suite.wanted("pretrain"):
        return
    fixture = pretrain_fixture(suite, build, tmp, "pretrain")
    if fixture is None:
        return
    jetmoe, d, recipe = fixture
    rpath = os.path.join(d, "recipe.json")
    with open(rpath, "w") as f:
        json.dump(recipe, f)

    def pretrain(out, *extra):
        return run([jetmoe, "pretrain", "--recipe", rpath, "--out", out] + list(extra))[0]

    def losses(out):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(l)["loss"] for l in f if '"loss"' in l]

    def weights(out, step):
        with open(os.path.join(out, "checkpoints", f"step_{step}", "model.safetensors"), "rb") as f:
            return f.read()

    a, b = os.path.join(d, "run_a"), os.path.join(d, "run_b")
    p = pretrain(a)
    if p.returncode != 0:
        suite.check("pretrain_run", False, p.stderr.strip()[-500:])
        return
    la = losses(a)
    suite.check("pretrain_run", len(la) == 20 and la[-1] < la[0] and "perplexity" in p.stderr and
                os.path.exists(os.path.join(a, "loss.svg")), f"losses {la}; {p.stderr[-300:]}",
                f"loss {la[0]:.3f} -> {la[-1]:.3f}")
    p1, p2 = pretrain(b, "--stop-after", "10"), pretrain(b, "--resume")
    lb = losses(b)
    same_w = p1.returncode == 0 and p2.returncode == 0 and weights(a, 20) == weights(b, 20)
    suite.check("pretrain_resume_bit_exact", same_w and la == lb,
                f"exit {p1.returncode}/{p2.returncode}; losses equal {la == lb}; weights equal {same_w}; "
                f"{p2.stderr.strip()[-300:]}", "20 steps == 10 + resume 10: losses and weights identical")
    # stopping exactly at the phase boundary (phase 1 is 12 steps): the new mixture starts afresh
    e = os.path.join(d, "run_e")
    p1, p2 = pretrain(e, "--stop-after", "12"), pretrain(e, "--resume")
    suite.check("pretrain_resume_at_phase_boundary", p1.returncode == 0 and p2.returncode == 0 and
                weights(a, 20) == weights(e, 20) and losses(e) == la,
                f"exit {p1.returncode}/{p2.returncode}; {p2.stderr.strip()[-300:]}",
                "12 + resume 8 == 20 steps straight")

    # chat on the trained model: a few turns, /reset, and a turn too long for its 64-token context
    ck = os.path.join(a, "checkpoints", "step_20")
    script = "hello there\nand again\n/reset\n" + "word " * 80 + "\nshort\n/exit\n"
    q = subprocess.run([jetmoe, "chat", ck, "--greedy", "--max-new", "8"], input=script, capture_output=True,
                       text=True, timeout=120)
    suite.check("chat_repl_turns_reset_and_full_context",
                q.returncode == 0 and "(history cleared)" in q.stderr and "does not fit the context" in q.stderr and
                q.stdout.count("\n") >= 2 and not sanitizer_report(q.stderr),
                f"exit {q.returncode}: stdout {q.stdout[-200:]!r} stderr {q.stderr[-300:]!r}")

    # the REPL through a pseudo-terminal, and a conversation longer than the context (tests/chat_repl_tests.py)
    chat_repl_tests.run(suite, jetmoe, ck, d)

    # every way of naming the run's checkpoint, and the wrong ones (tests/checkpoint_paths.py)
    checkpoint_paths.run(suite, jetmoe, a, d)

    # the Hugging Face names: architectures, generation_config.json, special_tokens_map.json
    # (tests/hf_names_tests.py)
    hf_names_tests.run(suite, jetmoe, a, os.path.join(d, "tok"), d)

    # the trained model as BF16 and quantized: held-out perplexity, batched and through the decode path
    # (there with an fp32 and a bf16 KV cache)
    ppl, problems = {}, []
    for bits in ("f32", "bf16", "q8", "q4"):
        qd = ck if bits == "f32" else os.path.join(d, "ck_" + bits)
        if bits == "bf16":
            bf16_copy(ck, qd)
        elif bits != "f32":
            p, _ = run([jetmoe, "quantize", ck, "--to", bits, "--out", qd])
            if p.returncode != 0:
                problems.append(f"quantize {bits}: {p.stderr.strip()[-200:]}")
                continue
        for path in ("batched", "decode", "decode_kv_bf16"):
            extra = {"batched": [], "decode": ["--decode"], "decode_kv_bf16": ["--decode", "--kv-cache", "bf16"]}
            p, _ = run([jetmoe, "eval", qd, "--data", os.path.join(d, "shards", "code"), "--seq-len", "32",
                        "--max-tokens", "4096"] + extra[path])
            if p.returncode != 0 or sanitizer_report(p.stderr):
                problems.append(f"eval {bits} {path}: {p.stderr.strip()[-200:]}")
            else:
                ppl[bits, path] = json.loads(p.stdout)["perplexity"]
    rel = {(b, path): ppl[b, path] / ppl["f32", path] - 1 for b, path in ppl
           if b != "f32" and path != "decode_kv_bf16" and ("f32", path) in ppl}
    # BF16 decodes with its activations rounded to bf16 too (round_act_bf16): held to q8's bound
    ok = not problems and len(rel) == 6 and all(abs(r) <= (0.05 if b == "q4" else 0.005) for (b, _), r in rel.items())
    suite.check("quantized_perplexity_trained_model", ok, f"{problems} {ppl}",
                "fp32 ppl %.3f; bf16 %+.3f%%/%+.3f%%, q8 %+.3f%%/%+.3f%%, q4 %+.3f%%/%+.3f%% (batched/decode)" % (
                    ppl.get(("f32", "batched"), 0), *[100 * rel.get(k, 0) for k in (
                        ("bf16", "batched"), ("bf16", "decode"), ("q8", "batched"), ("q8", "decode"),
                        ("q4", "batched"), ("q4", "decode"))]))
    # a bf16 KV cache against an fp32 one, for each weight type: within 0.5% of the perplexity
    kv = {b: ppl[b, "decode_kv_bf16"] / ppl[b, "decode"] - 1 for b in ("f32", "bf16", "q8", "q4")
          if (b, "decode") in ppl and (b, "decode_kv_bf16") in ppl}
    suite.check("kv_bf16_perplexity_trained_model", not problems and len(kv) == 4 and
                all(abs(r) <= 0.005 for r in kv.values()), f"{problems} {ppl}",
                "decode with a bf16 KV cache: f32 %+.3f%%, bf16 %+.3f%%, q8 %+.3f%%, q4 %+.3f%% of the fp32-cache "
                "perplexity" % tuple(100 * kv.get(b, 0) for b in ("f32", "bf16", "q8", "q4")))

    # generate's inputs: clear errors, or defined behaviour, never a crash (the suite runs under ASan too)
    gen = [jetmoe, "generate", ck, "--greedy"]
    bad_args = [
        (["--prompt", "word " * 200], "does not fit the context"),
        (["--tokens", ""], "--tokens"),
        (["--prompt", "hi", "--temperature", "100.5"], "--temperature"),  # 0 is valid: greedy
        (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
        (["--prompt", "hi", "--temperature", "nan"], "--temperature"),
        (["--prompt", "hi", "--temperature", "inf"], "--temperature"),
        (["--prompt", "hi", "--top-p", "0"], "--top-p"),
        (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
        (["--prompt", "hi", "--top-k", "-1"], "--top-k"),
        (["--prompt", "hi", "--max-new", "0"], "--max-new"),
        (["--prompt", "hi", "--seed", "x"], "--seed"),
        (["--prompt", "hi", "--stop", ""], "--stop"),
        (["--prompt", "hi"] + ["--stop", "x"] * 17, "too many times"),
        (["--prompt", "hi", "--kernels", "avx1024"], "kernels"),
        (["--prompt", "hi", "--threads", "-2"], "--threads"),
        (["--prompt", "hi", "--tokens", "1"], "usage"),
    ]
    problems = []
    for args, expect in bad_args:
        p, _ = run([jetmoe, "generate", ck] + args)
        err = p.stderr.strip()
        if not (p.returncode > 0 and expect in err and len(err.splitlines()) == 1 and not sanitizer_report(err)):
            problems.append(f"{args[-2:]}: exit {p.returncode}: {err[-200:]!r}")
    suite.check("generate_bad_arguments", not problems, "; ".join(problems), f"{len(bad_args)} cases")

    defined = []
    p, _ = run(gen + ["--prompt", "", "--max-new", "5", "--ids"])  # empty text: BOS alone is the prompt
    defined.append(("empty_prompt", p.returncode == 0 and len(p.stdout.split()) >= 1, p))
    q = subprocess.run(gen + ["--prompt", b"caf\xc3 \xff\xfe\x80 ok", "--max-new", "5"], capture_output=True,
                       timeout=120)  # invalid UTF-8 encodes as spm does (U+FFFD / bytes)
    q.stderr = q.stderr.decode(errors="replace")
    defined.append(("invalid_utf8_prompt", q.returncode == 0, q))
    p, _ = run(gen + ["--prompt", "the", "--max-new", "1000", "--ids"])  # runs to the end of the context
    defined.append(("max_new_past_context", p.returncode == 0 and "leave room" in p.stderr and
                    len(p.stdout.split()) <= 63, p))
    # the q8 model, so that the kernel choice matters: same ids with 1 thread and with the portable kernels
    gq = [jetmoe, "generate", os.path.join(d, "ck_q8"), "--greedy", "--prompt", "the", "--max-new", "12", "--ids"]
    p0, _ = run(gq)
    p1, _ = run(gq + ["--threads", "1"])
    p2, _ = run(gq + ["--kernels", "portable"])
    defined.append(("threads_and_kernels", p0.returncode == 0 and p1.stdout == p0.stdout == p2.stdout and
                    len(p0.stdout.split()) == 12, p1))
    bad = [f"{name}: exit {x.returncode}: {x.stdout[-100:]!r} {x.stderr[-200:]!r}" for name, ok, x in defined
           if not ok or sanitizer_report(x.stderr)]
    suite.check("generate_defined_behaviour", not bad, "; ".join(bad),
                "empty prompt, invalid UTF-8, --max-new past the context, --threads 1, --kernels portable")

    # streaming: hot sampling over a byte-fallback vocabulary emits partial UTF-8 characters; the streamed
    # text must be exactly the decode of prompt + generated ids, with and without a stop string held back,
    # and a stop string must cut the continuation right before its first occurrence
    hot = [jetmoe, "generate", ck, "--prompt", "café 日本", "--temperature", "3", "--seed", "5", "--max-new", "48"]
    pi = subprocess.run(hot + ["--ids"], capture_output=True, timeout=120)
    ids = pi.stdout.decode().split()
    enc = subprocess.run([jetmoe, "tokenizer", "encode", "--model", os.path.join(d, "tok")], capture_output=True,
                         input="café 日本\n".encode(), timeout=60)
    prompt_ids = ["1"] + enc.stdout.decode().split()
    dec = subprocess.run([jetmoe, "tokenizer", "decode", "--model", os.path.join(d, "tok")], capture_output=True,
                         input=(" ".join(prompt_ids + ids) + "\n").encode(), timeout=60)
    full = dec.stdout[:-1]  # text of prompt + continuation
    prompt_text = subprocess.run([jetmoe, "tokenizer", "decode", "--model", os.path.join(d, "tok")],
                                 capture_output=True, input=(" ".join(prompt_ids) + "\n").encode(),
                                 timeout=60).stdout[:-1]
    cont = full[len(prompt_text):]
    def line_end(text):  # generate ends its output with a newline when the text does not
        return text if text.endswith(b"\n") else text + b"\n"
    problems = []
    if pi.returncode != 0 or len(ids) < 10 or not cont or all(b < 128 for b in cont):
        problems.append(f"setup: exit {pi.returncode}, {len(ids)} ids, continuation {cont[:60]!r}")
    for extra in ([], ["--stop", "\x01zzq"]):  # a stop that never matches: 3 bytes held back at each step
        q = subprocess.run(hot + extra, capture_output=True, timeout=120)
        if q.returncode != 0 or q.stdout != line_end(full):
            problems.append(f"stream {extra}: exit {q.returncode}: {q.stdout[-80:]!r} vs {full[-80:]!r}")
    # a stop string taken from the continuation itself (2+ bytes, starting past its first bytes)
    stop = None
    for i in range(3, len(cont) - 2):
        try:
            cand = cont[i:i + 3].decode()
        except UnicodeDecodeError:
            continue
        if "\ufffd" not in cand and "\x00" not in cand and not cand.startswith("-"):
            stop = cand
            break
    if stop is None:
        problems.append(f"no stop string to take from {cont[:80]!r}")
    else:
        q = subprocess.run(hot + ["--stop", stop], capture_output=True, timeout=120)
        want = line_end(full[:len(prompt_text) + cont.index(stop.encode())])
        if q.returncode != 0 or q.stdout != want or b"stop string" not in q.stderr:
            problems.append(f"stop {stop!r}: exit {q.returncode}: {q.stdout[-80:]!r} vs {want[-80:]!r}")
    suite.check("generate_streaming_and_stop_string", not problems, "; ".join(problems),
                f"{len(ids)} sampled tokens, non-ASCII continuation; stop {stop!r}")

    # the stream itself on a scripted continuation whose CJK characters arrive as byte-fallback pieces,
    # one byte per token: what it hands out must add up to the exact text, whatever the stop string holds back
    tool = os.path.join(ROOT, build, "tests", "tool_stream")
    def encode(text):
        return subprocess.run([jetmoe, "tokenizer", "encode", "--model", os.path.join(d, "tok")], capture_output=True,
                              input=(text + "\n").encode(), timeout=60).stdout.decode().split()
    def decode(ids):
        return subprocess.run([jetmoe, "tokenizer", "decode", "--model", os.path.join(d, "tok")], capture_output=True,
                              input=(" ".join(ids) + "\n").encode(), timeout=60).stdout[:-1]
    p_ids, c_ids = ["1"] + encode("hi"), encode("x café 日本語 end")
    ptext = decode(p_ids)
    cont = decode(p_ids + c_ids)[len(ptext):]
    problems = []
    if cont.count(b"\xe6") < 1 or len(c_ids) < 10:
        problems.append(f"setup: continuation {cont!r} from {len(c_ids)} ids")
    cases = [(None, cont, False), ("ZZ", cont, False), ("ZZZZZZZ", cont, False), ("日本", cont[:cont.index("日本".encode())], True),
             ("本語 e", cont[:cont.index("本語".encode())], True), (" end", cont[:cont.index(b" end")], True),
             ((" end", "ZZ", "日本"), cont[:cont.index("日本".encode())], True)]  # several: the earliest wins
    for stop, want, stops in cases:
        stop_args = [] if not stop else [stop] if isinstance(stop, str) else list(stop)
        q = subprocess.run([tool, os.path.join(d, "tok"), ",".join(p_ids), ",".join(c_ids)] + stop_args,
                           capture_output=True, timeout=60)
        if q.returncode != 0 or q.stdout != want or ((b"stopped" in q.stderr) != stops) or sanitizer_report(
                q.stderr.decode(errors="replace")):
            problems.append(f"stop {stop!r}: exit {q.returncode}: {q.stdout!r} vs {want!r} {q.stderr[-200:]!r}")
    suite.check("text_stream_holds_back_partial_characters", not problems, "; ".join(problems),
                f"{len(c_ids)} ids, {len(cases)} stop strings")

    # SIGINT: saves where it is, exits 130; resuming finishes with the same weights.
    c = os.path.join(d, "run_c")
    proc = subprocess.Popen([jetmoe, "pretrain", "--recipe", rpath, "--out", c], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    mpath, t_end = os.path.join(c, "metrics.jsonl"), time.time() + 60
    while time.time() < t_end and proc.poll() is None:  # signal once a few steps have run
        if os.path.exists(mpath) and open(mpath).read().count("\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(2)
    _, err = proc.communicate(timeout=120)
    stopped = proc.returncode == 130
    p2 = pretrain(c, "--resume")
    ok = p2.returncode == 0 and weights(a, 20) == weights(c, 20)
    suite.check("pretrain_sigint_saves_and_resumes", stopped and ok,
                f"exit {proc.returncode} then {p2.returncode}; {err.decode(errors='replace')[-300:]}",
                "stopped by SIGINT" if stopped else "finished before the signal")

    # SIGKILL at several moments (checkpoint every step, so most kills land in or near a write):
    # the latest checkpoint always loads and resuming completes.
    recipe_k = dict(recipe, checkpoint_every=1)
    rk = os.path.join(d, "recipe_k.json")
    with open(rk, "w") as f:
        json.dump(recipe_k, f)
    problems = []
    for i, delay in enumerate((0.3, 0.6, 0.9, 1.3, 1.8)):
        k = os.path.join(d, f"run_k{i}")
        proc = subprocess.Popen([jetmoe, "pretrain", "--recipe", rk, "--out", k], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        latest = os.path.join(k, "checkpoints", "latest")
        if not os.path.exists(latest):
            continue  # killed before the first checkpoint: nothing was promised
        step = open(latest).read().strip()
        p, _ = run([jetmoe, "forward", os.path.join(k, "checkpoints", step), "--tokens", "1,2,3"])
        if p.returncode != 0:
            problems.append(f"kill {i}: {step} does not load: {p.stderr.strip()[-200:]}")
            continue
        p, _ = run([jetmoe, "pretrain", "--recipe", rk, "--out", k, "--resume", "--quiet"])
        if p.returncode != 0:
            problems.append(f"kill {i}: resume failed: {p.stderr.strip()[-200:]}")
        elif weights(k, 20) != weights(a, 20):  # checkpointing does not change the math
            problems.append(f"kill {i}: resumed from {step}, final weights differ from the straight run")
    suite.check("pretrain_sigkill_leaves_checkpoint_intact", not problems, "; ".join(problems))


# ---------------------------------------------------------------- bad input

def st_bytes(tensors, header_override=None, meta=None):
    """Builds a safetensors image: tensors is [(name, dtype, shape, raw bytes)]."""
    header, off, data = {}, 0, b""
    if meta is not None:
        header["__metadata__"] = meta
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data += raw
    h = json.dumps(header).encode() if header_override is None else header_override
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def bad_inputs(suite, build, tmp):
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    base = os.path.join(tmp, "bad_base")
    cfg = dict(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_key_value_heads=1, kv_channels=4,
               intermediate_size=6, num_local_experts=2, num_experts_per_tok=1)
    p, _ = run([PY, REF, "make", "--out", base, "--config", json.dumps(cfg), "--seed", "1"])
    if p.returncode != 0:
        suite.check("bad_input_base", False, p.stderr.strip()[-500:])
        return
    with open(os.path.join(base, "model.safetensors"), "rb") as f:
        good = f.read()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    data = good[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    tensors = [(k, header[k]["dtype"], header[k]["shape"],
                data[header[k]["data_offsets"][0]:header[k]["data_offsets"][1]]) for k in names]

    def variant(case, st=None, config=None, files=None):
        d = os.path.join(tmp, "bad_" + case)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "wb") as f:
            f.write(config if config is not None else json.dumps(cfg).encode())
        if st is not None:
            with open(os.path.join(d, "model.safetensors"), "wb") as f:
                f.write(st)
        for fname, content in (files or {}).items():
            with open(os.path.join(d, fname), "wb") as f:
                f.write(content)
        return d

    def with_header(mutate):
        h = json.loads(good[8:8 + n])
        mutate(h)
        return st_bytes([], header_override=json.dumps(h).encode()) + data

    def swap(i, key, value):
        def m(h):
            h[names[i]][key] = value
        return m

    emb = names[0]
    cases = [
        ("truncated_file", good[:len(good) - 5], None, "past end"),
        ("header_len_past_eof", struct.pack("<Q", 1 << 40) + good[8:], None, "past end"),
        ("short_file", good[:5], None, "shorter than"),
        ("empty_file", b"", None, "shorter than"),
        ("overlapping_tensors", with_header(lambda h: h[names[1]].update(
            data_offsets=[h[names[0]]["data_offsets"][0], h[names[0]]["data_offsets"][0] +
                          h[names[1]]["data_offsets"][1] - h[names[1]]["data_offsets"][0]])), None, "overlap"),
        ("unknown_dtype", with_header(swap(0, "dtype", "F8_E9M9")), None, "F8_E9M9"),
        ("shape_vs_bytes", with_header(swap(0, "shape", [16, 9])), None, "shape"),
        ("negative_dim", with_header(swap(0, "shape", [-16, 8])), None, "shape"),
        ("non_utf8_header", st_bytes([], header_override=b'{"\xff\xfe": {}}'), None, "UTF-8"),
        ("bad_json_header", st_bytes([], header_override=b'{"a": [1, 2'), None, "JSON"),
        ("missing_tensor", st_bytes([t for t in tensors if t[0] != "model.norm.weight"]), None,
         "model.norm.weight"),
        ("extra_tensor", st_bytes(tensors + [("model.layers.9.mlp.bias", "F32", [8], b"\0" * 32)]), None,
         "model.layers.9.mlp.bias"),
        ("wrong_shape_tensor", st_bytes([(k, d, ([8, 16] if k == emb else s), r) for k, d, s, r in tensors]),
         None, emb),
        ("int_dtype_weight", st_bytes([(k, ("I32" if k == emb else d), s, r) for k, d, s, r in tensors]), None,
         "dtype"),
        ("offsets_past_data", with_header(swap(len(names) - 1, "data_offsets", [len(data) - 4, len(data) + 60])),
         None, "past"),
        ("config_not_json", good, b"{not json", "config.json"),
        ("config_non_utf8", good, b'{"vocab_size": 16, "x": "\xc3\x28"}', "UTF-8"),
        ("config_huge_dims", good, json.dumps(dict(cfg, hidden_size=1 << 40)).encode(), "hidden_size"),
        ("config_topk_gt_experts", good, json.dumps(dict(cfg, num_experts_per_tok=3)).encode(),
         "num_experts_per_tok"),
        ("config_string_field", good, json.dumps(dict(cfg, hidden_size="8")).encode(), "hidden_size"),
        ("config_heads_mismatch", good, json.dumps(dict(cfg, num_attention_heads=5)).encode(),
         "num_attention_heads"),
        ("config_negative_vocab", good, json.dumps(dict(cfg, vocab_size=-3)).encode(), "vocab_size"),
        ("config_alias_conflict", good, json.dumps(dict(cfg, moe_num_experts=4)).encode(), "moe_num_experts"),
        ("config_duplicate_key", good, (json.dumps(cfg)[:-1] + ', "num_experts_per_tok": 2}').encode(),
         "duplicate key"),
        ("config_rope_scaling", good, json.dumps(dict(cfg, rope_scaling={"type": "linear", "factor": 4})).encode(),
         "rope_scaling"),
        ("nan_weight", st_bytes([(k, d, s, (struct.pack("<f", float("nan")) + r[4:]) if k == emb else r)
                                 for k, d, s, r in tensors]), None, "non-finite"),
        ("config_missing", None, None, "config.json"),
        ("no_weights", None, json.dumps(cfg).encode(), "model.safetensors"),
    ]
    for case, st, config, expect in cases:
        test = f"bad_input_{case}"
        if not suite.wanted(test):
            continue
        d = variant(case, st, config)
        if case == "config_missing":
            os.remove(os.path.join(d, "config.json"))
            with open(os.path.join(d, "model.safetensors"), "wb") as f:
                f.write(good)
        problems = []
        cmds = [["info", d], ["forward", d, "--tokens", "1,2,3"]]
        if case == "nan_weight":
            cmds = cmds[1:]  # info validates structure without reading values
        for cmd in cmds:
            p, _ = run([jetmoe] + cmd)
            err = p.stderr.strip()
            if p.returncode == 0:
                problems.append(f"{cmd[0]}: exit 0")
            elif p.returncode < 0 or sanitizer_report(err):
                problems.append(f"{cmd[0]}: crashed ({p.returncode}): {err[-400:]}")
            elif len(err.splitlines()) != 1:
                problems.append(f"{cmd[0]}: error is not one line: {err[-400:]!r}")
            elif expect not in err:
                problems.append(f"{cmd[0]}: error does not name '{expect}': {err!r}")
        suite.check(test, not problems, "; ".join(problems))

    # Special files must not hang the loader (a FIFO blocks an ordinary open).
    if suite.wanted("bad_input_fifo"):
        d = variant("fifo", None, None)
        os.mkfifo(os.path.join(d, "model.safetensors"))
        try:
            p, _ = run([jetmoe, "info", d], timeout=30)
            err = p.stderr.strip()
            suite.check("bad_input_fifo", p.returncode > 0 and "not a regular file" in err, f"{p.returncode}: {err!r}")
        except subprocess.TimeoutExpired:
            suite.check("bad_input_fifo", False, "jetmoe info hung on a FIFO")

    # Sharded checkpoints: index problems.
    shard_cases = [
        ("index_traversal", {"model.safetensors.index.json": json.dumps(
            {"weight_map": {k: "../model.safetensors" for k in names}}).encode()}, ".."),
        ("index_missing_shard", {"model.safetensors.index.json": json.dumps(
            {"weight_map": {k: "model-00001-of-00002.safetensors" for k in names}}).encode()},
         "model-00001-of-00002.safetensors"),
        ("index_not_json", {"model.safetensors.index.json": b"[1, 2"}, "index"),
    ]
    for case, files, expect in shard_cases:
        test = f"bad_input_{case}"
        if not suite.wanted(test):
            continue
        d = variant(case, None, None, files)
        p, _ = run([jetmoe, "info", d])
        err = p.stderr.strip()
        ok = p.returncode > 0 and not sanitizer_report(err) and len(err.splitlines()) == 1 and expect in err
        suite.check(test, ok, f"exit {p.returncode}: {err[-400:]!r}")

    # CLI arguments.
    cli_cases = [
        ("token_out_of_vocab", ["forward", base, "--tokens", "1,16"], "outside the vocabulary"),
        ("token_negative", ["forward", base, "--tokens", "-1"], "outside the vocabulary"),
        ("token_not_a_number", ["forward", base, "--tokens", "1,x"], "--tokens"),
        ("token_empty_field", ["forward", base, "--tokens", "1,,2"], "--tokens"),
        ("token_overflow", ["forward", base, "--tokens", "99999999999999"], "--tokens"),
        ("unknown_flag", ["forward", base, "--tokens", "1", "--frobnicate"], "--frobnicate"),
        ("unknown_command", ["frobnicate"], "frobnicate"),
        ("missing_flag_value", ["forward", base, "--tokens"], "--tokens"),
        ("too_long_sequence", ["forward", base, "--tokens", ",".join(["1"] * 4097)], "max_position_embeddings"),
        ("dump_unwritable", ["forward", base, "--tokens", "1", "--dump", "/nonexistent/dir/x.st"], "nonexistent"),
    ]
    for case, args, expect in cli_cases:
        test = f"cli_{case}"
        if not suite.wanted(test):
            continue
        p, _ = run([jetmoe] + args)
        err = p.stderr.strip()
        ok = p.returncode > 0 and not sanitizer_report(err) and len(err.splitlines()) == 1 and expect in err
        suite.check(test, ok, f"exit {p.returncode}: {err[-400:]!r}")

    if suite.wanted("cli_info_ok"):
        p, _ = run([jetmoe, "info", base])
        suite.check("cli_info_ok", p.returncode == 0 and "model.embed_tokens.weight" in p.stdout
                    and "active per token" in p.stdout, p.stderr[-400:])


# ---------------------------------------------------------------- reference self-test

def ref_selftest(suite):
    if not suite.wanted("ref_selftest"):
        return
    p, secs = run([PY, REF, "selftest"])
    lines = suite.relay(p.stdout)
    if p.returncode != 0 and not any(l.startswith("FAIL ") for l in lines):
        suite.check("ref_selftest_exit", False, p.stderr.strip()[-800:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--only", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    suite = Suite(args.only)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if "asan" in args.build:
        os.environ["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0"
        os.environ["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    tmp = tempfile.mkdtemp(prefix="jetmoe-test-")
    t0 = time.time()
    try:
        check_layout.run(suite, args.build)
        c_programs(suite, args.build)
        ref_selftest(suite)
        golden(suite, args.build, tmp)
        gradients(suite, args.build, tmp)
        training_steps(suite, args.build, tmp)
        generation(suite, args.build, tmp)
        quantized(suite, args.build, tmp)
        training_runs(suite, args.build, tmp)
        train_tests.run(suite, args.build, tmp)
        recipe_checks_tests.run(suite, args.build, tmp)
        align_ref_tests.run(suite, args.build, tmp)
        tune_tests.run(suite, args.build, tmp)
        bad_inputs(suite, args.build, tmp)
        tokenizer_exact.run(suite, os.path.join(ROOT, args.build, "jetmoe"), tmp)
        cli_tests.run(suite, os.path.join(ROOT, args.build, "jetmoe"), tmp)
        jinja_diff_tests.run(suite, os.path.join(ROOT, args.build, "jetmoe"), tmp)
        output_safety_tests.run(suite, args.build, tmp)
        input_checks_tests.run(suite, os.path.join(ROOT, args.build, "jetmoe"), tmp)
        distill_tests.run(suite, args.build, tmp)
        eval_tests.run(suite, args.build, tmp)
        serve_tests.run(suite, args.build, tmp)
        serve_clients_tests.run(suite, args.build, tmp)
        browser_tests.run(suite, args.build, tmp)
        prepare_tests.run(suite, args.build, tmp)
        mpi_tests.run(suite, args.build, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"# {time.time() - t0:.0f}s ({args.build})")
    print(f"{suite.passed} passed, {suite.failed} failed")
    sys.exit(1 if suite.failed or suite.passed == 0 else 0)


if __name__ == "__main__":
    main()
