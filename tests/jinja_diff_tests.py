"""Differential test of the chat-template renderer (src/tokenizer/chat_template.c) against
@huggingface/jinja, the Jinja of transformers.js (tests/node/jinja_diff.mjs; node_modules from the
committed package-lock.json by `npm ci` when missing).

Every template in tests/data/templates/*.jinja is rendered for each of CONVERSATIONS with
`jetmoe tokenizer chat DIR` (DIR: a tiny tokenizer whose tokenizer_config.json holds the template)
and with @huggingface/jinja, with the same variables: messages, tools, add_generation_prompt (true),
bos_token "<s>", eos_token "</s>". The texts must agree byte for byte, or both renderers refuse the
conversation (raise_exception); any other outcome fails unless DELIBERATE names it with the reason.

strftime_now: transformers provides it as a global (datetime.now().strftime(format)), and so does
@huggingface/jinja, which refuses a variable of that name ("Variable already declared"). So instead of
passing a function, both renderers run with the same fixed clock: JETMOE_TEMPLATE_NOW=NOW (our
renderer reads it; jinja_diff.mjs fixes JavaScript's Date with it) and TZ=UTC.

The judge, of the deliberate differences above all, is Python's Jinja2 (what transformers'
apply_chat_template runs): when this Python can import jinja2 (python3-jinja2), every render is also
made with it, in the environment transformers builds (sandboxed, trim_blocks, lstrip_blocks,
loopcontrols, its tojson, raise_exception and strftime_now on the same clock), and ours must be
exactly Jinja2's text, or refused by both.
"""
import datetime
import glob
import json
import os
import shutil
import subprocess

from serve_clients_tests import NODE_DIR, npm_ready, skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "tests", "data", "templates")
NOW = 1796126400  # 2026-12-01 12:00:00 UTC, a Tuesday
CLOCK = {"JETMOE_TEMPLATE_NOW": str(NOW), "TZ": "UTC"}

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, \"quoted\"",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Café, 日本語, emoji 🙂"}, {"role": "assistant", "content": "Größe — ok ✓"}],
    [{"role": "user", "content": "It's \"quoted\" and 'single' with a \\ backslash"}],
    [{"role": "user", "content": "Braces {{ not a tag }} {% neither %} {# nor #} }} {"}],
    [{"role": "user", "content": "  padded\n\nlines\t "}, {"role": "assistant", "content": "\n reply \n"},
     {"role": "user", "content": "again"}],
    [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "in parts"}]}],
    {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [TOOL]},
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
     {"role": "assistant", "content": "c"}],
]

# template name -> (conversation indices, why): where we follow Python's Jinja2 (what transformers'
# apply_chat_template runs) and @huggingface/jinja 0.5.11 differs from it
DELIBERATE = {
    "filters": ({3}, "length of a string with an emoji: Python counts code points (🙂 is 1), JavaScript UTF-16 "
                     "units (2)"),
    "set_scope": ({1, 2, 3, 6, 9}, "{% set %} inside a for loop: in Jinja2 each iteration starts from the outer "
                                   "value (1, 1, ...); @huggingface/jinja carries it to the next iteration"),
    "break_continue": ({2, 6, 9}, "{% continue %} then {% break %} at loop.index 3: Jinja2 prints the third item "
                                  "before breaking, as we do; @huggingface/jinja stops one item early"),
    "items_unpack": ({3}, "length of a string with an emoji, as in filters"),
    "llama31_tools": ({8}, "builtin_tools | reject('equalto', ...), as Llama 3.1's template has it: "
                           "@huggingface/jinja has no reject filter"),
    "hermes_tools": ({8}, "basic_type_map[json_spec.type] with a list type (Hermes' Union branch): Jinja2 gives "
                          "undefined, @huggingface/jinja throws"),
    "jinja2_only": (set(range(10)), "each line something @huggingface/jinja lacks or renders otherwise: capitalize "
                                    "and title keep upper case, map('filter'), the test names == and !=, reject, none "
                                    "prints as '', Python's printing of dict views and tuples, tests without "
                                    "parentheses, unique, list and reverse of a string, strftime beyond %d %b %B %Y "
                                    "%m %H %M, indexing with a list"),
}


def variables(conv):
    msgs = conv["messages"] if isinstance(conv, dict) else conv
    joined = [dict(m, content="".join(p["text"] for p in m["content"])) if isinstance(m["content"], list) else m
              for m in msgs]
    return {"messages": joined, "tools": conv.get("tools") if isinstance(conv, dict) else None,
            "add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>"}


