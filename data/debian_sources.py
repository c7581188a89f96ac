"""debian_sources.py — readers for the real text the demo corpus takes from
Debian packages (see README.md beside this file for packages and licenses).

Every reader returns its items in a fixed order, so what build_corpus.py
writes depends only on the package versions installed, never on directory
listing order, hash seeds or the time.
"""
import ast
import gzip
import hashlib
import io
import os
import re
import struct
import subprocess
import sysconfig
import tarfile
import zlib

AUSTEN_RDB = "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
JARGON_TXT = "/usr/share/doc/jargon-text/jargon.txt.gz"
WORDS = "/usr/share/dict/american-english"
# Austen's novels in the order the corpus takes them (titles as the package spells the first line)
AUSTEN_ORDER = ["PRIDE AND PREJUDICE", "PERSUASION", "EMMA", "SENSE AND SENSIBILITY", "NORTHANGER ABBEY",
                "MANSFIELD PARK"]
AUSTEN_TITLES = {"PRIDE AND PREJUDICE": "Pride and Prejudice", "PERSUASION": "Persuasion", "EMMA": "Emma",
                 "SENSE AND SENSIBILITY": "Sense and Sensibility", "NORTHANGER ABBEY": "Northanger Abbey",
                 "MANSFIELD PARK": "Mansfield Park"}


class Missing(Exception):
    """A Debian package the corpus needs is not installed."""


def stable_hash(s):
    """An integer from a string, the same on every run (unlike hash())."""
    return int.from_bytes(hashlib.sha1(s.encode("utf-8")).digest()[:8], "big")


def package_version(pkg, debs_dir=None):
    """The installed version, else the version of its .deb in debs_dir (as
    "VERSION (.deb)": that is the file the readers fall back to), else None."""
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", pkg], capture_output=True, text=True)
    if p.returncode == 0 and p.stdout.startswith("install ok installed "):
        return p.stdout.split()[-1]
    for deb in _debs(debs_dir, pkg):
        p = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True)
        if p.returncode == 0:
            return p.stdout.strip() + " (.deb)"
    return None


def _debs(debs_dir, pkg):
    """The downloaded pkg_*.deb files (apt-get download) in debs_dir, in name order."""
    if not debs_dir or not os.path.isdir(debs_dir):
        return []
    return [os.path.join(debs_dir, n) for n in sorted(os.listdir(debs_dir))
            if n.startswith(pkg + "_") and n.endswith(".deb")]


def _from_deb(debs_dir, pkg, member):
    """The bytes of one file inside a downloaded pkg_*.deb (apt-get download), or None."""
    for deb in _debs(debs_dir, pkg):
        p = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True)
        if p.returncode != 0:
            continue
        with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tf:
            try:
                return tf.extractfile("." + member).read()
            except KeyError:
                return None
    return None


def _read(path, pkg, debs_dir):
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()
    data = _from_deb(debs_dir, pkg, path)
    if data is None:
        raise Missing(f"{path} not found: install the Debian package {pkg}, or put its .deb "
                      f"(apt-get download {pkg}) in {debs_dir or 'a --debs directory'} "
                      f"('sh scripts/setup.sh demo' does whichever of the two the demo uses)")
    return data


# ---------------------------------------------------------------- Jane Austen

