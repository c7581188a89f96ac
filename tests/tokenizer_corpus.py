#!/usr/bin/python3
"""A deterministic, varied test corpus for the tokenizer (tests/tokenizer_exact.py,
bench/tokenizer.py).

One line = one input (spm_encode reads stdin line by line), so no line
contains b"\\n". Everything else may occur. The text is read at run time from
files Debian ships on this machine (licenses, copyright files, man pages,
Python's stdlib, C headers) and mixed with generated material; given the same
installed files and seed, the output is byte-for-byte the same (files are
picked in an order hashed from seed and path, so installing a package changes
little of the text, though the interleaving of lines changes).

Categories (target bytes in CATEGORY_BYTES):
  prose       licenses, /usr/share/doc/*/copyright, man pages (roff stripped), stdlib docstrings
  code        /usr/include/*.h and /usr/lib/python3*/*.py, lines as they are (tabs, indentation)
  whitespace  runs of spaces/tabs, leading/trailing spaces, whitespace-only lines, empty lines
  numbers     digits, long numbers, decimals, dates, hex, non-ASCII digits
  cjk         Chinese/Japanese/Korean: real phrases, Zipf-distributed pools, uniform ranges (incl. Ext B)
  emoji       emoji, skin tones, ZWJ sequences, flags, keycaps, tag sequences, other 4-byte UTF-8
  scripts     combining marks (e + U+0301, zalgo), conjoining Hangul jamo, Devanagari, Arabic, Thai, ...
  nfkc        characters NFKC changes (full-width, ligatures, circled, compatibility jamo, odd spaces)
  specials    literal "▁", "<s>", "</s>", "<unk>", "<0x41>", " ⁇ ", chat markers
  control     U+0001..U+001F (not \\n; \\r included), U+007F, U+0080..U+009F (U+0085), NUL
  invalid     invalid UTF-8: lone continuation bytes, truncated sequences, overlongs,
              UTF-8-encoded surrogates, > U+10FFFF, 0xF5..0xFF, random bytes
  mixed       fragments of all of the above concatenated
  long        a few long lines (prose joined to ~100 KB, one 30 KB CJK run without spaces,
              30 KB of one repeated letter, 8 KB of spaces)

NUL bytes: spm_encode reads lines with std::getline, so NUL is an ordinary
byte of the line (with an identity normaliser it comes out as <0x00> under
byte fallback, or <unk> without). They are included ("control", "invalid",
"mixed"); tokenizer_exact.py checks the same behaviour of the C encoder.
'\\r' is also an ordinary character to spm_encode (not stripped), so it is
included too.

Usage: tokenizer_corpus.py OUT [--seed N] [--scale X] [--stats]
"""
import argparse
import ast
import glob
import gzip
import hashlib
import os
import random
import re
import sys

SEED = 20240611

# Target bytes per category at scale 1.0 (total ~1.45 MB).
CATEGORY_BYTES = {
    "prose": 420_000,
    "code": 260_000,
    "whitespace": 50_000,
    "numbers": 50_000,
    "cjk": 110_000,
    "emoji": 60_000,
    "scripts": 70_000,
    "nfkc": 40_000,
    "specials": 20_000,
    "control": 30_000,
    "invalid": 40_000,
    "mixed": 100_000,
    "long": 180_000,
}

# ----------------------------------------------------------------- real text


