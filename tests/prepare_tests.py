#!/usr/bin/python3
"""prepare on real corpora at scale (issue 13, its prepare part), through the CLI.

Compressed JSON lines read as streams, the --text-field of each record, and --part I/N: a shard
set prepared in pieces (on several hosts, into one directory or copied together) that the reader
accepts only whole. Fixtures are made here: records from the licenses in /usr/share/common-licenses,
compressed with Python's gzip module and the zstd command-line tool.

  prepare_stream_same_shards            .jsonl.gz (two gzip members) and .jsonl.zst (two frames) give
                                        the shards of the plain .jsonl, byte for byte (CRLF, blank lines,
                                        no final newline, a 3 MB record longer than the stream buffer)
  prepare_stream_dir_picks_compressed   a directory's .jsonl.gz, .jsonl.zst, .json.gz and .json.zst are
                                        read as JSON lines, in name order; a .gz of another name is skipped
  prepare_stream_text_field             --text-field content reads "content" (Dolma, the Pile use "text");
                                        a record without it stops prepare at file:line, also in a .zst
  prepare_stream_corrupt_refused        truncated .gz and .zst, garbage bytes, a flipped byte, a zstd window
                                        over 128 MB: one line naming the file, exit 1, the output directory
                                        left as it was
  prepare_stream_long_line_refused      a record over 64 MB in a .jsonl.gz is refused at file:line, not held
  prepare_part_args_refused             --part x, 2/0, 3/2, 0/2, 1/2/3: exit 2, one line saying why
  prepare_part_set_equals_single        --part 1/2 and 2/2 run at the same time into one directory: the
                                        token stream, documents and tokens of a single prepare; eval reads it
  prepare_part_copied_dirs_merge        the parts prepared into separate directories and copied into one:
                                        the same files; three parts of two files: an empty part, still whole
  prepare_part_missing_refused          a part's manifest or a shard it lists missing, a stray shard, a
                                        resized shard, parts of other inputs: the reader refuses, naming it
  prepare_part_mixed_sets_refused       a part into a whole set's directory, a whole prepare into a part
                                        set's, a 3-part piece into a 2-part set: refused, nothing written
  prepare_part_overwrite_own_only       a part's re-run needs --overwrite, replaces only its own files and
                                        removes only its own stale shards: the other part's stay

Called from tests/run_tests.py as run(suite, build, tmpdir).
"""
import gzip
import json
import os
import shutil
import struct
import subprocess

from cli_tests import tiny_model
from recipe_checks_tests import one_line_error, snapshot  # every file's bytes; one-line refusals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("prepare_stream_same_shards", "prepare_stream_dir_picks_compressed", "prepare_stream_text_field",
          "prepare_stream_corrupt_refused", "prepare_stream_long_line_refused", "prepare_part_args_refused",
          "prepare_part_set_equals_single", "prepare_part_copied_dirs_merge", "prepare_part_missing_refused",
          "prepare_part_mixed_sets_refused", "prepare_part_overwrite_own_only")


def shard_tokens(d):
    """The token stream of every *.bin of d in name order (as the sampler reads it), and the shard count."""
    out, n = [], 0
    for name in sorted(os.listdir(d)):
        if name.endswith(".bin") and not name.startswith("."):
            with open(os.path.join(d, name), "rb") as f:
                b = f.read()
            (k,) = struct.unpack("<Q", b[16:24])
            (bpt,) = struct.unpack("<I", b[12:16])
            out += list(struct.unpack(f"<{k}{'H' if bpt == 2 else 'I'}", b[64:64 + bpt * k]))
            n += 1
    return out, n


def records(n, seed, field="text"):
    """n JSON records of license prose, ASCII and not (each a few sentences), under field."""
    lic = "/usr/share/common-licenses"
    text = "".join(open(os.path.join(lic, f), errors="replace").read() for f in sorted(os.listdir(lic))
                   if os.path.isfile(os.path.join(lic, f)))
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    out = []
    for i in range(n):
        t = paras[(seed * 7919 + i * 31) % len(paras)]
        if i % 5 == 0:
            t += " caf\u00e9 na\u00efve \u2603 \U0001F600"
        out.append({"id": i, field: t, "meta": {"source": "licenses", "n": i}})
    return out


