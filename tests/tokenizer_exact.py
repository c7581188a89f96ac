#!/usr/bin/python3
"""Exactness of the C tokenizer against Debian's SentencePiece tools.

For every model, on the whole corpus of tests/tokenizer_corpus.py (>= 1 MB, one
line = one input, bytes not text):
  encode       `jetmoe tokenizer encode --model M` == `spm_encode --model M --output_format=id`
  decode       `jetmoe tokenizer decode --model M` == `spm_decode --model M --input_format=id`
               on spm_encode's ids, byte for byte
  decode_random  the same on random id lines (byte pieces forming invalid UTF-8, <0x0A>,
               control/unknown ids, whitespace pieces, ...)
  json_encode / json_decode  the same with --model DIR/tokenizer.json (models that have one)
Models: trained by `jetmoe tokenizer train` (300-ish with byte fallback, 1000 without,
8000 with), trained directly by spm_train (BPE with spm's default nmt_nfkc normaliser and no
byte fallback, so the precompiled charsmap path runs; user-defined symbols without dummy prefix;
whitespace as suffix) and the Llama-2 model at ../shared/fixtures/llama2-tokenizer/ when present.

Called from tests/run_tests.py as run(suite, jetmoe, tmpdir); standalone:
  tests/tokenizer_exact.py [--jetmoe build/jetmoe] [--only SUBSTRING] [--keep] [--seed N]
"""
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokenizer_corpus  # noqa: E402
from testlib import Suite, sanitizer_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA2 = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "llama2-tokenizer", "tokenizer.model")
TIMEOUT = 300  # per process; a quadratic encoder on the 100 KB lines would hit it
CHECKS = ("encode", "decode", "decode_random", "json_encode", "json_decode")

# (name, training subset of tokenizer_corpus.training_text, vocab size, byte fallback)
TRAINED = [
    ("v320_bf", "tiny", 320, 1),
    ("v1000_nobf", "mid", 1000, 0),
    ("v8000_bf", "big", 8000, 1),
]
# Models trained with spm_train itself: (name, subset, spm_train flags)
SPM_DIRECT = [
    # spm's defaults (nmt_nfkc normaliser with its precompiled charsmap, remove_extra_whitespaces,
    # add_dummy_prefix), but BPE and no byte fallback
    ("spm_nfkc_v2000_nobf", "big", ["--vocab_size=2000", "--model_type=bpe", "--byte_fallback=false"]),
    # user-defined symbols (matched before BPE), no dummy prefix, identity normaliser, byte fallback
    ("spm_userdef_v1500_bf", "mid",
     ["--vocab_size=1500", "--model_type=bpe", "--byte_fallback=true", "--normalization_rule_name=identity",
      "--add_dummy_prefix=false", "--remove_extra_whitespaces=true",
      "--user_defined_symbols=<|system|>,<|user|>,<|assistant|>,[INST],[/INST],<<SYS>>,\u2581\u2581\u2581\u2581,🙂"]),
    # whitespace as suffix, split digits, identity normaliser, byte fallback
    ("spm_suffix_v1000_bf", "mid",
     ["--vocab_size=1000", "--model_type=bpe", "--byte_fallback=true", "--normalization_rule_name=identity",
      "--treat_whitespace_as_suffix=true", "--split_digits=true", "--remove_extra_whitespaces=false"]),
]


# ----------------------------------------------------------------- helpers


def run_bytes(cmd, data, timeout=TIMEOUT):
    """Runs cmd with data on stdin; returns (returncode, stdout bytes, stderr str, seconds)."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, b"", f"timed out after {timeout}s", time.time() - t0
    return p.returncode, p.stdout, p.stderr.decode("utf-8", "replace"), time.time() - t0


def proc_problem(name, rc, err):
    """A failure string for a crashed / failed process, or None."""
    if rc is None:
        return f"{name}: {err}"
    if rc != 0 or sanitizer_report(err):
        return f"{name}: exit {rc}: {err.strip()[-600:]}"
    return None


def short(b, n=300):
    r = repr(b)
    return r if len(r) <= n else r[:n] + f"...({len(b)} bytes)"


def diff_context(a, b, n=60):
    """Where two byte strings first differ, with n bytes of context from each."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - n)
    return (f"first difference at byte {i} of {len(a)} / {len(b)}: "
            f"spm {short(a[lo:i + n], 4 * n)} | jetmoe {short(b[lo:i + n], 4 * n)}")