def _r_strings(blob):
    """A character vector from one R serialization (format 2 or 3, XDR): the
    janeaustenr data objects are plain STRSXPs of lines."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    q = 2
    version = struct.unpack(">i", blob[q:q + 4])[0]
    q += 12
    if version == 3:
        n = struct.unpack(">i", blob[q:q + 4])[0]
        q += 4 + n
    flags, length = struct.unpack(">ii", blob[q:q + 8])
    q += 8
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"expected a character vector, got SEXP type {flags & 0xFF}")
    out = []
    for _ in range(length):
        f, n = struct.unpack(">ii", blob[q:q + 8])
        q += 8
        if n < 0:  # NA_character_
            out.append("")
            continue
        raw = blob[q:q + n]
        q += n
        # CHARSXP levels: bit 2 LATIN1, bit 3 UTF8, bit 6 ASCII (R's Defn.h)
        out.append(raw.decode("latin-1" if (f >> 12) & 4 else "utf-8"))
    return out


def austen_novels(debs_dir=None):
    """[(title, [chapter text, ...])] in AUSTEN_ORDER. The package's lazy-load
    database is a run of (u32 length, zlib stream) records, one per novel; a
    novel is a vector of lines, chapters start at a "CHAPTER n" line."""
    db = _read(AUSTEN_RDB, "r-cran-janeaustenr", debs_dir)
    novels, p = {}, 0
    while p < len(db):
        d = zlib.decompressobj()
        blob = d.decompress(db[p + 4:])
        p = len(db) - len(d.unused_data)
        lines = _r_strings(blob)
        key = lines[0].strip().upper()
        chapters, cur = [], None
        for line in lines:
            if re.match(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$", line.strip()):
                if cur:
                    chapters.append(cur)
                cur = [line.strip()]
            elif cur is not None:
                cur.append(line.rstrip())
        if cur:
            chapters.append(cur)
        texts = []
        for ch in chapters:
            t = "\n".join(ch).strip()
            t = re.sub(r"\n{3,}", "\n\n", t)
            texts.append(t + "\n")
        novels[key] = texts
    missing = [k for k in AUSTEN_ORDER if k not in novels]
    if missing:
        raise ValueError(f"{AUSTEN_RDB}: novels not found: {missing}")
    return [(AUSTEN_TITLES[k], novels[k]) for k in AUSTEN_ORDER]


def sentences(text):
    """Rough sentence split of wrapped prose: paragraphs unwrapped, split after . ! ?"""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        # no split after a title ("Mr. Darcy")
        parts = re.split(r'(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])\s+(?=[A-Z"\u201c])', para)
        out.extend(s.strip() for s in parts if s.strip())
    return out


# ---------------------------------------------------------------- Jargon File

def jargon(debs_dir=None):
    """(chapters, entries): the Jargon File's prose chapters and appendices as
    [(title, text)], and its glossary as [(term, text)], in file order."""
    raw = gzip.decompress(_read(JARGON_TXT, "jargon-text", debs_dir)).decode("utf-8")
    lines = raw.replace("\u00a0", " ").split("\n")  # headings use no-break spaces
    starts = [i for i, l in enumerate(lines) if re.match(r"^(Chapter \d+\.|Appendix [A-C]\.|Glossary$|Bibliography$)", l)]
    chapters, entries = [], []
    for k, i in enumerate(starts):
        j = starts[k + 1] if k + 1 < len(starts) else len(lines)
        title = lines[i].strip()
        body = lines[i + 1:j]
        if title == "Glossary":
            entries = _jargon_entries(body)
        elif title != "Bibliography":
            text = _dedent(body)
            if "│" in text or "┌" in text:  # box-drawn tables read badly as prose: keep the paragraphs only
                text = "\n\n".join(p for p in text.split("\n\n") if "│" not in p and "─" not in p)
            chapters.append((title, title + "\n\n" + text.strip() + "\n"))
    return chapters, entries


def _dedent(lines):
    return re.sub(r"\n{3,}", "\n\n", "\n".join(l[3:] if l.startswith("   ") else l for l in lines))


def _jargon_entries(body):
    out, cur, term = [], [], None
    for line in body:
        m = re.match(r"^   :(.+?):(.*)$", line)
        if m:
            if term:
                out.append((term, _dedent(cur).strip()))
            term, cur = m.group(1), [line]
        elif term:
            cur.append(line)
    if term:
        out.append((term, _dedent(cur).strip()))
    # drop cross-reference stubs ("See {foo}.") as documents; the chat generator filters again
    return [(t, re.sub(r"\{([^{}]*)\}", r"\1", x) + "\n") for t, x in out]


def jargon_definition(entry_text):
    """The first sense of an entry as one line: the head line, pronunciation
    and bracketed etymology skipped, or None for a bare cross-reference."""
    paras = [" ".join(p.split()) for p in entry_text.split("\n\n")][1:]
    for p in paras:
        if not p or p.startswith("[") or p.startswith("/"):
            continue
        p = re.sub(r"^1\.\s*", "", p)
        if re.match(r"^(See|Syn\.|Same as|Compare)\b", p) or len(p) < 25:
            return None
        return p
    return None


# ---------------------------------------------------------------- words

def words(debs_dir=None):
    """Lower-case alphabetic words (3..12 letters) of wamerican, sorted."""
    text = _read(WORDS, "wamerican", debs_dir).decode("utf-8")
    return sorted({w for w in text.split("\n") if re.fullmatch(r"[a-z]{3,12}", w)})


# ---------------------------------------------------------------- code

_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "pydoc_data",
              "_bundled", "lib2to3"}


def python_stdlib_files(max_bytes=64 * 1024):
    """The interpreter's own standard library .py files (tests, generated
    data and vendored wheels excluded), as [(relative path, text)] sorted by
    path."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            if size < 512 or size > max_bytes:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError:
                continue
            out.append((os.path.relpath(path, root), text))
    return sorted(out)


def libc_headers(max_bytes=64 * 1024):
    """The C headers of libc6-dev (from dpkg's file list), as [(path, text)]
    sorted by path."""
    p = subprocess.run(["dpkg", "-L", "libc6-dev"], capture_output=True, text=True)
    if p.returncode != 0:
        raise Missing("libc6-dev is not installed (make setup installs build-essential)")
    out = []
    for path in sorted(set(p.stdout.split("\n"))):
        if not path.endswith(".h") or not os.path.isfile(path) or os.path.islink(path):
            continue
        if not 256 <= os.path.getsize(path) <= max_bytes:
            continue
        with open(path, "rb") as f:
            raw = f.read()
        try:
            out.append((path, raw.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return out


def python_docstrings(files):
    """[(module, function, signature, summary)] for public module-level
    functions with a one-paragraph docstring summary, in file order."""
    out = []
    for rel, text in files:
        if "/" in rel and not rel.endswith("__init__.py"):
            mod = rel[:-3].replace("/", ".")
        else:
            mod = rel[:-3].replace("/__init__", "").replace("/", ".")
        if any(part.startswith("_") for part in mod.split(".")):
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            summary = " ".join(doc.split("\n\n")[0].split())
            if not 20 <= len(summary) <= 300 or summary.startswith(node.name + "("):
                continue
            args = [a.arg for a in node.args.posonlyargs + node.args.args]
            if node.args.vararg:
                args.append("*" + node.args.vararg.arg)
            args += [a.arg for a in node.args.kwonlyargs]
            if node.args.kwarg:
                args.append("**" + node.args.kwarg.arg)
            out.append((mod, node.name, f"{node.name}({', '.join(args)})", summary))
    return out