def jsonl(recs):
    return "".join(json.dumps(r) + "\n" for r in recs)


def write(path, text, ext=None):
    """text into path, compressed as its name (or ext) says: .gz by Python's gzip, .zst by the zstd tool."""
    data = text.encode() if isinstance(text, str) else text
    ext = ext or os.path.splitext(path)[1]
    if ext == ".zst":
        subprocess.run(["zstd", "-q", "-f", "-o", path], input=data, check=True)
        return
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if ext == ".gz" else data)


def run(suite, build, tmp):
    if not any(suite.wanted(c) for c in CHECKS):
        return
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    root = os.path.join(tmp, "prepare_scale")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)

    def jm(*args):
        return subprocess.run([jetmoe] + list(args), capture_output=True, text=True, errors="replace", timeout=600)

    model = tiny_model(suite, jm, os.path.join(root, "model"))
    if model is None:
        return
    tok = model  # the model directory holds its tokenizer files

    def prepare(inputs, out, *extra):
        return jm("prepare", "--tokenizer", tok, "--input", ",".join(inputs), "--out", out, "--threads", "2",
                  *extra)

    def manifest(path):
        with open(path) as f:
            return json.load(f)

    # ---- the corpus: plain, gzip (two members), zstd (two frames)
    c = os.path.join(root, "corpus")
    os.makedirs(c)
    recs = records(400, 1)
    big = {"id": "big", "text": " ".join(r["text"] for r in records(2000, 2))}
    while len(big["text"]) < 3 << 20:  # longer than the 1 MB stream buffer and the 4 MB line copy chunk's start
        big["text"] += " " + big["text"]
    head = jsonl(recs[:150]).replace("\n", "\r\n", 3) + "\n  \n" + json.dumps(big) + "\n"
    tail = jsonl(recs[150:]).rstrip("\n")  # no final newline
    plain, gz, zst = (os.path.join(c, "all.jsonl" + ext) for ext in ("", ".gz", ".zst"))
    write(plain, head + tail)
    with open(gz, "wb") as f:  # two gzip members
        f.write(gzip.compress(head.encode()) + gzip.compress(tail.encode()))
    write(zst + ".1", head, ".zst")
    write(zst + ".2", tail, ".zst")
    with open(zst, "wb") as f:  # two zstd frames
        for k in (".1", ".2"):
            with open(zst + k, "rb") as g:
                f.write(g.read())
            os.remove(zst + k)
    out = {k: os.path.join(root, "s_" + k) for k in ("plain", "gz", "zst")}

    if suite.wanted("prepare_stream_same_shards"):
        problems = []
        for k, src in (("plain", plain), ("gz", gz), ("zst", zst)):
            p = prepare([src], out[k], "--shard-tokens", "20000")
            if p.returncode != 0:
                problems.append(f"{k}: exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
        if not problems:
            want = {n: b for n, b in snapshot(out["plain"]).items() if n.endswith(".bin")}
            for k in ("gz", "zst"):
                got = {n: b for n, b in snapshot(out[k]).items() if n.endswith(".bin")}
                if got != want:
                    problems.append(f"{k}: shards {sorted(got)} differ from the plain file's {sorted(want)}")
                m, mp = manifest(os.path.join(out[k], "manifest.json")), manifest(
                    os.path.join(out["plain"], "manifest.json"))
                if (m["documents"], m["tokens"]) != (mp["documents"], mp["tokens"]) or m["documents"] != 401:
                    problems.append(f"{k}: {m['documents']} documents, {m['tokens']} tokens; plain: "
                                    f"{mp['documents']}, {mp['tokens']} (want 401 documents)")
            if len(want) < 3:
                problems.append(f"only {len(want)} shards: the test wants several")
        suite.check("prepare_stream_same_shards", not problems, "; ".join(problems),
                    f"{len(snapshot(out['plain'])) - 1} shards, 401 records incl. a {len(big['text']) >> 20} MB one")

    if suite.wanted("prepare_stream_dir_picks_compressed"):
        problems = []
        d = os.path.join(root, "mixed_dir")
        os.makedirs(os.path.join(d, "sub"))
        chunks = [recs[i * 80:(i + 1) * 80] for i in range(5)]
        # .json.gz / .json.zst: Dolma's names for compressed JSON lines
        for name, chunk in zip(("a.jsonl", "b.jsonl.gz", "sub/c.json.gz", "sub/d.jsonl.zst", "sub/e.json.zst"), chunks):
            write(os.path.join(d, name), jsonl(chunk))
        write(os.path.join(d, "z_notes.txt.gz"), "not a corpus file\n" * 100)  # compressed, not JSON lines: binary
        ref = os.path.join(root, "mixed_ref.jsonl")
        write(ref, jsonl(recs[:400]))
        pd, pr = prepare([d], os.path.join(root, "s_mixed")), prepare([ref], os.path.join(root, "s_mixed_ref"))
        if pd.returncode or pr.returncode:
            problems.append(f"exit {pd.returncode}/{pr.returncode}: {(pd.stderr + pr.stderr).strip()[-300:]!r}")
        else:
            got, want = shard_tokens(os.path.join(root, "s_mixed"))[0], shard_tokens(os.path.join(root,
                                                                                                 "s_mixed_ref"))[0]
            if got != want:
                problems.append(f"{len(got)} tokens, want the {len(want)} of the five files' records in name order")
            m = manifest(os.path.join(root, "s_mixed", "manifest.json"))
            if len(m["sources"]) != 5 or "skipping binary file" not in pd.stderr or "z_notes" not in pd.stderr:
                problems.append(f"sources {[s['path'] for s in m['sources']]}; stderr {pd.stderr[-300:]!r}")
        suite.check("prepare_stream_dir_picks_compressed", not problems, "; ".join(problems),
                    ".jsonl, .jsonl.gz, .json.gz, .jsonl.zst, .json.zst in name order; .txt.gz skipped as binary")

    if suite.wanted("prepare_stream_text_field"):
        problems = []
        d = os.path.join(root, "field")
        os.makedirs(d)
        crecs = [{"content": r["text"], "text": "decoy " + str(r["id"])} for r in recs[:120]]
        write(os.path.join(d, "content.jsonl.gz"), jsonl(crecs))
        write(os.path.join(d, "ref.jsonl"), jsonl({"text": r["text"]} for r in recs[:120]))
        p = prepare([os.path.join(d, "content.jsonl.gz")], os.path.join(d, "s_content"), "--text-field", "content")
        q = prepare([os.path.join(d, "ref.jsonl")], os.path.join(d, "s_ref"))
        if p.returncode or q.returncode:
            problems.append(f"exit {p.returncode}/{q.returncode}: {(p.stderr + q.stderr).strip()[-300:]!r}")
        elif shard_tokens(os.path.join(d, "s_content"))[0] != shard_tokens(os.path.join(d, "s_ref"))[0]:
            problems.append("--text-field content did not give the tokens of the same texts under \"text\"")
        elif manifest(os.path.join(d, "s_content", "manifest.json")).get("text_field") != "content":
            problems.append("the manifest does not record the text field")
        # a record without the field: file:line, as for "text" (the line of the decompressed stream)
        for name, rows, args, where, what in (
                ("no_content", crecs[:2] + [{"text": "no content here"}] + crecs[2:5], ["--text-field", "content"],
                 ":3:", 'no "content" string field'),
                ("no_text", [{"content": "only content"}] + crecs[:2], [], ":1:", 'no "text" string field')):
            path = os.path.join(d, name + ".jsonl.zst")
            write(path, jsonl(rows))
            p = prepare([path], os.path.join(d, "s_bad"), *args)
            why = one_line_error(p, 1, [path + where, what])
            if why:
                problems.append(f"{name}: {why}")
        for bad_field in ("", "a\x01b"):
            p = prepare([os.path.join(d, "ref.jsonl")], os.path.join(d, "s_badfield"), "--text-field", bad_field)
            if p.returncode == 0 or "text field" not in p.stderr:
                problems.append(f"--text-field {bad_field!r}: exit {p.returncode}: {p.stderr.strip()[-200:]!r}")
        if os.path.exists(os.path.join(d, "s_bad")) and [n for n in os.listdir(os.path.join(d, "s_bad"))]:
            problems.append(f"the refused run wrote {os.listdir(os.path.join(d, 's_bad'))}")
        suite.check("prepare_stream_text_field", not problems, "; ".join(problems),
                    "--text-field content == \"text\" of the same texts; a missing field names file:line in a .zst")

    if suite.wanted("prepare_stream_corrupt_refused"):
        problems = []
        d = os.path.join(root, "corrupt")
        os.makedirs(d)
        with open(gz, "rb") as f:
            gzb = f.read()
        with open(zst, "rb") as f:
            zsb = f.read()
        flip_gz, flip_zst = bytearray(gzb), bytearray(zsb)
        flip_gz[len(gzb) // 3] ^= 0x55
        flip_zst[len(zsb) // 3] ^= 0x55
        cases = [("trunc.jsonl.gz", gzb[:len(gzb) // 2], "truncated gzip data"),
                 ("trunc.jsonl.zst", zsb[:len(zsb) // 2], "truncated zstd data"),
                 ("garbage.jsonl.gz", os.urandom(5000).replace(b"\x1f\x8b", b"xx"), "not gzip data"),
                 ("garbage.jsonl.zst", b"\x00\x01" + os.urandom(5000), "corrupt zstd data"),
                 ("flip.jsonl.gz", bytes(flip_gz), "corrupt gzip data"),
                 ("flip.jsonl.zst", bytes(flip_zst), "corrupt zstd data"),
                 # a 256 MB window (zstd --long=28 on a stream of unknown size): refused, not obeyed
                 ("wide.jsonl.zst", subprocess.run(["zstd", "-q", "--long=28", "-c"], input=head.encode(),
                                                   capture_output=True, check=True).stdout, "window over 128 MB")]
        existing = out["plain"]
        before = snapshot(existing) if os.path.isdir(existing) else None
        for name, data, why in cases:
            path = os.path.join(d, name)
            with open(path, "wb") as f:  # as they are, not compressed again
                f.write(data)
            for dst, extra in ((os.path.join(d, "out_" + name), []), (existing, ["--overwrite"])):
                p = prepare([path], dst, *extra)
                bad = one_line_error(p, 1, [path + ":", why])
                if bad:
                    problems.append(f"{name}: {bad}")
                if dst != existing and os.path.isdir(dst) and os.listdir(dst):
                    problems.append(f"{name}: wrote {os.listdir(dst)}")
            if before is not None and snapshot(existing) != before:
                problems.append(f"{name}: the existing shard directory changed")
        suite.check("prepare_stream_corrupt_refused", not problems, "; ".join(problems),
                    f"{len(cases)} damaged files refused with their name, nothing written or replaced")

    if suite.wanted("prepare_stream_long_line_refused"):
        d = os.path.join(root, "long")
        os.makedirs(d)
        path = os.path.join(d, "long.jsonl.gz")
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(jsonl(recs[:2]).encode())
            f.write(b'{"text": "' + b"a" * ((64 << 20) + 100) + b'"}\n')
        p = prepare([path], os.path.join(d, "out"))
        why = one_line_error(p, 1, [path + ":3:", "longer than 64 MB"])
        suite.check("prepare_stream_long_line_refused", why is None, why or "",
                    "a 64 MB + 100 byte record in a .jsonl.gz: refused at file:3")

    # ---- --part
    if suite.wanted("prepare_part_args_refused"):
        problems = []
        for arg, must in (("x", "--part wants I/N"), ("2/0", "N must be 1 to 99999"), ("3/2", "I must be 1 to 2"),
                          ("0/2", "I must be 1 to 2"), ("1/2/3", "--part wants I/N"), ("/2", "--part wants I/N"),
                          ("1/100000", "N must be 1 to 99999"), ("-1/2", "--part wants I/N")):
            dst = os.path.join(root, "args_out")
            p = prepare([plain], dst, "--part", arg)
            if p.returncode != 2 or must not in p.stderr or len(p.stderr.strip().splitlines()) != 1 or \
                    "jetmoe prepare: --part" not in p.stderr or os.path.exists(dst):
                problems.append(f"--part {arg}: exit {p.returncode}: {p.stderr.strip()[-200:]!r}")
        suite.check("prepare_part_args_refused", not problems, "; ".join(problems),
                    "x, 2/0, 3/2, 0/2, 1/2/3, /2, 1/100000, -1/2 refused with exit 2")

    # four files of unequal sizes, the whole set prepared once as the reference
    pc = os.path.join(root, "part_corpus")
    os.makedirs(os.path.join(pc, "b"))
    files = [(os.path.join(pc, "a1.jsonl"), recs[:60]), (os.path.join(pc, "a2.jsonl.gz"), recs[60:200]),
             (os.path.join(pc, "b", "c.jsonl.zst"), recs[200:230]), (os.path.join(pc, "b", "d.jsonl"), recs[230:400])]
    for path, rs in files:
        write(path, jsonl(rs))
    single = os.path.join(root, "part_single")
    ps = prepare([pc], single, "--shard-tokens", "3000")
    single_ok = ps.returncode == 0
    if not single_ok:
        suite.check("prepare_part_setup", False, f"single prepare: {ps.stderr.strip()[-300:]!r}")
    want_tokens = shard_tokens(single)[0] if single_ok else None
    want_m = manifest(os.path.join(single, "manifest.json")) if single_ok else None

    def eval_dir(d):
        return jm("eval", model, "--data", d, "--seq-len", "32", "--max-tokens", "2000", "--threads", "2")

    def parts_equal(d, n, problems, label):
        got, nshards = shard_tokens(d)
        if got != want_tokens:
            problems.append(f"{label}: the parts' token stream ({len(got)} tokens) is not the single prepare's "
                            f"({len(want_tokens)})")
        ms = [manifest(os.path.join(d, f"part-{i:05d}-of-{n:05d}.manifest.json")) for i in range(1, n + 1)]
        docs, toks = sum(m["documents"] for m in ms), sum(m["tokens"] for m in ms)
        srcs = sorted((s["path"], s["documents"], s["tokens"]) for m in ms for s in m["sources"])
        want_srcs = sorted((s["path"], s["documents"], s["tokens"]) for s in want_m["sources"])
        if (docs, toks) != (want_m["documents"], want_m["tokens"]) or srcs != want_srcs:
            problems.append(f"{label}: {docs} documents and {toks} tokens over {len(srcs)} sources; the single "
                            f"prepare: {want_m['documents']}, {want_m['tokens']} over {len(want_srcs)}")
        return nshards

    if single_ok and suite.wanted("prepare_part_set_equals_single"):
        problems = []
        shared = os.path.join(root, "part_shared")
        # both parts at once, into the same directory, as two hosts on a shared file system would
        procs = [subprocess.Popen([jetmoe, "prepare", "--tokenizer", tok, "--input", pc, "--out", shared,
                                   "--shard-tokens", "3000", "--threads", "1", "--part", f"{i}/2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
        outs = [(pr.wait(timeout=600), pr.stdout.read(), pr.stderr.read()) for pr in procs]
        for i, (rc, so, se) in enumerate(outs):
            if rc != 0 or f"(part {i + 1}/2)" not in so:
                problems.append(f"part {i + 1}/2: exit {rc}: {se.strip()[-300:]!r}")
        nshards = 0
        if not problems:
            nshards = parts_equal(shared, 2, problems, "shared directory")
            names = sorted(os.listdir(shared))
            if [n for n in names if n.startswith(".")] or not all(n.startswith("part-0000") for n in names):
                problems.append(f"unexpected entries {names}")
            m1 = manifest(os.path.join(shared, "part-00001-of-00002.manifest.json"))
            m2 = manifest(os.path.join(shared, "part-00002-of-00002.manifest.json"))
            if not m1["sources"] or not m2["sources"] or m1["inputs_digest"] != m2["inputs_digest"]:
                problems.append(f"part 1 has {len(m1['sources'])} files, part 2 {len(m2['sources'])}")
            e = eval_dir(shared)
            if e.returncode != 0 or '"loss"' not in e.stdout:
                problems.append(f"eval on the part set: exit {e.returncode}: {e.stderr.strip()[-300:]!r}")
        suite.check("prepare_part_set_equals_single", not problems, "; ".join(problems),
                    f"parts 1/2 + 2/2 at once: {nshards} shards, the single prepare's {len(want_tokens)} tokens in "
                    "order; eval reads the set")

    if single_ok and suite.wanted("prepare_part_copied_dirs_merge"):
        problems = []
        merged = os.path.join(root, "part_merged")
        os.makedirs(merged)
        for i in (1, 2):
            host = os.path.join(root, f"host{i}")
            # the other host names the corpus directory with a final '/': the same input list
            p = prepare([pc + "/" * (i - 1)], host, "--shard-tokens", "3000", "--part", f"{i}/2")
            if p.returncode != 0:
                problems.append(f"part {i}/2: exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
                continue
            for n in os.listdir(host):
                shutil.copy(os.path.join(host, n), merged)
        if not problems:
            parts_equal(merged, 2, problems, "copied together")
            e = eval_dir(merged)
            if e.returncode != 0:
                problems.append(f"eval on the copied parts: exit {e.returncode}: {e.stderr.strip()[-300:]!r}")
            shared = os.path.join(root, "part_shared")
            if os.path.isdir(shared):
                a = {n: b for n, b in snapshot(merged).items() if n.endswith(".bin")}
                b = {n: b for n, b in snapshot(shared).items() if n.endswith(".bin")}
                if a != b:
                    problems.append("the copied parts' shards differ from those written into one directory")
        # three parts of two files: one part has none, and writes an empty piece
        two = os.path.join(root, "two_files")
        os.makedirs(two)
        for path, _ in files[:2]:
            shutil.copy(path, two)
        three = os.path.join(root, "part_three")
        notes = ""
        for i in (1, 2, 3):
            p = prepare([two], three, "--part", f"{i}/3")
            notes += p.stderr
            if p.returncode != 0:
                problems.append(f"part {i}/3 of two files: exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
        if not problems:
            empty = [i for i in (1, 2, 3) if not manifest(os.path.join(three, f"part-0000{i}-of-00003.manifest.json"))
                     ["shards"]]
            ref = prepare([two], os.path.join(root, "two_single"))
            if len(empty) != 1 or "has none of the 2 input files" not in notes or ref.returncode != 0 or \
                    shard_tokens(three)[0] != shard_tokens(os.path.join(root, "two_single"))[0] or \
                    eval_dir(three).returncode != 0:
                problems.append(f"empty parts {empty}; notes {notes[-300:]!r}")
        suite.check("prepare_part_copied_dirs_merge", not problems, "; ".join(problems),
                    "parts prepared apart and copied together == the shared directory; 3 parts of 2 files read whole")

    if single_ok and suite.wanted("prepare_part_missing_refused"):
        problems = []
        src = os.path.join(root, "host1"), os.path.join(root, "host2")
        if not all(os.path.isdir(s) for s in src):
            for i, s in enumerate(src, 1):
                prepare([pc], s, "--shard-tokens", "3000", "--part", f"{i}/2")

        def case(name, change, must):
            d = os.path.join(root, "missing_" + name)
            os.makedirs(d)
            for s in src:
                for n in os.listdir(s):
                    shutil.copy(os.path.join(s, n), d)
            change(d)
            e = eval_dir(d)
            why = one_line_error(e, 1, must)
            if why:
                problems.append(f"{name}: {why}")

        def rm(n):
            return lambda d: os.remove(os.path.join(d, n))

        def other_inputs(d):  # part 2 as if prepared from another input list
            m = manifest(os.path.join(d, "part-00002-of-00002.manifest.json"))
            m["inputs_digest"] = "0123456789abcdef"
            with open(os.path.join(d, "part-00002-of-00002.manifest.json"), "w") as f:
                json.dump(m, f)

        def stray(d):
            shutil.copy(os.path.join(d, "part-00001-of-00002.shard_00000.bin"),
                        os.path.join(d, "part-00001-of-00002.shard_00099.bin"))

        def resized(d):
            with open(os.path.join(d, "part-00002-of-00002.shard_00000.bin"), "ab") as f:
                f.write(b"\0\0")

        case("manifest", rm("part-00002-of-00002.manifest.json"), ["part 2/2 missing",
                                                                    "part-00002-of-00002.manifest.json"])
        case("first_manifest", rm("part-00001-of-00002.manifest.json"), ["part 1/2 missing"])
        case("shard", rm("part-00001-of-00002.shard_00001.bin"), ["part 1/2 is incomplete",
                                                                   "part-00001-of-00002.shard_00001.bin"])
        case("stray", stray, ["part-00001-of-00002.shard_00099.bin", "listed in no part's manifest"])
        case("resized", resized, ["part-00002-of-00002.shard_00000.bin", "manifest says"])
        case("inputs", other_inputs, ["part 2/2 was prepared from other inputs than part 1/2"])
        case("mixed", lambda d: shutil.copy(os.path.join(single, "shard_00000.bin"), d),
             ["shard_00000.bin", "prepare --part pieces", "one shard set per directory"])
        suite.check("prepare_part_missing_refused", not problems, "; ".join(problems),
                    "7 broken part sets refused by the reader (eval), naming the part or file")

    if single_ok and suite.wanted("prepare_part_mixed_sets_refused"):
        problems = []
        cases = [("part_into_single", single, ["--part", "1/2"], ["holds the token shards of a prepare without --part",
                                                                 "part 1/2"]),
                 ("single_into_parts", os.path.join(root, "host1"), ["--overwrite"], ["holds prepare --part pieces"]),
                 ("three_into_two", os.path.join(root, "host1"), ["--part", "1/3"], ["holds pieces of a 2-part set",
                                                                                    "part 1/3"])]
        for name, dst, extra, must in cases:
            if not os.path.isdir(dst):
                problems.append(f"{name}: {dst} was not made by an earlier check")
                continue
            before = snapshot(dst)
            p = prepare([pc], dst, "--shard-tokens", "3000", *extra)
            why = one_line_error(p, 1, [dst] + must)
            if why:
                problems.append(f"{name}: {why}")
            if snapshot(dst) != before:
                problems.append(f"{name}: {dst} changed")
        suite.check("prepare_part_mixed_sets_refused", not problems, "; ".join(problems),
                    "a part beside a whole set, a whole prepare beside parts, a 3-part piece beside a 2-part set")

    if single_ok and suite.wanted("prepare_part_overwrite_own_only"):
        problems = []
        d = os.path.join(root, "part_rerun")
        for i in (1, 2):
            p = prepare([pc], d, "--shard-tokens", "1500", "--part", f"{i}/2")
            if p.returncode != 0:
                problems.append(f"part {i}/2: exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
        if not problems:
            before = snapshot(d)
            other = {n: b for n, b in before.items() if n.startswith("part-00002")}
            p = prepare([pc], d, "--shard-tokens", "1500", "--part", "1/2")
            why = one_line_error(p, 1, ["already holds the token shards of part 1/2", "--overwrite"])
            if why or snapshot(d) != before:
                problems.append(f"re-run without --overwrite: {why or 'the directory changed'}")
            # again with bigger shards: fewer of them; part 1's extra shards go, part 2's files stay as they were
            p = prepare([pc], d, "--shard-tokens", "6000", "--part", "1/2", "--overwrite")
            after = snapshot(d)
            own_old = sorted(n for n in before if n.startswith("part-00001") and n.endswith(".bin"))
            own_new = sorted(n for n in after if n.startswith("part-00001") and n.endswith(".bin"))
            if p.returncode != 0:
                problems.append(f"--overwrite: exit {p.returncode}: {p.stderr.strip()[-300:]!r}")
            elif {n: b for n, b in after.items() if n.startswith("part-00002")} != other:
                problems.append("part 1's --overwrite touched part 2's files")
            elif not len(own_new) < len(own_old) or "removed stale" not in p.stderr:
                problems.append(f"part 1's shards {own_old} -> {own_new}: its stale ones were not removed")
            elif shard_tokens(d)[0] != want_tokens or eval_dir(d).returncode != 0:
                problems.append("after the re-run the set no longer reads as the single prepare's tokens")
            else:
                # a file of part 1's name that jetmoe did not write is never replaced, even with --overwrite
                victim = os.path.join(d, own_new[0])
                with open(victim, "wb") as f:
                    f.write(b"user data, not a shard")
                p = prepare([pc], d, "--shard-tokens", "6000", "--part", "1/2", "--overwrite")
                why = one_line_error(p, 1, [victim, "was not written by jetmoe"])
                if why:
                    problems.append(f"a foreign file of part 1's name: {why}")
        suite.check("prepare_part_overwrite_own_only", not problems, "; ".join(problems),
                    "re-run refused without --overwrite; with it, only part 1's files replaced and its stale shards "
                    "removed")