def short_ids(ids, at=0, n=40):
    lo = max(0, at - n // 2)
    s = " ".join(ids[lo:lo + n])
    return ("... " if lo else "") + s + (" ..." if lo + n < len(ids) else "") + f" [{len(ids)} ids]"


def read_model_proto(path):
    """Minimal protobuf reader of a SentencePiece ModelProto: [(piece bytes, type)].
    ModelProto.pieces = field 1; SentencePiece.piece = 1 (bytes), score = 2, type = 3 (default 1)."""
    with open(path, "rb") as f:
        buf = f.read()

    def varint(b, i):
        v = s = 0
        while True:
            c = b[i]
            i += 1
            v |= (c & 0x7F) << s
            s += 7
            if c < 0x80:
                return v, i

    def fields(b):
        i = 0
        while i < len(b):
            key, i = varint(b, i)
            f, wt = key >> 3, key & 7
            if wt == 0:
                v, i = varint(b, i)
            elif wt == 1:
                v, i = b[i:i + 8], i + 8
            elif wt == 2:
                n, i = varint(b, i)
                v, i = b[i:i + n], i + n
            elif wt == 5:
                v, i = b[i:i + 4], i + 4
            else:
                raise ValueError(f"wire type {wt}")
            yield f, v

    pieces = []
    for f, v in fields(buf):
        if f == 1:
            piece, typ = b"", 1
            for g, w in fields(v):
                if g == 1:
                    piece = w
                elif g == 3:
                    typ = w
            pieces.append((piece, typ))
    return pieces


def random_id_lines(pieces, corpus_ids, seed, n=4000):
    """Id lines for decode tests: invalid byte sequences, <0x0A>, control ids, whitespace pieces..."""
    rng = random.Random(seed)
    V = len(pieces)
    by_type = {}
    for i, (_, t) in enumerate(pieces):
        by_type.setdefault(t, []).append(i)
    byte_id = {int(p[3:5], 16): i for i, (p, t) in enumerate(pieces) if t == 6}
    normal = by_type.get(1, list(range(V)))
    special = by_type.get(2, []) + by_type.get(3, []) + by_type.get(4, [])
    ws = [i for i in normal if pieces[i][0].startswith("\u2581".encode()) or pieces[i][0].endswith("\u2581".encode())]
    ws = ws or normal
    corpus_lines = [l for l in corpus_ids if l]
    out = []
    for _ in range(n):
        k = rng.randrange(9)
        if k == 0:
            ids = []
        elif k == 1:
            ids = [rng.randrange(V) for _ in range(rng.randrange(1, 30))]
        elif k == 2 and byte_id:
            ids = [rng.choice(list(byte_id.values())) for _ in range(rng.randrange(1, 20))]
        elif k == 3 and byte_id:  # UTF-8 of random characters as bytes, sometimes cut short
            ids = []
            for _ in range(rng.randrange(1, 6)):
                c = rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0x800, 0xD800), rng.randrange(0x10000, 0x110000)])
                b = chr(c).encode()
                if rng.random() < 0.3:
                    b = b[:rng.randrange(1, len(b))]
                ids += [byte_id[x] for x in b]
                if rng.random() < 0.5:
                    ids.append(rng.choice(normal))
        elif k == 4:  # control / unknown / user-defined ids anywhere, often first
            ids = [rng.choice(special or normal)] + [rng.choice(normal + special) for _ in range(rng.randrange(0, 12))]
        elif k == 5:  # pieces with a whitespace marker (incl. whitespace-only pieces)
            ids = [rng.choice(ws) for _ in range(rng.randrange(1, 12))]
        elif k == 6 and byte_id:  # newline, NUL, CR, space and high bytes as byte pieces
            ids = [rng.choice([byte_id[x] for x in (0x0A, 0x00, 0x0D, 0x20, 0x09, 0xE2, 0x96, 0x81, 0xFF)] + normal)
                   for _ in range(rng.randrange(1, 12))]
        elif corpus_lines:  # a real line, cut and partly shuffled
            ids = [int(x) for x in rng.choice(corpus_lines).split()]
            a = rng.randrange(len(ids))
            ids = ids[a:a + rng.randrange(1, 40)]
            if rng.random() < 0.3:
                rng.shuffle(ids)
        else:
            ids = [rng.randrange(V)]
        out.append(" ".join(str(i) for i in ids).encode())
    return out


