#!/usr/bin/python3
"""gen_chat.py — short dialogues in the JetMoE-chat (Zephyr) format:

    <|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n{reply}</s>\\n ...

Templates cover arithmetic, unit conversions, grade-school word problems
(gen_math.py), English words (the wamerican word list), hacker-jargon
definitions (the Jargon File), Python standard-library functions (their
docstrings) and Jane Austen's novels (which book a line is from, what comes
next). Each answer is computed or copied from the source, so it is right.
Everything follows from the seed.

    gen_chat.py --out chat.jsonl [--seed 1] [--bytes 1000000] [--debs DIR]

Each JSONL record: {"text": <rendered dialogue>, "messages": [{"role", "content"}, ...]}.
Templates whose Debian package is missing are left out (with a note).
"""
import random
import sys

import debian_sources as ds
import gen_math

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a friendly and concise assistant.",
    "You are JetMoE, a small helpful assistant. Answer briefly and accurately.",
    "You are a careful tutor. Show your working.",
    "You are a helpful assistant who answers questions about English words, programming and arithmetic.",
]


class Resources:
    """What the source-based templates draw from; any field may be empty."""

    def __init__(self, jargon_defs=(), words=(), docs=(), austen=()):
        self.jargon_defs = list(jargon_defs)  # [(term, one-line definition)]
        self.words = list(words)              # sorted lower-case words
        self.docs = list(docs)                # [(module, function, signature, summary)]
        self.austen = list(austen)            # [(title, [chapter text])]

    @staticmethod
    def load(debs_dir=None, python_files=None, novels=None, jargon_entries=None):
        """From the installed packages (or .debs in debs_dir); the caller may
        pass what it has read already."""
        res = Resources()
        try:
            entries = jargon_entries if jargon_entries is not None else ds.jargon(debs_dir)[1]
            res.jargon_defs = [(t, d) for t, d in ((t, ds.jargon_definition(x)) for t, x in entries) if d]
        except ds.Missing as e:
            print(f"gen_chat: note: no jargon questions ({e})", file=sys.stderr)
        try:
            res.words = ds.words(debs_dir)
        except ds.Missing as e:
            print(f"gen_chat: note: no word questions ({e})", file=sys.stderr)
        try:
            res.austen = novels if novels is not None else ds.austen_novels(debs_dir)
        except ds.Missing as e:
            print(f"gen_chat: note: no Austen questions ({e})", file=sys.stderr)
        res.docs = ds.python_docstrings(python_files if python_files is not None else ds.python_stdlib_files())
        return res


# ---------------------------------------------------------------- arithmetic and units

def c_arith(r, res):
    op = r.choice(["+", "-", "x", "/", "%", "sq", "pct"])
    if op == "+":
        a, b = r.randint(2, 999), r.randint(2, 999)
        u = r.choice([f"What is {a} + {b}?", f"Can you add {a} and {b}?", f"{a} plus {b}?",
                      f"Please compute {a} + {b}."])
        return u, f"{a} + {b} = {a + b}.", a + b
    if op == "-":
        a, b = sorted((r.randint(2, 999), r.randint(2, 999)), reverse=True)
        u = r.choice([f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"What's {a} minus {b}?"])
        return u, f"{a} - {b} = {a - b}.", a - b
    if op == "x":
        a, b = r.randint(2, 99), r.randint(2, 30)
        u = r.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"What's {a} x {b}?"])
        if a > 12 and b > 9:
            t, o = divmod(b, 10)
            w = f"{a} x {b} = {a} x {10 * t} + {a} x {o} = {a * 10 * t} + {a * o} = {a * b}."
        else:
            w = f"{a} x {b} = {a * b}."
        return u, w, a * b
    if op == "/":
        b, q = r.randint(2, 25), r.randint(2, 60)
        a = b * q
        u = r.choice([f"What is {a} divided by {b}?", f"Divide {a} by {b}.", f"What's {a} / {b}?"])
        return u, f"{a} / {b} = {q}, because {b} x {q} = {a}.", q
    if op == "%":
        b, q = r.randint(3, 12), r.randint(3, 40)
        rem = r.randint(1, b - 1)
        a = b * q + rem
        u = f"What is {a} divided by {b}, with the remainder?"
        w = f"{a} / {b} = {q} remainder {rem}, since {b} x {q} = {b * q} and {a} - {b * q} = {rem}."
        return u, w, None  # no single result to follow up on
    if op == "sq":
        a = r.randint(2, 40)
        u = r.choice([f"What is {a} squared?", f"What is {a} to the power of 2?"])
        return u, f"{a} squared is {a} x {a} = {a * a}.", a * a
    pct, tot = r.choice([10, 20, 25, 50, 75, 5, 15]), 20 * r.randint(1, 30)
    val = tot * pct // 100
    return f"What is {pct}% of {tot}?", f"{pct}% of {tot} is {pct} / 100 x {tot} = {val}.", val


