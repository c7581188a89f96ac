#!/usr/bin/python3
"""build_corpus.py — assembles the demo's default training mixture.

    /usr/bin/python3 data/build_corpus.py [--out build/corpus] [--seed 1234] [--debs DIR]

Writes, under --out (generated text is never committed):
  prose/    austen.jsonl (Jane Austen's six novels, a record per chapter) and
            jargon.jsonl (the Jargon File: its essays and glossary entries)
  code/     python/... (CPython's standard library, one file per module) and
            c/... (glibc's headers)
  math/     math.jsonl (gen_math.py: word problems with worked answers)
  chat/     chat.jsonl (gen_chat.py: dialogues in the JetMoE-chat format)
  heldout/  the same four kinds, disjoint from the above, for perplexity
  tokenizer_sample.txt  plain text of all four kinds for training the tokenizer
  SOURCES.json          what went in: packages and versions, files, bytes, checksums

The selection is deterministic: the same package versions and seed give the
same bytes (SOURCES.json lists a sha256 per kind to check that). Sizes are
set by the --*-mb budgets; README.md beside this file names each source's
package and license.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import debian_sources as ds  # noqa: E402
import gen_chat  # noqa: E402
import gen_math  # noqa: E402

HELDOUT_MOD = 40  # a document goes to heldout/ when stable_hash(its id) % 40 == 0 (~2.5%)
PACKAGES = ["r-cran-janeaustenr", "jargon-text", "wamerican", "libpython3.11-stdlib", "libc6-dev"]


class Writer:
    """Counts and checksums everything written under one kind."""

    def __init__(self, root):
        self.root = root
        self.files = 0
        self.docs = 0
        self.bytes = 0       # text bytes: what prepare tokenizes
        self.file_bytes = 0  # on disk, JSON included
        self.sha = hashlib.sha256()

    def jsonl(self, rel, records):
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for rec in records:
                line = json.dumps(rec, ensure_ascii=False) + "\n"
                f.write(line)
                self._count(rel, line)
                self.bytes += len(rec["text"].encode("utf-8"))
                self.docs += 1
        self.files += 1

    def text(self, rel, text):
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        self._count(rel, text)
        self.bytes += len(text.encode("utf-8"))
        self.files += 1
        self.docs += 1

    def _count(self, rel, s):
        b = s.encode("utf-8")
        self.file_bytes += len(b)
        self.sha.update(rel.encode("utf-8") + b"\0" + b)

    def summary(self):
        return {"files": self.files, "documents": self.docs, "text_bytes": self.bytes, "file_bytes": self.file_bytes,
                "sha256": self.sha.hexdigest()}


def heldout(doc_id):
    return ds.stable_hash(doc_id) % HELDOUT_MOD == 0


def take(items, budget, size=lambda x: len(x[1].encode("utf-8"))):
    """The leading items whose sizes fit the byte budget (at least one)."""
    out, used = [], 0
    for it in items:
        n = size(it)
        if out and used + n > budget:
            break
        out.append(it)
        used += n
    return out


def build(a, out):
    MB = 1_000_000
    train = {k: Writer(os.path.join(out, k)) for k in ("prose", "code", "math", "chat")}
    held = Writer(os.path.join(out, "heldout"))
    sample = {k: [] for k in train}  # text for the tokenizer, per kind

    # prose: Austen chapters, novels in a fixed order; the Jargon File's essays then entries
    novels = ds.austen_novels(a.debs)
    chapters = [(f"{t}/{i + 1}", text) for t, chs in novels for i, text in enumerate(chs)]

    def austen(doc_id, text):
        title, chapter = doc_id.rsplit("/", 1)
        return {"text": text, "source": f"Jane Austen, {title}, chapter {chapter}"}

    tr = take([c for c in chapters if not heldout(c[0])], a.austen_mb * MB)
    train["prose"].jsonl("austen.jsonl", [austen(i, t) for i, t in tr])
    sample["prose"] += [t for _, t in tr]
    ho_prose = [austen(i, t) for i, t in chapters if heldout(i)]
    essays, entries = ds.jargon(a.debs)
    jdocs = [(f"jargon/{t}", x) for t, x in essays] + [(f"jargon/:{t}:", x) for t, x in entries]
    tr = take([d for d in jdocs if not heldout(d[0])], a.jargon_mb * MB)
    train["prose"].jsonl("jargon.jsonl", [{"text": x, "source": f"Jargon File 4.4.7, {i[7:]}"} for i, x in tr])
    sample["prose"] += [x for _, x in tr]
    ho_prose += [{"text": x, "source": f"Jargon File 4.4.7, {i[7:]}"} for i, x in jdocs if heldout(i)][:40]
    held.jsonl("prose.jsonl", ho_prose)

    # code: modules in a hash order (a spread over the whole library, not just a..c)
    py = ds.python_stdlib_files()
    py_sorted = sorted(py, key=lambda f: (ds.stable_hash(f[0]), f[0]))
    for rel, text in take([f for f in py_sorted if not heldout("py/" + f[0])], a.python_mb * MB):
        train["code"].text(os.path.join("python", rel), text)
        sample["code"].append(text)
    for rel, text in [f for f in py_sorted if heldout("py/" + f[0])][:12]:
        held.text(os.path.join("code", "python", rel), text)
    hdr = sorted(ds.libc_headers(), key=lambda f: (ds.stable_hash(f[0]), f[0]))
    for path, text in take([f for f in hdr if not heldout("c/" + f[0])], a.c_mb * MB):
        train["code"].text(os.path.join("c", os.path.relpath(path, "/usr/include")), text)
        sample["code"].append(text)
    for path, text in [f for f in hdr if heldout("c/" + f[0])][:6]:
        held.text(os.path.join("code", "c", os.path.relpath(path, "/usr/include")), text)

    # math and chat: generated; held-out sets come from another seed
    recs = gen_math.generate(a.seed, int(a.math_mb * MB))
    train["math"].jsonl("math.jsonl", recs)
    sample["math"] += [r["text"] for r in recs]
    held.jsonl("math.jsonl", gen_math.generate(a.seed + 1, 40_000))
    res = gen_chat.Resources.load(a.debs, python_files=py, novels=novels, jargon_entries=entries)
    recs = gen_chat.generate(a.seed, int(a.chat_mb * MB), res)
    train["chat"].jsonl("chat.jsonl", recs)
    sample["chat"] += [r["text"] for r in recs]
    held.jsonl("chat.jsonl", gen_chat.generate(a.seed + 1, 40_000, res))

    # tokenizer sample: every k-th document of each kind, up to its share of the budget
    shares = {"prose": 0.4, "code": 0.3, "math": 0.15, "chat": 0.15}
    with open(os.path.join(out, "tokenizer_sample.txt"), "w", encoding="utf-8") as f:
        for kind, docs in sample.items():
            total = sum(len(d) for d in docs) or 1
            step = max(1, round(total / (shares[kind] * a.tokenizer_mb * MB)))
            for d in docs[::step]:
                f.write(d.rstrip("\n") + "\n")

    summary = {k: w.summary() for k, w in train.items()}
    summary["heldout"] = held.summary()
    info = {
        "seed": a.seed,
        "packages": {p: ds.package_version(p, a.debs) for p in PACKAGES},
        "python_stdlib": os.path.dirname(ds.sysconfig.get_paths()["stdlib"] + "/"),
        "kinds": summary,
    }
    with open(os.path.join(out, "SOURCES.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build/corpus")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--debs", default="build/debs",
                    help="where to look for downloaded .debs (apt-get download) of packages not installed")
    ap.add_argument("--austen-mb", type=float, default=2.5)
    ap.add_argument("--jargon-mb", type=float, default=0.5)
    ap.add_argument("--python-mb", type=float, default=2.0)
    ap.add_argument("--c-mb", type=float, default=0.5)
    ap.add_argument("--math-mb", type=float, default=1.0)
    ap.add_argument("--chat-mb", type=float, default=1.0)
    ap.add_argument("--tokenizer-mb", type=float, default=2.0)
    a = ap.parse_args()

    # build beside the target and swap it in, so a failed run leaves the old corpus whole
    out = os.path.abspath(a.out)
    tmp = out + ".tmp-build"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        summary = build(a, tmp)
    except ds.Missing as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"build_corpus: {e}", file=sys.stderr)
        return 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    for k, s in summary.items():
        print(f"build_corpus: {k:8s} {s['files']:5d} files {s['documents']:6d} documents "
              f"{s['text_bytes'] / 1e6:5.2f} MB of text ({s['file_bytes'] / 1e6:.2f} MB on disk)")
    print(f"build_corpus: wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