def first_bad_prefix(lines, same):
    """Smallest k with same(lines[:k]) false (outputs of a prefix differ), by bisection;
    assumes same(lines) is false. Decoded text may contain '\\n', so lines of output cannot
    be matched to lines of input directly."""
    lo, hi = 0, len(lines)  # same(lines[:lo]) true, same(lines[:hi]) false
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if same(lines[:mid]):
            lo = mid
        else:
            hi = mid
    return hi - 1


# ----------------------------------------------------------------- checks


class ModelCheck:
    def __init__(self, suite, jetmoe, name, model, json_path, corpus_lines, log):
        self.suite, self.jetmoe, self.name, self.model = suite, jetmoe, name, model
        self.json = json_path
        self.lines = corpus_lines
        self.log = log

    def test(self, what):
        return f"tokenizer_{self.name}_{what}"

    def encode_check(self, what, model, ref_out, ref_secs, data):
        test = self.test(what)
        rc, out, err, secs = run_bytes([self.jetmoe, "tokenizer", "encode", "--model", model], data)
        problem = proc_problem("jetmoe tokenizer encode", rc, err)
        mb = len(data) / 1e6
        detail = (f"{len(self.lines)} lines, {mb:.2f} MB; spm_encode {ref_secs:.2f}s, jetmoe {secs:.2f}s "
                  f"({mb / max(secs, 1e-9):.1f} MB/s)")
        if problem:
            if rc is not None:  # find the input line that makes it fail (not after a timeout)
                cmd = [self.jetmoe, "tokenizer", "encode", "--model", model]

                def same(sub):
                    d = b"".join(l + b"\n" for l in sub)
                    r2 = run_bytes(cmd, d)
                    if r2[0] != 0 or sanitizer_report(r2[2]):
                        return False
                    return run_bytes(["spm_encode", "--model", self.model, "--output_format=id"], d)[1] == r2[1]

                k = first_bad_prefix(self.lines, same)
                problem += f"; first failing input: line {k + 1}, {short(self.lines[k])}"
            self.suite.check(test, False, problem)
            return None
        ref_l, got_l = ref_out.split(b"\n"), out.split(b"\n")
        if ref_l == got_l:
            self.suite.check(test, True, detail=detail)
            return out
        ndiff = sum(a != b for a, b in zip(ref_l, got_l)) + abs(len(ref_l) - len(got_l))
        i = next((i for i, (a, b) in enumerate(zip(ref_l, got_l)) if a != b), min(len(ref_l), len(got_l)))
        if i >= len(self.lines):
            why = f"output has {len(got_l) - 1} lines, spm_encode {len(ref_l) - 1}"
        else:
            r = ref_l[i].decode().split() if i < len(ref_l) else []
            g = got_l[i].decode("utf-8", "replace").split() if i < len(got_l) else ["<missing>"]
            at = next((j for j, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g)))
            why = (f"{ndiff} of {len(self.lines)} lines differ; first: line {i + 1}, input {short(self.lines[i])}; "
                   f"first different id at {at}: spm_encode {short_ids(r, at)} | jetmoe {short_ids(g, at)}")
        self.suite.check(test, False, why)
        return None

    def decode_check(self, what, model, id_lines):
        test = self.test(what)
        data = b"\n".join(id_lines) + b"\n"
        rc, ref, err, rsecs = run_bytes(["spm_decode", "--model", self.model, "--input_format=id"], data)
        if rc != 0:
            self.suite.check(test, False, f"spm_decode failed: exit {rc}: {err.strip()[-400:]}")
            return
        cmd = [self.jetmoe, "tokenizer", "decode", "--model", model]
        rc, out, err, secs = run_bytes(cmd, data)
        problem = proc_problem("jetmoe tokenizer decode", rc, err)
        detail = f"{len(id_lines)} lines, {len(ref) / 1e6:.2f} MB out; spm_decode {rsecs:.2f}s, jetmoe {secs:.2f}s"
        if not problem and out == ref:
            self.suite.check(test, True, detail=detail)
            return

        def same(sub):
            d = b"".join(l + b"\n" for l in sub)
            r1 = run_bytes(["spm_decode", "--model", self.model, "--input_format=id"], d)
            r2 = run_bytes(cmd, d)
            return r2[0] == 0 and not sanitizer_report(r2[2]) and r1[1] == r2[1]

        k = first_bad_prefix(id_lines, same)
        one = id_lines[k] + b"\n"
        r1, r2 = run_bytes(["spm_decode", "--model", self.model, "--input_format=id"], one), run_bytes(cmd, one)
        why = (f"{problem + '; ' if problem else ''}first differing line {k + 1}: ids {short(id_lines[k], 200)}: "
               + diff_context(r1[1], r2[1])
               + (f" (exit {r2[0]}: {r2[2].strip()[-300:]})" if r2[0] != 0 else ""))
        self.suite.check(test, False, why)

    def run(self, data):
        wanted = [w for w in CHECKS
                  if self.suite.wanted(self.test(w)) and (self.json or not w.startswith("json"))]
        if not wanted:
            return
        rc, ref, err, rsecs = run_bytes(["spm_encode", "--model", self.model, "--output_format=id"], data)
        if rc != 0:
            self.suite.check(self.test("spm_encode"), False, f"spm_encode failed: exit {rc}: {err.strip()[-400:]}")
            return
        ref_ids = ref.split(b"\n")[:-1]
        if "encode" in wanted:
            self.encode_check("encode", self.model, ref, rsecs, data)
        if "decode" in wanted:
            self.decode_check("decode", self.model, ref_ids)
        rand = None
        if "decode_random" in wanted or "json_decode" in wanted:
            pieces = read_model_proto(self.model)
            rand = random_id_lines(pieces, ref_ids[::7], seed=len(pieces) * 7919 + len(self.name))
        if "decode_random" in wanted:
            self.decode_check("decode_random", self.model, rand)
        if "json_encode" in wanted:
            self.encode_check("json_encode", self.json, ref, rsecs, data)
        if "json_decode" in wanted:
            self.decode_check("json_decode", self.json, ref_ids[::3] + rand)