UNITS = [  # (big unit, plural, small unit plural, factor)
    ("kilometer", "kilometers", "meters", 1000), ("meter", "meters", "centimeters", 100),
    ("kilogram", "kilograms", "grams", 1000), ("liter", "liters", "milliliters", 1000),
    ("hour", "hours", "minutes", 60), ("minute", "minutes", "seconds", 60), ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7), ("year", "years", "months", 12), ("foot", "feet", "inches", 12),
    ("yard", "yards", "feet", 3), ("mile", "miles", "feet", 5280), ("pound", "pounds", "ounces", 16),
    ("gallon", "gallons", "quarts", 4), ("dozen", "dozens", "items", 12),
]


def c_units(r, res):
    kind = r.random()
    if kind < 0.15:
        c = 5 * r.randint(-8, 20)
        f = c * 9 // 5 + 32
        return (f"What is {c} degrees Celsius in Fahrenheit?",
                f"F = C x 9/5 + 32, so {c} x 9/5 + 32 = {c * 9 // 5} + 32 = {f} degrees Fahrenheit.")
    one, many, small, k = r.choice(UNITS)
    n = r.randint(2, 25)
    if kind < 0.6:
        u = r.choice([f"How many {small} are in {n} {many}?", f"Convert {n} {many} to {small}.",
                      f"{n} {many} is how many {small}?"])
        return u, f"There are {k} {small} in a {one}, so {n} {many} = {n} x {k} = {n * k} {small}."
    u = r.choice([f"How many {many} is {n * k} {small}?", f"Convert {n * k} {small} to {many}."])
    return u, f"There are {k} {small} in a {one}, so {n * k} {small} = {n * k} / {k} = {n} {many}."


def c_word_problem(r, res):
    q, steps, ans = gen_math.problem(r)
    return q, "\n".join(steps) + f"\nThe answer is {ans}."


# ---------------------------------------------------------------- words

def c_words(r, res):
    w = r.choice(res.words)
    kind = r.randrange(7)
    if kind == 0:
        return (r.choice([f"Spell \"{w}\" backwards.", f"What is \"{w}\" written in reverse?"]),
                f"\"{w}\" backwards is \"{w[::-1]}\".")
    if kind == 1:
        return (f"How many letters are in the word \"{w}\"?",
                f"\"{w}\" has {len(w)} letters: {'-'.join(w.upper())}.")
    if kind == 2:
        ws = r.sample(res.words, r.randint(3, 6))
        return (f"Put these words in alphabetical order: {', '.join(ws)}.", ", ".join(sorted(ws)))
    if kind == 3:
        vow = [c for c in w if c in "aeiou"]
        if not vow:
            return f"Does \"{w}\" contain a vowel (a, e, i, o, u)?", f"No, \"{w}\" has no a, e, i, o or u."
        return (f"How many vowels are in \"{w}\"?",
                f"\"{w}\" has {len(vow)} vowel{'s' if len(vow) > 1 else ''}: {', '.join(vow)}.")
    if kind == 4:
        ws = r.sample(res.words, 3)
        lens = [len(x) for x in ws]
        best = max(lens)
        if lens.count(best) > 1:
            return (f"Which of these words are longest: {', '.join(ws)}?",
                    " and ".join(f"\"{x}\"" for x in ws if len(x) == best) + f" are tied with {best} letters.")
        x = ws[lens.index(best)]
        return (f"Which word is the longest: {', '.join(ws)}?",
                f"\"{x}\", with {best} letters (" + ", ".join(f"{y}: {len(y)}" for y in ws) + ").")
    if kind == 5:
        pre = w[:3]
        pool = [x for x in res.words if x.startswith(pre) and x != w]
        if len(pool) < 3:
            return f"What is the first letter of \"{w}\"?", f"The first letter of \"{w}\" is \"{w[0]}\"."
        pick = r.sample(pool, 3)
        return (f"Give me three words that start with \"{pre}\".", f"For example: {', '.join(pick)}.")
    pal = w == w[::-1]
    return (f"Is \"{w}\" a palindrome?",
            f"{'Yes' if pal else 'No'}: backwards it reads \"{w[::-1]}\", which is "
            f"{'the same' if pal else 'different'}.")


# ---------------------------------------------------------------- sources

def _clip(text, n=600):
    if len(text) <= n:
        return text
    cut = text[:n]
    k = cut.rfind(". ")
    return cut[:k + 1] if k > 100 else cut.rstrip() + "..."


def c_jargon(r, res):
    term, d = r.choice(res.jargon_defs)
    u = r.choice([f"What does \"{term}\" mean in hacker jargon?", f"Define the hacker slang term \"{term}\".",
                  f"I keep hearing people say \"{term}\". What is it?", f"What is meant by \"{term}\"?"])
    lead = r.choice([f"In hacker jargon, \"{term}\": ", "", f"\"{term}\" - "])
    return u, lead + _clip(d)


def c_python(r, res):
    mod, fn, sig, summary = r.choice(res.docs)
    kind = r.randrange(3)
    if kind == 0:
        return (f"What does {mod}.{fn} do in Python?", f"{mod}.{sig}: {summary}")
    if kind == 1:
        return (f"Which Python standard library module has the function {fn}, and what does it do?",
                f"{fn} is in the {mod} module. {summary}")
    return (f"How do I call {mod}.{fn}? What are its arguments?",
            f"Import {mod} and call {mod}.{sig}. {summary}")