def _read_text(path, limit=400_000):
    """File contents as str, or None when unreadable / not UTF-8."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read(limit)
        else:
            with open(path, "rb") as f:
                raw = f.read(limit)
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def _lines(text):
    """Splits on \\n only (keeps \\r, \\x0b, \\x0c, U+2028: they are data)."""
    return text.split("\n")


_ROFF_ESC = re.compile(r"\\f[BIRP1-4]|\\f\(..|\\f\[[^\]]*\]|\\\(..|\\\[[^\]]*\]|\\[-&e|^ ]|\\s[-+]?\d")


def _man_text(text):
    out = []
    for l in _lines(text):
        if l.startswith((".", "'")):
            # keep the argument text of a few macros that carry prose
            m = re.match(r"\.(?:SH|SS|TP|IP|B|I|BR|IR|RB|RI|BI|IB)\s+(.*)", l)
            if not m:
                continue
            l = m.group(1).replace('"', "")
        out.append(_ROFF_ESC.sub("", l))
    return out


def _docstrings(path):
    text = _read_text(path, 2_000_000)
    if text is None:
        return []
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node, clean=True)
            if d:
                out.extend(_lines(d))
    return out


def _take_from_files(rng, paths, budget, extract, per_file):
    """Lines from files until budget bytes; at most per_file bytes each, a contiguous window
    from each file. The file order and windows come from a hash of (seed, path), so a package
    installed or removed later changes only its own lines, not the choice of every other file."""
    salt = str(rng.random())
    key = lambda p: hashlib.sha256(f"{salt}:{p}".encode()).digest()
    out, total = [], 0
    for p in sorted(set(paths), key=key):
        if total >= budget:
            break
        lines = extract(p)
        if not lines:
            continue
        start = int.from_bytes(key(p)[:8], "little") % len(lines)  # a window starting anywhere
        got = 0
        for l in lines[start:] + lines[:start]:
            b = l.encode("utf-8")
            if b"\n" in b:
                continue
            out.append(b)
            got += len(b) + 1
            if got >= per_file or total + got >= budget:
                break
        total += got
    return out


def prose(rng, budget):
    def plain(p):
        t = _read_text(p)
        return _lines(t) if t is not None else None

    def man(p):
        t = _read_text(p)
        return _man_text(t) if t is not None else None

    pyfiles = glob.glob("/usr/lib/python3*/*.py")
    parts = [
        (glob.glob("/usr/share/common-licenses/*"), 0.25, plain, 30_000),
        (glob.glob("/usr/share/doc/*/copyright"), 0.30, plain, 6_000),
        (glob.glob("/usr/share/man/man[1-8]/*.gz"), 0.25, man, 8_000),
        (pyfiles, 0.20, _docstrings, 8_000),
    ]
    out = []
    for paths, share, fn, per in parts:
        out += _take_from_files(rng, paths, int(budget * share), fn, per)
    return out


def code(rng, budget):
    def plain(p):
        t = _read_text(p)
        return _lines(t) if t is not None else None

    out = _take_from_files(rng, glob.glob("/usr/include/*.h") + glob.glob("/usr/include/*/*.h"),
                           budget // 2, plain, 6_000)
    out += _take_from_files(rng, glob.glob("/usr/lib/python3*/*.py") + glob.glob("/usr/lib/python3*/*/*.py"),
                            budget - budget // 2, plain, 6_000)
    return out


# ----------------------------------------------------------------- generated text

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no out up more "
         "model token merge piece byte vocabulary score encode decode normalize whitespace unicode").split()

CJK_PHRASES = [
    "我们今天去公园散步。", "中华人民共和国成立于1949年10月1日。", "机器学习是人工智能的一个分支。",
    "请问火车站怎么走？", "这个问题很有意思，我们需要仔细研究一下。", "春眠不觉晓，处处闻啼鸟。",
    "他说：“你好，世界！”", "北京大学（Peking University）位于海淀区。", "繁體中文與簡體中文不同。",
    "今日はいい天気ですね。", "東京都渋谷区で会いましょう。", "私は日本語を勉強しています。",
    "吾輩は猫である。名前はまだ無い。", "カタカナとひらがなを混ぜて書く。", "コンピューターのソフトウェア",
    "「こんにちは」と彼女は言った。", "ｶﾀｶﾅ（半角）とカタカナ（全角）",
    "안녕하세요, 만나서 반갑습니다.", "대한민국의 수도는 서울입니다.", "한국어 형태소 분석은 어렵다.",
    "오늘 날씨가 정말 좋네요!", "훈민정음 해례본", "ㄱㄴㄷㄹ ㅏㅑㅓㅕ",
]

OTHER_PHRASES = [
    "Съешь же ещё этих мягких французских булок, да выпей чаю.", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "مرحبا بالعالم، هذا اختبار.", "שָׁלוֹם עֲלֵיכֶם", "नमस्ते दुनिया, यह एक परीक्षण है।", "क्षत्रिय ज्ञान श्री",
    "สวัสดีครับ ยินดีที่ได้รู้จัก", "Tiếng Việt có dấu phức tạp: người, được, những.",
    "Größenwahn über Äpfel – straße", "Ça a déjà été « naïve » façade, cœur, œuvre.", "İstanbul ılık ışık",
    "Zażółć gęślą jaźń", "ئۇيغۇرچە", "தமிழ் மொழி", "ქართული ენა", "Հայերեն", "አማርኛ", "ᚠᚢᚦᚨᚱᚲ",
]

EMOJI_SEQS = [
    "👨\u200d👩\u200d👧\u200d👦", "👩🏽\u200d💻", "🏳️\u200d🌈", "🧑🏿\u200d🤝\u200d🧑🏻", "❤️\u200d🔥",
    "🇯🇵", "🇺🇸", "🇩🇪🇫🇷", "1️⃣", "#️⃣", "*️⃣", "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "👍🏻", "👍🏼", "👍🏽", "👍🏾", "👍🏿", "🙂", "😀", "🤖", "🦀", "🐍", "☕", "✌️", "☺", "☺️", "™️",
    "👁️\u200d🗨️", "🧔\u200d♀️", "🏃🏾\u200d♂️\u200d➡️", "😶\u200d🌫️",
]

ASTRAL = [(0x10000, 0x1007F), (0x1D400, 0x1D7FF), (0x20000, 0x2A6DF), (0x1F0A0, 0x1F0FF), (0x1F300, 0x1FAFF),
          (0x10330, 0x1034F), (0x1D100, 0x1D1FF), (0xF0000, 0xF00FF), (0x10FF00, 0x10FFFD), (0xE0001, 0xE007F)]

NFKC_CHARS = ("ＡＢＣＸＹＺａｂｃｘｙｚ０１２３４５６７８９！？＃＄％＆（）［］｛｝＠～　"
              "ｱｲｳｴｵｶｷｸｹｺﾞﾟｰ" "ﬁﬂﬀﬃﬄﬅﬆ" "①②③⑩⑳⑴⑵⒜⒝ⓐⓩ" "㍻㌀㎏㎞㏄㍿" "²³¹½¼¾⅓⅞" "ⅠⅡⅫⅷⅿ" "ℌℍℕ™℡℃℉"
              "ſµÅΩK" "ǅǈǋ" "ﷺ﷽" "ㄱㄲㄳㅏㅐㅢ" "ꭜ" "\u00a0\u2000\u2001\u2002\u2003\u2009\u200a\u202f\u205f\u3000"
              "\u200b\u200c\u200d\u2060\ufeff\u00ad\u2028\u2029" "\ufffd\ufffc" "…‥" "″‴" "ﹰﹱﹲ" "𝐀𝐁𝐂𝑎𝒃𝔸𝕏𝟎𝟗")

SPECIALS = ["▁", "▁▁", "▁hello", "hello▁world", "<s>", "</s>", "<unk>", "<pad>", "<0x41>", "<0x00>", "<0xFF>",
            " ⁇ ", "⁇", "<|system|>", "<|user|>", "<|assistant|>", "[INST]", "[/INST]", "<<SYS>>",
            "<|endoftext|>", "\\n", "\\x00", "&amp;", "%20"]


def _words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _fill(gen, rng, budget):
    out, total = [], 0
    while total < budget:
        b = gen(rng)
        if isinstance(b, str):
            b = b.encode("utf-8", "surrogatepass")
        b = b.replace(b"\n", b"")
        out.append(b)
        total += len(b) + 1
    return out


def whitespace(rng):
    k = rng.randrange(10)
    sp = lambda: rng.choice([" ", "  ", "   ", "\t", "\t\t", " \t", "\t ", " " * rng.randrange(4, 40)])
    if k == 0:
        return ""
    if k == 1:
        return sp() * rng.randrange(1, 4)
    if k == 2:
        return sp() + _words(rng, rng.randrange(1, 12)) + sp()
    if k == 3:
        return "".join(w + sp() for w in _words(rng, rng.randrange(2, 10)).split())
    if k == 4:
        return "\t" * rng.randrange(1, 6) + "if (x) {" + " " * rng.randrange(0, 9) + "return y;\t}"
    if k == 5:
        return rng.choice(["\x0b", "\x0c", "\u00a0", "\u3000", "\u2003", "\u200b", "▁"]).join(
            _words(rng, rng.randrange(2, 8)).split())
    if k == 6:
        return " " + rng.choice(WORDS)
    if k == 7:
        return rng.choice(WORDS) + " "
    if k == 8:
        return " " * rng.randrange(1, 200)
    return "".join(rng.choice(" \t\x0b\x0ca") for _ in range(rng.randrange(1, 60)))


def numbers(rng):
    k = rng.randrange(12)
    d = lambda n: "".join(rng.choice("0123456789") for _ in range(n))
    if k == 0:
        return d(rng.randrange(1, 60))
    if k == 1:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randrange(0, 12)}f}"
    if k == 2:
        return f"{rng.getrandbits(64):,}"
    if k == 3:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T" \
               f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z"
    if k == 4:
        return f"0x{rng.getrandbits(rng.choice([8, 32, 64, 128])):x} 0b{rng.getrandbits(16):b} {rng.random():.3e}"
    if k == 5:
        return f"+1 ({d(3)}) {d(3)}-{d(4)}, {rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
    if k == 6:  # non-ASCII digits
        base = rng.choice([0x660, 0x6F0, 0x966, 0xE50, 0xFF10, 0x1D7CE, 0x2070])
        return "".join(chr(base + int(c)) if base != 0x2070 or c not in "123" else c for c in d(rng.randrange(1, 20)))
    if k == 7:
        return " ".join(d(rng.randrange(1, 6)) for _ in range(rng.randrange(1, 20)))
    if k == 8:
        return f"Total: ${rng.randrange(10**9):,}.{d(2)} ({rng.randrange(100)}%) v{rng.randrange(10)}.{rng.randrange(30)}.{rng.randrange(100)}"
    if k == 9:
        return _words(rng, 3) + d(rng.randrange(1, 12)) + _words(rng, 2) + d(3) + "th"
    if k == 10:
        return "π ≈ 3.14159265358979323846264338327950288419716939937510582097494459230781640628620899862803482534211706798"[: rng.randrange(5, 100)]
    return f"{-rng.randrange(10**rng.randrange(1, 20))} {rng.random() * 10 ** rng.randrange(-30, 30)!r}"


def make_cjk(seed_rng):
    # Zipf-distributed pools, so the corpus has repeats BPE can learn from.
    pools = {
        "han": [chr(seed_rng.randrange(0x4E00, 0x9FFF)) for _ in range(1200)],
        "hira": [chr(c) for c in range(0x3041, 0x3097)],
        "kata": [chr(c) for c in range(0x30A1, 0x30FB)],
        "hangul": [chr(seed_rng.randrange(0xAC00, 0xD7A4)) for _ in range(600)],
    }
    weights = {k: [1.0 / (i + 1) for i in range(len(v))] for k, v in pools.items()}

    def gen(rng):
        k = rng.randrange(8)
        if k <= 1:
            return "".join(rng.choice(CJK_PHRASES) for _ in range(rng.randrange(1, 5)))
        if k == 2:  # uniform, all CJK blocks incl. 4-byte Extension B and compatibility ideographs
            rngs = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0xF900, 0xFAFF), (0xAC00, 0xD7A3),
                    (0x3040, 0x30FF), (0x3100, 0x312F), (0x3000, 0x303F), (0xFF00, 0xFFEF)]
            return "".join(chr(rng.randrange(*rng.choice(rngs))) for _ in range(rng.randrange(1, 40)))
        if k == 3:  # Korean: syllables separated by spaces
            return " ".join("".join(rng.choices(pools["hangul"], weights["hangul"], k=rng.randrange(1, 5)))
                            for _ in range(rng.randrange(1, 12))) + rng.choice([".", "?", "!", ""])
        if k == 4:  # Japanese: kanji + kana
            s = ""
            for _ in range(rng.randrange(2, 12)):
                p = rng.choice(["han", "hira", "hira", "kata"])
                s += "".join(rng.choices(pools[p], weights[p], k=rng.randrange(1, 4)))
            return s + rng.choice(["。", "、", "！", "？", ""])
        if k == 5:  # mixed with ASCII
            return rng.choice(CJK_PHRASES) + " " + _words(rng, 3) + " " + "".join(
                rng.choices(pools["han"], weights["han"], k=5))
        return "".join(rng.choices(pools["han"], weights["han"], k=rng.randrange(2, 60))) + rng.choice(
            ["。", "，", "", "！"])
    return gen


def emoji(rng):
    k = rng.randrange(6)
    if k <= 1:
        return "".join(rng.choice(EMOJI_SEQS) for _ in range(rng.randrange(1, 12)))
    if k == 2:
        return _words(rng, 4) + " " + rng.choice(EMOJI_SEQS) + " " + _words(rng, 3) + rng.choice(EMOJI_SEQS)
    if k == 3:  # random base + random skin tone / ZWJ glue / VS16
        s = ""
        for _ in range(rng.randrange(1, 10)):
            s += chr(rng.randrange(0x1F300, 0x1FAFF))
            r = rng.random()
            if r < 0.3:
                s += chr(rng.randrange(0x1F3FB, 0x1F400))
            elif r < 0.5:
                s += "\u200d"
            elif r < 0.6:
                s += "\ufe0f"
        return s
    if k == 4:  # other 4-byte UTF-8
        return "".join(chr(rng.randrange(*rng.choice(ASTRAL))) for _ in range(rng.randrange(1, 30)))
    return "".join(chr(rng.randrange(0x1F1E6, 0x1F200)) for _ in range(rng.randrange(1, 9)))


def scripts(rng):
    k = rng.randrange(9)
    if k == 0:  # e + combining acute etc. (NFD text)
        return " ".join(rng.choice(["e\u0301", "a\u0300", "o\u0308", "n\u0303", "c\u0327", "u\u031b\u0309",
                                    "A\u030a", "i\u0302", "e\u0301\u0323"]) + rng.choice(WORDS)
                        for _ in range(rng.randrange(1, 10)))
    if k == 1:  # zalgo
        return "".join(c + "".join(chr(rng.randrange(0x300, 0x370)) for _ in range(rng.randrange(0, 8)))
                       for c in _words(rng, rng.randrange(1, 4)))
    if k == 2:  # conjoining Hangul jamo (L V [T])
        s = ""
        for _ in range(rng.randrange(1, 15)):
            s += chr(rng.randrange(0x1100, 0x1113)) + chr(rng.randrange(0x1161, 0x1176))
            if rng.random() < 0.5:
                s += chr(rng.randrange(0x11A8, 0x11C3))
            if rng.random() < 0.2:
                s += " "
        return s
    if k == 3:  # Devanagari syllables with virama/matras/nukta
        cons = [chr(c) for c in range(0x915, 0x93A)]
        marks = ["\u093e", "\u093f", "\u0940", "\u0941", "\u0947", "\u094b", "\u094d", "\u0902", "\u093c", ""]
        return " ".join("".join(rng.choice(cons) + rng.choice(marks) for _ in range(rng.randrange(1, 5)))
                        for _ in range(rng.randrange(1, 8))) + "।"
    if k == 4:  # Arabic with harakat, Hebrew with niqqud
        if rng.random() < 0.5:
            letters = [chr(c) for c in range(0x628, 0x64B)]
            marks = [chr(c) for c in range(0x64B, 0x653)] + [""] * 4
        else:
            letters = [chr(c) for c in range(0x5D0, 0x5EB)]
            marks = [chr(c) for c in range(0x5B0, 0x5BD)] + [""] * 4
        return " ".join("".join(rng.choice(letters) + rng.choice(marks) for _ in range(rng.randrange(1, 7)))
                        for _ in range(rng.randrange(1, 8)))
    if k == 5:  # Thai with tone marks
        return "".join(chr(rng.randrange(0xE01, 0xE2F)) + rng.choice(["", "\u0e48", "\u0e49", "\u0e31", "\u0e34"])
                       for _ in range(rng.randrange(1, 30)))
    if k == 6:  # Vietnamese NFD vs NFC
        import unicodedata
        s = rng.choice(OTHER_PHRASES)
        return unicodedata.normalize(rng.choice(["NFC", "NFD", "NFKD"]), s)
    if k == 7:
        return rng.choice(OTHER_PHRASES) + " " + rng.choice(OTHER_PHRASES)
    # random code points from the BMP (valid scalar values, no surrogates, no \n)
    s = ""
    for _ in range(rng.randrange(1, 30)):
        c = rng.randrange(0x20, 0x10000)
        if 0xD800 <= c < 0xE000:
            c = 0xE000
        s += chr(c)
    return s


def nfkc(rng):
    k = rng.randrange(3)
    if k == 0:
        return "".join(rng.choice(NFKC_CHARS) for _ in range(rng.randrange(1, 30)))
    if k == 1:
        return _words(rng, 3) + "".join(rng.choice(NFKC_CHARS) for _ in range(3)) + _words(rng, 3)
    return rng.choice(NFKC_CHARS).join(_words(rng, rng.randrange(2, 8)).split())


def specials(rng):
    k = rng.randrange(3)
    if k == 0:
        return "".join(rng.choice(SPECIALS) for _ in range(rng.randrange(1, 8)))
    if k == 1:
        return rng.choice(SPECIALS).join(_words(rng, rng.randrange(2, 6)).split())
    return rng.choice(SPECIALS) + " " + _words(rng, 3) + rng.choice(SPECIALS)


CONTROL = [chr(c) for c in range(0x00, 0x20) if c != 0x0A] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]


def control(rng):
    k = rng.randrange(5)
    if k == 0:
        return "".join(rng.choice(CONTROL) for _ in range(rng.randrange(1, 20)))
    if k == 1:
        return rng.choice(CONTROL).join(_words(rng, rng.randrange(2, 8)).split())
    if k == 2:
        return _words(rng, 4) + "\r"  # CRLF text read as lines
    if k == 3:
        return rng.choice(["\x00", "\x01", "\x1b[31m", "\x7f", "\u0085", "\r", "\x1f"]) + _words(rng, 3)
    return "".join(rng.choice(CONTROL) + rng.choice(WORDS)[:3] for _ in range(rng.randrange(1, 10)))


INVALID = [b"\x80", b"\xbf", b"\x80\x80", b"\xc2", b"\xe4\xb8", b"\xf0\x9f", b"\xf0\x9f\x98", b"\xc0\x80", b"\xc1\xbf",
           b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xf0\x80\x80\x80", b"\xf0\x8f\xbf\xbf", b"\xed\xa0\x80",
           b"\xed\xbf\xbf", b"\xed\xa0\xbd\xed\xb8\x80", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80",
           b"\xfc\x84\x80\x80\x80\x80", b"\xfe", b"\xff", b"\xfe\xff", b"\xff\xfe", b"\xc3", b"\xc3\x28", b"\xe2\x82\x28",
           b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28", b"\xef\xbf\xbe", b"\xef\xbf\xbf", b"\xf4\x8f\xbf\xbf"]


def invalid(rng):
    k = rng.randrange(5)
    w = lambda n: _words(rng, n).encode()
    if k == 0:
        return b"".join(rng.choice(INVALID) for _ in range(rng.randrange(1, 10)))
    if k == 1:
        return rng.choice(INVALID).join(w(rng.randrange(2, 8)).split(b" "))
    if k == 2:  # a valid multi-byte character cut short, then text
        s = rng.choice(["中", "😀", "é", "ह", "𝐀", "한"]).encode()
        return w(2) + s[: rng.randrange(1, len(s))] + w(2) + s[rng.randrange(1, len(s)):]
    if k == 3:  # random bytes (no \n)
        return bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randrange(1, 80)))
    # random high bytes only
    return bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 40)))


def mixed_gen(pieces):
    def gen(rng):
        return b"".join(rng.choice(pieces) for _ in range(rng.randrange(2, 12)))
    return gen


def long_lines(rng, prose_lines, cjk_gen, budget):
    out = []
    joined = b" ".join(l.strip() for l in prose_lines if l.strip())
    n = min(len(joined), max(budget - 70_000, 1000))
    out.append(joined[:n])
    out.append("".join(cjk_gen(rng).replace(" ", "") for _ in range(2000)).encode()[:30_000])
    out.append(b"a" * 30_000)
    out.append(b" " * 8_000)
    return out


# ----------------------------------------------------------------- assembly


def generate(seed=SEED, scale=1.0):
    """Returns [(category, line bytes)], in a seeded interleaved order."""
    rng = random.Random(seed)
    B = {k: int(v * scale) for k, v in CATEGORY_BYTES.items()}
    cat = {}
    cat["prose"] = prose(random.Random(rng.random()), B["prose"])
    cat["code"] = code(random.Random(rng.random()), B["code"])
    cjk_gen = make_cjk(random.Random(rng.random()))
    for name, gen in [("whitespace", whitespace), ("numbers", numbers), ("cjk", cjk_gen), ("emoji", emoji),
                      ("scripts", scripts), ("nfkc", nfkc), ("specials", specials), ("control", control),
                      ("invalid", invalid)]:
        cat[name] = _fill(gen, random.Random(rng.random()), B[name])
    frag_rng = random.Random(rng.random())
    pieces = []
    for name, lines in cat.items():
        for l in frag_rng.sample(lines, min(300, len(lines))):
            if l:
                a = frag_rng.randrange(len(l))
                pieces.append(l[a:a + frag_rng.randrange(1, 40)])  # cuts may split UTF-8 sequences: intended
    cat["mixed"] = _fill(mixed_gen(pieces), random.Random(rng.random()), B["mixed"])
    cat["long"] = long_lines(random.Random(rng.random()), cat["prose"], cjk_gen, B["long"])
    # Interleave categories (documents stay contiguous in short runs).
    tagged = []
    for name in CATEGORY_BYTES:
        lines = cat[name]
        i = 0
        while i < len(lines):
            n = rng.randrange(1, 30)
            tagged.append([(name, l) for l in lines[i:i + n]])
            i += n
    rng.shuffle(tagged)
    out = [x for run in tagged for x in run]
    for _, l in out:
        assert b"\n" not in l
    return out


def training_text(corpus, kind, seed=SEED):
    """Training subsets (bytes, newline-separated) for the trained models:
    'tiny'  lower-case letters, space and ,.: only (so a ~300-piece byte-fallback vocab has
            room for merges; everything else in the corpus falls back to bytes);
    'mid'   prose, code, whitespace, numbers, specials, real phrases: a small character set, so
            a ~1000 vocab without byte fallback covers it and the rest becomes <unk>;
    'big'   mid plus CJK, emoji, scripts, nfkc and a little control text."""
    rng = random.Random(seed * 31 + len(kind))
    by = {}
    for c, l in corpus:
        by.setdefault(c, []).append(l)
    if kind == "tiny":
        lines = []
        for l in by["prose"][:3000]:
            t = re.sub(rb"[^a-z ,.]", b"", l.lower())
            t = re.sub(rb" +", b" ", t).strip()
            if t:
                lines.append(t)
        return b"\n".join(lines) + b"\n"
    phrases = [p.encode() for p in CJK_PHRASES[:6] + OTHER_PHRASES[:3]]
    take = dict(prose=120_000, code=60_000, whitespace=8_000, numbers=10_000, specials=3_000)
    if kind == "big":
        take.update(prose=200_000, code=100_000, cjk=80_000, emoji=20_000, scripts=30_000, nfkc=10_000,
                    control=3_000)
    lines = []
    for c, budget in take.items():
        got = 0
        for l in by[c]:
            if got >= budget:
                break
            if len(l) > 4000:  # spm_train skips lines over max_sentence_length
                continue
            lines.append(l)
            got += len(l) + 1
    if kind == "mid":
        lines += phrases * 5
    if kind == "big":
        # Drop lines with characters seen fewer than 5 times (the uniform CJK/BMP samples), so the
        # required characters leave room for merges in an ~8000 vocabulary.
        count = {}
        for l in lines:
            for ch in l.decode("utf-8", "replace"):
                count[ch] = count.get(ch, 0) + 1
        lines = [l for l in lines if all(count[ch] >= 5 for ch in l.decode("utf-8", "replace"))]
    rng.shuffle(lines)
    return b"\n".join(lines) + b"\n"


def write(path, corpus):
    with open(path, "wb") as f:
        for _, l in corpus:
            f.write(l + b"\n")


def stats(corpus):
    s = {}
    for c, l in corpus:
        n, b = s.get(c, (0, 0))
        s[c] = (n + 1, b + len(l) + 1)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--stats", action="store_true")
    a = ap.parse_args()
    corpus = generate(a.seed, a.scale)
    write(a.out, corpus)
    if a.stats:
        total = 0
        for c, (n, b) in stats(corpus).items():
            print(f"{c:12s} {n:7d} lines {b:9d} bytes", file=sys.stderr)
            total += b
        print(f"{'total':12s} {len(corpus):7d} lines {total:9d} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