def check_trained_model(suite, test, out_dir, vocab, byte_fallback):
    problems = []
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if not os.path.isfile(os.path.join(out_dir, f)):
            problems.append(f"{f} missing")
    if not problems:
        pieces = read_model_proto(os.path.join(out_dir, "tokenizer.model"))
        types = [t for _, t in pieces]
        nbyte = types.count(6)
        if len(pieces) != vocab:
            problems.append(f"{len(pieces)} pieces, asked for {vocab}")
        if nbyte != (256 if byte_fallback else 0):
            problems.append(f"{nbyte} byte pieces with --byte-fallback {byte_fallback}")
        if [p for p, _ in pieces[:3]] != [b"<unk>", b"<s>", b"</s>"] or types[:3] != [2, 3, 3]:
            problems.append(f"first pieces {pieces[:3]}, want <unk> <s> </s>")
    suite.check(test, not problems, "; ".join(problems))
    return not problems


def run(suite, jetmoe, tmpdir, log=print, seed=tokenizer_corpus.SEED):
    """Adds the tokenizer exactness checks to suite (see module docstring). Another seed gives
    another corpus (and training subsets): tokenizer_exact.py --seed N fuzzes."""
    def model_wanted(n):
        return any(suite.wanted(f"tokenizer_{n}_{w}") for w in CHECKS + ("train",))

    names = [n for n, *_ in TRAINED] + [n for n, *_ in SPM_DIRECT] + ["llama2"]
    if not any(model_wanted(n) for n in names):
        return
    t0 = time.time()
    for tool in ("spm_encode", "spm_decode", "spm_train"):
        if not shutil.which(tool):
            suite.check("tokenizer_spm_tools", False, f"{tool} not found (Debian package sentencepiece)")
            return
    d = os.path.join(tmpdir, "tokenizer_exact")
    os.makedirs(d, exist_ok=True)
    corpus = tokenizer_corpus.generate(seed)
    lines = [l for _, l in corpus]
    data = b"".join(l + b"\n" for l in lines)
    log(f"# tokenizer corpus: {len(lines)} lines, {len(data) / 1e6:.2f} MB ({time.time() - t0:.1f}s)", flush=True)
    subsets = {}

    def subset(kind):
        if kind not in subsets:
            p = os.path.join(d, f"train_{kind}.txt")
            with open(p, "wb") as f:
                f.write(tokenizer_corpus.training_text(corpus, kind, seed))
            subsets[kind] = p
        return subsets[kind]

    todo = []  # (name, model path, json path or None)
    for name, kind, vocab, bf in TRAINED:
        if not model_wanted(name):
            continue
        out = os.path.join(d, name)
        cmd = [jetmoe, "tokenizer", "train", "--input", subset(kind), "--vocab-size", str(vocab), "--out", out,
               "--byte-fallback", str(bf)]
        rc, _, err, secs = run_bytes(cmd, b"")
        problem = proc_problem("jetmoe tokenizer train", rc, err)
        if problem:
            suite.check(f"tokenizer_{name}_train", False, problem)
            continue
        if check_trained_model(suite, f"tokenizer_{name}_train", out, vocab, bf):
            log(f"# trained {name} in {secs:.1f}s", flush=True)
            todo.append((name, os.path.join(out, "tokenizer.model"), os.path.join(out, "tokenizer.json")))
    for name, kind, flags in SPM_DIRECT:
        if not model_wanted(name):
            continue
        prefix = os.path.join(d, name)
        rc, _, err, secs = run_bytes(["spm_train", f"--input={subset(kind)}", f"--model_prefix={prefix}",
                                      "--num_threads=2", "--minloglevel=1"] + flags, b"")
        if rc != 0:
            suite.check(f"tokenizer_{name}_train", False, f"spm_train: exit {rc}: {err.strip()[-400:]}")
            continue
        todo.append((name, prefix + ".model", None))
    if model_wanted("llama2"):
        if os.path.isfile(LLAMA2):
            todo.append(("llama2", LLAMA2, None))
        else:
            log(f"# skip llama2: {LLAMA2} not found", flush=True)
    for name, model, js in todo:
        ModelCheck(suite, jetmoe, name, model, js, lines, log).run(data)
    log(f"# tokenizer exactness: {time.time() - t0:.0f}s", flush=True)


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--jetmoe", default=os.path.join(ROOT, "build", "jetmoe"))
    ap.add_argument("--only", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--seed", type=int, default=tokenizer_corpus.SEED)
    a = ap.parse_args()

    s = Suite(a.only)
    tmp = tempfile.mkdtemp(prefix="jetmoe-tok-")
    try:
        run(s, a.jetmoe, tmp, seed=a.seed)
    finally:
        if a.keep:
            print(f"# kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{s.passed} passed, {s.failed} failed")
    sys.exit(1 if s.failed else 0)


if __name__ == "__main__":
    main()