def jinja2_renderer():
    """Python Jinja2 as transformers' apply_chat_template sets it up -> render(template, vars), or None."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):  # datetime.now() in TZ=UTC at NOW
        return datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc).replace(tzinfo=None).strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now

    def render(template, variables):
        try:
            return {"text": env.from_string(template).render(**variables)}
        except jinja2.exceptions.TemplateError as e:
            return {"error": f"{type(e).__name__}: {e}"}
        except Exception as e:  # noqa: BLE001 -- Jinja2 lets Python's own errors through
            return {"error": f"{type(e).__name__}: {e}"}
    return render


def tokenizer_dir(tmp, name, template):
    d = os.path.join(tmp, "jinja_diff", name)
    os.makedirs(d, exist_ok=True)
    meta = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tj = {"version": "1.0", "added_tokens": [{"id": i, "content": t, "special": True} for t, i in vocab.items()],
          "normalizer": None, "pre_tokenizer": meta, "decoder": meta,
          "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": False, "fuse_unk": True, "vocab": vocab, "merges": []}}
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tj, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}, f)
    return d


def run(suite, jetmoe, tmp):
    name = "jinja_diff"
    if not suite.wanted(name):
        return
    why = npm_ready("@huggingface/jinja")
    if why:
        return skip(name, why)
    files = sorted(glob.glob(os.path.join(TEMPLATES, "*.jinja")))
    jobs, ours = [], []
    for path in files:
        tname = os.path.basename(path)[:-6]
        template = open(path, encoding="utf-8").read()
        d = tokenizer_dir(tmp, tname, template)
        for i, conv in enumerate(CONVERSATIONS):
            jobs.append({"template": template, "vars": variables(conv)})
            p = subprocess.run([jetmoe, "tokenizer", "chat", d], input=json.dumps(conv).encode(), capture_output=True,
                               timeout=60, env=dict(os.environ, **CLOCK))
            ours.append((tname, i, p))
    p = subprocess.run([shutil.which("node"), os.path.join(NODE_DIR, "jinja_diff.mjs")], input=json.dumps(jobs),
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, **CLOCK))
    if p.returncode:
        return suite.check(name, False, f"jinja_diff.mjs failed: {p.stderr.strip()[-500:]}")
    theirs = json.loads(p.stdout)
    jinja2_render = jinja2_renderer()
    judged = [jinja2_render(j["template"], j["vars"]) for j in jobs] if jinja2_render else [None] * len(jobs)
    agree = refused = deliberate = as_jinja2 = 0
    problems = []

    def same(mine, ref):
        if mine.returncode == 0 and "text" in ref and mine.stdout == ref["text"].encode():
            return "agree"
        if mine.returncode == 1 and "error" in ref and "bad argument" in mine.stderr.decode(errors="replace"):
            return "refused"  # both refused the conversation: the template's raise_exception
        return None

    def shown(mine):
        return mine.stdout.decode(errors="replace") if mine.returncode == 0 else "error: " + \
            mine.stderr.decode(errors="replace").strip()

    for (tname, i, mine), ref, py in zip(ours, theirs, judged):
        if py and same(mine, py):
            as_jinja2 += 1
        elif py:  # Jinja2 is the reference whatever @huggingface/jinja does
            want = py.get("text", "error: " + py.get("error", ""))
            problems.append(f"{tname} conversation {i}: ours {shown(mine)[:300]!r}, Python Jinja2 {want[:300]!r}")
        outcome = same(mine, ref)
        if outcome:
            agree += outcome == "agree"
            refused += outcome == "refused"
        elif i in DELIBERATE.get(tname, ((), ""))[0]:
            deliberate += 1
        else:
            want = ref.get("text", "error: " + ref.get("error", ""))
            problems.append(f"{tname} conversation {i}: ours {shown(mine)[:300]!r}, @huggingface/jinja {want[:300]!r}")
    total = len(ours)
    judge = (f"; {as_jinja2} of {total} exactly as Python Jinja2 renders them" if jinja2_render
             else "; Python Jinja2 not importable here (make setup installs python3-jinja2): not judged by it")
    suite.check(name, not problems, f"{len(problems)} of {total} renders differ: " + "; ".join(problems),
                f"{agree} of {total} renders agree byte for byte and {refused} are refused by both "
                f"({len(files)} templates x {len(CONVERSATIONS)} conversations), {deliberate} deliberate differences"
                + judge)