AUSTEN_YEARS = {"Pride and Prejudice": 1813, "Persuasion": 1817, "Emma": 1815, "Sense and Sensibility": 1811,
                "Northanger Abbey": 1817, "Mansfield Park": 1814}


def c_austen(r, res):
    title, chapters = r.choice(res.austen)
    kind = r.randrange(4)
    if kind == 0:
        return (f"Who wrote {title}?", f"{title} is a novel by Jane Austen, first published in "
                                        f"{AUSTEN_YEARS[title]}.")
    ci = r.randrange(len(chapters))
    sents = [s for s in ds.sentences(chapters[ci])[1:] if 40 <= len(s) <= 220]
    if len(sents) < 3:
        return f"Which Jane Austen novel was published in {AUSTEN_YEARS[title]}?", (
            ", ".join(t for t, y in sorted(AUSTEN_YEARS.items()) if y == AUSTEN_YEARS[title]) + ".")
    i = r.randrange(len(sents) - 1)
    if kind == 1:
        return (f"Which Jane Austen novel is this line from?\n\n{sents[i]}",
                f"That line is from {title}, chapter {ci + 1}.")
    if kind == 2:
        return (f"Continue this passage from {title}:\n\n{sents[i]}", sents[i + 1])
    if ci == 0 and i == 0:
        return f"What is the opening line of {title}?", sents[0]
    return (f"Here is a line from chapter {ci + 1} of {title}:\n\n{sents[i]}\n\nHow many words does it have?",
            f"It has {len(sents[i].split())} words.")


SMALL_TALK = [
    ("Hi!", "Hello! How can I help you today?"),
    ("Hello there.", "Hi! What would you like to talk about?"),
    ("Thanks, that helped.", "You're welcome! Let me know if there is anything else."),
    ("Who are you?", "I am a small JetMoE language model, trained as a demo of jetmoe.c on a CPU. I can do simple "
                     "arithmetic, unit conversions and short questions about words, Python and Jane Austen, but I "
                     "make mistakes, so please check important answers."),
    ("What can you do?", "I can add, subtract, multiply and divide, convert units, work through short word "
                         "problems, answer questions about English words and Python functions, and talk about "
                         "Jane Austen's novels."),
    ("What is a mixture of experts?", "A mixture-of-experts layer holds several expert networks and a router that "
                                      "sends each token to only a few of them, so the model can be large while each "
                                      "token uses a small part of it."),
    ("What does JetMoE stand for?", "JetMoE is a language model whose layers use a mixture of attention heads and a "
                                    "mixture of MLP experts; only a few experts run for each token."),
    ("Good night!", "Good night! Sleep well."),
    ("Can you tell me a secret?", "I don't have secrets, but here is a fact: there are 60 seconds in a minute and "
                                  "3600 seconds in an hour."),
    ("Are you a person?", "No, I am a computer program: a small language model."),
    ("What's your favourite number?", "I don't have favourites, but 7 is a popular choice."),
    ("Tell me something about Python.", "Python is a programming language known for readable code. Its standard "
                                        "library has modules for text, files, math, networking and much more."),
]


def c_small_talk(r, res):
    return r.choice(SMALL_TALK)


def generate(seed, n_bytes, res):
    """Dialogue records until their text reaches n_bytes."""
    r = random.Random(seed)
    topics = [(c_arith, 18), (c_units, 12), (c_word_problem, 14), (c_small_talk, 5)]
    if res.words:
        topics.append((c_words, 14))
    if res.jargon_defs:
        topics.append((c_jargon, 12))
    if res.docs:
        topics.append((c_python, 10))
    if res.austen:
        topics.append((c_austen, 10))
    fns, weights = [t[0] for t in topics], [t[1] for t in topics]
    out, size = [], 0
    while size < n_bytes:
        msgs = [{"role": "system", "content": r.choice(SYSTEMS)}]
        for turn in range(1 + (r.random() < 0.2)):
            fn = r.choices(fns, weights)[0]
            got = fn(r, res)
            u, a = got[0], got[1]
            msgs.append({"role": "user", "content": u})
            msgs.append({"role": "assistant", "content": a})
            if fn is c_arith and got[2] is not None and turn == 0 and r.random() < 0.3:  # a follow-up on the result
                k = r.randint(2, 9)
                msgs.append({"role": "user", "content": r.choice([f"And if you multiply that by {k}?",
                                                                  f"Now times {k}?"])})
                msgs.append({"role": "assistant", "content": f"{got[2]} x {k} = {got[2] * k}."})
                break
        text = "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in msgs)
        rec = {"text": text, "messages": msgs}
        out.append(rec)
        size += len(rec["text"].encode("utf-8")) + 1  # the text prepare reads, not the JSON around it
    return out


def main():
    gen_math.cli(__doc__, lambda a: generate(a.seed, a.bytes, Resources.load(a.debs)),
                 [("--debs", {"default": None, "help": "directory of downloaded .debs to read missing packages from"})])


if __name__ == "__main__":
    main()
