"""`jetmoe serve` from the outside (real clients, load, hostile input), on a tiny untrained model (a 400-piece tokenizer trained here, 2 layers of 64):

- serve_openai_client_*: the official `openai` npm package (tests/node/openai_client.mjs, installed with
  `npm ci` from the committed package-lock.json when tests/node/node_modules is missing) makes a chat
  completion, the same one streamed, a completion streamed and not, and calls with a wrong and no API key;
  its JSON results are checked here (usage adds up, the streamed text is the plain one's, 401s).
- serve_load: 64 clients x 4 requests (half streamed) against --parallel 4 --queue 32: every request gets
  a whole answer or a 503, within a time bound; the server's RSS sampled through the run stays flat;
  latency percentiles and aggregate tokens/s in the detail line.
- serve_hostile_*: over 10,000 seeded hostile requests on raw keep-alive sockets, 16 at a time (bad JSON,
  wrong types, huge numbers, NaN, 10k-deep nesting, invalid UTF-8, giant max_tokens, 10 MB bodies, long
  headers, bad framing, random methods and paths, bad keys) while slow clients drip a byte a second:
  each gets a 4xx with OpenAI error JSON (or a 200/503 where the request may be valid) or a close, never
  a 5xx but 503, never a hang; the server stays up, answers a normal request after, and exits 0 on
  SIGTERM with no sanitizer report (this part runs under `make test-asan` too).

tests/browser_tests.py drives the web page with this module's Server and model(). (tests/serve_tests.py
is the server's own API test.)
"""
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

from cli_tests import tiny_model
from testlib import sanitizer_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_DIR = os.path.join(ROOT, "tests", "node")
API_KEY = "sk-test-3f9c"
CHECKS = ["serve_openai_client", "serve_load", "serve_hostile"]


def skip(name, why):
    """A check that cannot run here (its tool cannot be installed): printed, not counted."""
    print(f"SKIP {name}: {why}", flush=True)


# ---------------------------------------------------------------- the model and the server

def model(suite, jetmoe, tmp):
    """A 400-piece tokenizer and an untrained 2-layer model with a 512-token context (made once per run)."""
    d = os.path.join(tmp, "serve_model")
    m = os.path.join(d, "model")
    if os.path.exists(os.path.join(m, "config.json")):
        return m

    def jm(*args):
        return subprocess.run([jetmoe] + list(args), capture_output=True, text=True, errors="replace", timeout=300)

    return tiny_model(suite, jm, d, context=512, check="serve_model_setup")


class Server:
    """`jetmoe serve MODEL --port 0 ARGS...`: started, its port read from the "listening on" line."""

    def __init__(self, jetmoe, model_dir, *args, timeout=60):
        self.cmd = [jetmoe, "serve", model_dir, "--host", "127.0.0.1", "--port", "0"] + [str(a) for a in args]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.lines, self.port = [], None
        ready = threading.Event()

        def read():  # drains stderr for the process's whole life, so the pipe never fills
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"listening on http://[^:\s]+:(\d+)", line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        ready.wait(timeout)
        if self.port is None:
            self.stop()
            raise RuntimeError(f"no 'listening on' line in {timeout}s from {' '.join(self.cmd)}: "
                               f"exit {self.proc.returncode}; {self.stderr()[-600:]}")

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stderr(self):
        return "".join(self.lines)

    def stop(self, timeout=20):
        """SIGTERM, then the exit status (None if it had to be killed after timeout s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.reader.join(5)
                return None
        self.reader.join(5)
        return self.proc.returncode

    def request(self, method, path, body=None, headers=None, timeout=60):
        """One request on a fresh connection -> (status, headers dict lower-cased, body bytes)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
                headers = dict({"Content-Type": "application/json"}, **(headers or {}))
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def is_error_json(body):
    """OpenAI's error shape: {"error": {"message": str, "type": str, ...}}."""
    try:
        e = json.loads(body)["error"]
        return isinstance(e["message"], str) and isinstance(e["type"], str)
    except (ValueError, KeyError, TypeError):
        return False


def sse_events(body):
    """The data: payloads of an SSE body, in order ("[DONE]" kept as a string)."""
    out = []
    for event in re.split(rb"\r?\n\r?\n", body):
        data = [l[5:].lstrip(b" ") for l in re.split(rb"\r?\n", event) if l.startswith(b"data:")]
        if data:
            d = b"\n".join(data)
            out.append("[DONE]" if d == b"[DONE]" else json.loads(d))
    return out


def run(suite, build, tmp):
    if not any(suite.wanted(n) for n in CHECKS):
        return
    jetmoe = os.path.join(ROOT, build, "jetmoe")
    m = model(suite, jetmoe, tmp)
    if m is None:
        return
    asan = "asan" in build
    for name, fn in (("serve_openai_client", openai_client), ("serve_load", load), ("serve_hostile", hostile)):
        if suite.wanted(name):
            t0 = time.time()
            fn(suite, jetmoe, m, tmp, asan)
            print(f"# {name}: {time.time() - t0:.1f}s", flush=True)


# ---------------------------------------------------------------- the official openai client

def npm_ready(package="openai"):
    """tests/node/node_modules from package-lock.json (npm ci) when package is missing -> None, or why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return "node/npm not installed (make setup installs them)"
    if os.path.exists(os.path.join(NODE_DIR, "node_modules", package, "package.json")):
        return None
    try:
        p = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "npm ci timed out (no registry?)"
    return None if p.returncode == 0 else f"npm ci failed: {p.stderr.strip()[-300:]}"


def openai_client(suite, jetmoe, m, tmp, asan):
    why = npm_ready()
    if why:
        skip("serve_openai_client", why)
        return
    try:
        srv = Server(jetmoe, m, "--api-key", API_KEY, "--parallel", 2, "--ctx", 512, "--threads", 1)
    except RuntimeError as e:
        suite.check("serve_openai_client_start", False, str(e))
        return
    try:
        p = subprocess.run(["node", os.path.join(NODE_DIR, "openai_client.mjs"), f"http://127.0.0.1:{srv.port}/v1",
                            API_KEY], capture_output=True, text=True, timeout=300, cwd=NODE_DIR)
    finally:
        rc = srv.stop()
    try:
        r = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        suite.check("serve_openai_client_run", False, f"node exit {p.returncode}: {p.stdout[-300:]!r} "
                    f"{p.stderr[-600:]!r}")
        return
    if "fatal" in r:
        suite.check("serve_openai_client_run", False, r["fatal"])
        return

    def usage_ok(res, max_tokens):
        u = res.get("usage") or {}
        ct, pt, tt = u.get("completion_tokens"), u.get("prompt_tokens"), u.get("total_tokens")
        return (isinstance(ct, int) and isinstance(pt, int) and pt > 0 and 0 <= ct <= max_tokens
                and tt == pt + ct and (res["finish_reason"] != "length" or ct == max_tokens)), u

    def answer_ok(name, res, max_tokens):
        if "error" in res:
            suite.check(name, False, res["error"])
            return
        ok_u, u = usage_ok(res, max_tokens)
        text_ok = isinstance(res["text"], str) and (res["text"] != "" or res["finish_reason"] == "length")
        ok = ok_u and text_ok and res["finish_reason"] in ("stop", "length")
        suite.check(name, ok, f"{json.dumps(res)[:500]}",
                    f"{u.get('prompt_tokens')}+{u.get('completion_tokens')} tokens, finish {res['finish_reason']}, "
                    f"{res['text'][:30]!r}")

    models = r.get("models", [])
    suite.check("serve_openai_client_models", isinstance(models, list) and len(models) >= 1 and
                all(isinstance(x, str) and x for x in models), json.dumps(r.get("models"))[:300], ", ".join(models))
    mt = r["max_tokens"]
    answer_ok("serve_openai_client_chat", r["chat"], mt)
    answer_ok("serve_openai_client_completion", r["completion"], mt)
    st, ch = r["chat_stream"], r["chat"]
    if "error" in st or "error" in ch:
        suite.check("serve_openai_client_chat_stream", False, st.get("error") or ch.get("error"))
    else:
        problems = []
        if st["text"] != ch["text"]:
            problems.append(f"streamed {st['text']!r} != {ch['text']!r}")
        if st["finish_reason"] != ch["finish_reason"]:
            problems.append(f"finish {st['finish_reason']} != {ch['finish_reason']}")
        if st["chunks"] < 1 or st["objects"] != ["chat.completion.chunk"] or st["ids"] != 1:
            problems.append(f"chunks {st['chunks']}, objects {st['objects']}, {st['ids']} distinct ids")
        if st.get("usage") is not None and st["usage"] != ch["usage"]:
            problems.append(f"stream usage {st['usage']} != {ch['usage']}")
        if st["first_role"] not in ("assistant", None):
            problems.append(f"first delta role {st['first_role']!r}")
        suite.check("serve_openai_client_chat_stream", not problems, "; ".join(problems),
                    f"{st['chunks']} chunks == the plain answer, finish {st['finish_reason']}"
                    + (", usage in the last chunk" if st.get("usage") else ""))
    cs, c = r["completion_stream"], r["completion"]
    if "error" in cs or "error" in c:
        suite.check("serve_openai_client_completion_stream", False, cs.get("error") or c.get("error"))
    else:
        suite.check("serve_openai_client_completion_stream",
                    cs["text"] == c["text"] and cs["finish_reason"] == c["finish_reason"],
                    f"streamed {cs['text']!r}/{cs['finish_reason']} != {c['text']!r}/{c['finish_reason']}")
    suite.check("serve_openai_client_auth", r["wrong_key"] == 401 and r["no_key"] == 401,
                f"wrong key -> {r['wrong_key']}, no key -> {r['no_key']} (want 401 from the client's error)")
    bad = sanitizer_report(srv.stderr())
    suite.check("serve_openai_client_exit", rc == 0 and not bad, f"exit {rc}: {srv.stderr()[-600:]}")


# ---------------------------------------------------------------- load

def one_request(port, i, stream, timeout):
    """A chat request (every other one streamed) -> (kind, seconds, completion tokens, why):
    kind "ok" (a whole answer), "busy" (503 with error JSON) or "bad"."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"Request {i}: tell me about licences."}],
            "max_tokens": 16, "temperature": 0.8, "seed": i, "stream": stream}
    t0 = time.time()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
    except (OSError, http.client.HTTPException) as e:
        return "bad", time.time() - t0, 0, f"{type(e).__name__}: {e}"
    finally:
        c.close()
    secs = time.time() - t0
    if r.status == 503:
        return ("busy", secs, 0, "") if is_error_json(data) else ("bad", secs, 0, f"503 body {data[:200]!r}")
    if r.status != 200:
        return "bad", secs, 0, f"status {r.status}: {data[:200]!r}"
    try:
        if not stream:
            j = json.loads(data)
            ch = j["choices"][0]
            ok = isinstance(ch["message"]["content"], str) and ch["finish_reason"] in ("stop", "length")
            n = j["usage"]["completion_tokens"]
            return ("ok", secs, n, "") if ok else ("bad", secs, 0, f"answer {data[:200]!r}")
        ev = sse_events(data)
        fin = [e["choices"][0].get("finish_reason") for e in ev[:-1] if e != "[DONE]" and e.get("choices")]
        n = sum(1 for e in ev[:-1] if e != "[DONE]" and e.get("choices") and e["choices"][0].get("delta", {}).get("content"))
        usage = [e["usage"] for e in ev if e != "[DONE]" and e.get("usage")]
        if usage:
            n = usage[-1]["completion_tokens"]
        if ev and ev[-1] == "[DONE]" and fin and fin[-1] in ("stop", "length"):
            return "ok", secs, n, ""
        return "bad", secs, 0, f"stream without [DONE] or finish_reason: {data[-200:]!r}"
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return "bad", secs, 0, f"{type(e).__name__} {e}: {data[:200]!r}"


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def load(suite, jetmoe, m, tmp, asan):
    """Rounds of 64 clients x 4 requests at once; the RSS sampled through all of them (a leak of a few
    KB per request shows over the rounds' thousand-odd requests)."""
    clients, per_client, rounds = 64, 4, (3 if asan else 6)
    bound = 240 if asan else 120  # seconds for each round
    try:
        srv = Server(jetmoe, m, "--parallel", 4, "--queue", 32, "--ctx", 256, "--threads", 2)
    except RuntimeError as e:
        suite.check("serve_load_start", False, str(e))
        return
    results, samples, done = [], [], threading.Event()
    lock = threading.Lock()

    def client(k):
        for j in range(per_client):
            r = one_request(srv.port, k * per_client + j, (k + j) % 2 == 1, timeout=bound)
            with lock:
                results.append(r)

    def sampler():
        while not done.is_set():
            v = rss_kb(srv.pid)
            if v:
                samples.append(v)
            time.sleep(0.02)

    s = threading.Thread(target=sampler, daemon=True)
    s.start()
    t0, hung, slowest = time.time(), 0, 0.0
    for _ in range(rounds):
        r0 = time.time()
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1, bound - (time.time() - r0)))
        slowest = max(slowest, time.time() - r0)
        hung += sum(t.is_alive() for t in threads)
        if hung:
            break
    wall = time.time() - t0
    done.set()
    s.join()
    alive = srv.alive()
    rc = srv.stop()
    with lock:
        res = list(results)
    kinds = {k: sum(r[0] == k for r in res) for k in ("ok", "busy", "bad")}
    lat = [r[1] for r in res if r[0] == "ok"]
    tokens = sum(r[2] for r in res)
    bad = [r[3] for r in res if r[0] == "bad"]
    total = rounds * clients * per_client
    problems = []
    if hung or len(res) != total:
        problems.append(f"{hung} clients still waiting after {bound}s, {len(res)} of {total} requests answered")
    if bad:
        problems.append(f"{len(bad)} bad answers, e.g. {bad[0]}")
    if kinds["ok"] < total // 4:
        problems.append(f"only {kinds['ok']} whole answers of {total}")
    if not alive or sanitizer_report(srv.stderr()):
        problems.append(f"server died: {srv.stderr()[-400:]}")
    suite.check("serve_load_answers", not problems, "; ".join(problems),
                f"{rounds} rounds of {clients} clients x {per_client} (slowest round {slowest:.1f}s): "
                f"{kinds['ok']} answers, {kinds['busy']} 503s in {wall:.1f}s; "
                f"latency p50 {percentile(lat, .5):.2f}s p90 {percentile(lat, .9):.2f}s p99 {percentile(lat, .99):.2f}s; "
                f"{tokens / wall:.0f} tokens/s aggregate")
    # RSS: the last quarter's peak within 10% + 8 MB of the first quarter's (ASan's quarantine grows to 256 MB)
    q = max(1, len(samples) // 4)
    first, last = max(samples[:q] or [0]), max(samples[-q:] or [0])
    limit = first * 1.10 + 8192 if not asan else first + 300 * 1024
    suite.check("serve_load_rss_flat", len(samples) >= 8 and last <= limit,
                f"RSS first quarter peak {first / 1024:.1f} MB, last quarter {last / 1024:.1f} MB > "
                f"{limit / 1024:.1f} MB ({len(samples)} samples)",
                f"RSS {first / 1024:.1f} MB -> {last / 1024:.1f} MB over {len(samples)} samples, "
                f"bound {limit / 1024:.1f} MB")
    suite.check("serve_load_exit", rc == 0 and not sanitizer_report(srv.stderr()),
                f"exit {rc} after SIGTERM: {srv.stderr()[-600:]}")


# ---------------------------------------------------------------- hostile input

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PATHS = ["/", "/health", "/v1/models", CHAT, COMPLETIONS, "/v1", "/v1/", "/v1/chat", "/v2/models", "/favicon.ico",
         "/../../etc/passwd", "/v1/models/../../x", "/%00", "/v1/chat/completions?x=1", "/v1/chat/completions/",
         "//v1/models", "/v1/models%2f..", "/caf%e9", "/%ff%fe", "/" + "a" * 4000, "*", "/v1/embeddings"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO", "get", "P0ST", "CONNECT"]


def chat_body(rng, **over):
    b = {"model": "tiny", "messages": [{"role": "user", "content": rng.choice(["hi", "Hello there", "x" * 50])}],
         "max_tokens": rng.randint(1, 4), "temperature": 0}
    b.update(over)
    return b


def completion_body(rng, **over):
    b = {"model": "tiny", "prompt": rng.choice(["Once", "The licence", ""]), "max_tokens": rng.randint(1, 4)}
    b.update(over)
    return b


def http_bytes(method, path, body=b"", headers=None, key=API_KEY, version="HTTP/1.1", length=True):
    h = {"Host": "127.0.0.1"}
    if key is not None:
        h["Authorization"] = "Bearer " + key
    if body and length:
        h["Content-Type"] = "application/json"
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode("latin-1") + body


def mutate(rng, b):
    """A byte-level mutation of b: flips, inserts, deletes, truncation, splices of JSON punctuation."""
    b = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i:i] = bytes([rng.choice(b'{}[]",:\\0-eE.tfn \x00\xff\xc3')])
        elif op == 2 and b:
            del b[i:i + rng.randint(1, 8)]
        elif op == 3:
            b = b[:i]
        else:
            b[i:i] = rng.choice([b"NaN", b"-Infinity", b"1e999", b"\\u", b"\\ud800", b"[" * 50, b'"', b"null"])
    return bytes(b)


def json_valid(b):
    """Whether b is one strict JSON document (RFC 8259: UTF-8, no NaN, nothing after it)."""
    try:
        json.loads(b.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        return True
    except (ValueError, RecursionError):
        return False


def cases(seed, n):
    """n hostile requests, seeded: (category, bytes, expect) with expect "error" (a 4xx or a close), "any"
    (also 200 or 503: the request may be valid), "lenient" (invalid JSON that cJSON takes: as "any", but
    counted) or "valid" (200 or 503, never a close)."""
    rng = random.Random(seed)
    deep = b"[" * 10000 + b"]" * 10000
    gens = []

    def gen(weight):
        def wrap(f):
            gens.append((weight, f))
            return f
        return wrap

    @gen(30)
    def bad_json():
        path = rng.choice([CHAT, COMPLETIONS])
        base = json.dumps(chat_body(rng) if path == CHAT else completion_body(rng)).encode()
        b = mutate(rng, base)
        return "bad_json", http_bytes("POST", path, b), ("any" if json_valid(b) else "error")

    @gen(6)
    def not_json():
        b = rng.choice([b"", b" ", b"hello", b"{", b"}", b"[1,2", b"{'model': 'x'}", b'{"messages": [}',
                        b'{"a":1,}', b"\x00\x01\x02", b'{"model":"tiny","messages":[]}garbage', b"{}{}",
                        b'"just a string"', b"42", b"null", b"true", b"[]", bytes(rng.randrange(256) for _ in range(64))])
        return "not_json", http_bytes("POST", rng.choice([CHAT, COMPLETIONS]), b), "error"

    @gen(14)
    def wrong_types():
        path = rng.choice([CHAT, COMPLETIONS])
        field, value = rng.choice([
            ("messages", "hi"), ("messages", 5), ("messages", None), ("messages", {"role": "user"}),
            ("messages", [5]), ("messages", ["hi"]), ("messages", [{"role": 5, "content": "x"}]),
            ("messages", [{"role": "user"}]), ("messages", [{"role": "user", "content": 5}]),
            ("messages", [{"role": "wizard", "content": "x"}]), ("messages", [{"content": "x"}]),
            ("max_tokens", "16"), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", [16]), ("max_tokens", True),
            ("temperature", "hot"), ("temperature", -1), ("temperature", [0]), ("top_p", "x"), ("top_p", -0.5),
            ("stream", "yes"), ("stream", 1), ("seed", "x"), ("seed", 1.5), ("model", 5), ("model", ["x"]),
            ("stop", 5), ("stop", {"a": 1}), ("prompt", 5), ("prompt", {"a": 1}), ("prompt", None), ("n", "2")])
        body = chat_body(rng) if path == CHAT else completion_body(rng)
        if field == "messages" and path == COMPLETIONS or field == "prompt" and path == CHAT:
            path = CHAT if path == COMPLETIONS else COMPLETIONS  # the field that request type reads
            body = chat_body(rng) if path == CHAT else completion_body(rng)
        body[field] = value
        return "wrong_types", http_bytes("POST", path, json.dumps(body).encode()), "error"

    @gen(6)
    def not_object():
        body = rng.choice([[chat_body(rng)], "x", 1, None, [], {}])
        return "not_object", http_bytes("POST", rng.choice([CHAT, COMPLETIONS]), json.dumps(body).encode()), "error"

    @gen(8)
    def huge_numbers():
        path = rng.choice([CHAT, COMPLETIONS])
        field = rng.choice(["max_tokens", "temperature", "top_p", "seed", "top_k", "presence_penalty",
                            "frequency_penalty", "n"])
        raw = rng.choice(["1e308", "-1e308", "1e999", "9999999999999999999999", "-9223372036854775809",
                          "18446744073709551616", "4294967297", "2147483648", "1e-400", "-0", "0.0000001"])
        body = json.dumps(chat_body(rng) if path == CHAT else completion_body(rng))
        body = body[:-1] + f', "{field}": {raw}}}'
        return "huge_numbers", http_bytes("POST", path, body.encode()), "any"

    @gen(5)
    def nan_inf():
        path = rng.choice([CHAT, COMPLETIONS])
        field = rng.choice(["max_tokens", "temperature", "top_p", "seed"])
        raw = rng.choice(["NaN", "Infinity", "-Infinity", "nan", "inf", "+1", "01", ".5", "1.", "0x10"])
        body = json.dumps(chat_body(rng) if path == CHAT else completion_body(rng))
        body = body[:-1] + f', "{field}": {raw}}}'
        # cJSON's number parser takes "01" and "1." (strtod's forms): counted, not failed
        return "nan_inf", http_bytes("POST", path, body.encode()), ("lenient" if raw in ("01", "1.") else "error")

    @gen(2)
    def deep_nesting():
        path = rng.choice([CHAT, COMPLETIONS])
        k = rng.randrange(4)
        if k == 0:
            b, e = deep, "error"
        elif k == 1:
            b, e = b'{"a":' * 10000 + b"1" + b"}" * 10000, "error"
        elif k == 2:  # inside the field the request reads
            field = b'"messages":' if path == CHAT else b'"prompt":'
            b, e = b'{"model":"tiny",' + field + deep + b"}", "error"
        else:  # an unknown field: ignoring it or refusing the depth are both right
            b, e = json.dumps(chat_body(rng) if path == CHAT else completion_body(rng))[:-1].encode() + \
                b', "extra": ' + deep + b"}", "any"
        return "deep_nesting", http_bytes("POST", path, b), e

    @gen(8)
    def bad_utf8():
        path = rng.choice([CHAT, COMPLETIONS])
        bad = rng.choice([b"\xff", b"\xc3", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
                          b"\x80", b"\xf8\x88\x80\x80\x80", b"abc\xfe", b"\xef\xbf"])
        body = chat_body(rng) if path == CHAT else completion_body(rng)
        s = json.dumps(body).encode()
        where = rng.choice([b'"hi"', b'"Hello there"', b'"Once"', b'"The licence"', b'"tiny"', b'"model"'])
        if where in s:
            s = s.replace(where, where[:-1] + bad + b'"', 1)
        else:
            s = s.replace(b'"tiny"', b'"ti' + bad + b'ny"', 1)
        return "bad_utf8", http_bytes("POST", path, s), "error"

    @gen(4)
    def escapes():  # valid JSON escapes the decoder must take apart: NUL, lone surrogates, pairs
        path = rng.choice([CHAT, COMPLETIONS])
        esc = rng.choice(["\\u0000", "\\ud800", "\\udc00", "\\ud83d\\ude00", "\\u00e9", "\\uffff", "\\ud800\\u0041",
                          "\\/", "\\b\\f\\n\\r\\t"])
        s = json.dumps(chat_body(rng) if path == CHAT else completion_body(rng))
        s = s.replace('"tiny"', f'"ti{esc}ny"', 1) if rng.random() < 0.3 else \
            s.replace('"max_tokens"', f'"x{esc}": "{esc}", "max_tokens"', 1)
        return "escapes", http_bytes("POST", path, s.encode()), "any"

    @gen(1)
    def giant_max_tokens():
        path = rng.choice([CHAT, COMPLETIONS])
        mt = rng.choice([100000, 2 ** 31 - 1, 2 ** 31, 2 ** 53, 10 ** 9])
        body = chat_body(rng, max_tokens=mt) if path == CHAT else completion_body(rng, max_tokens=mt)
        body["stop"] = None
        del body["stop"]
        return "giant_max_tokens", http_bytes("POST", path, json.dumps(body).encode()), "any"

    @gen(10)
    def methods_paths():
        method, path = rng.choice(METHODS), rng.choice(PATHS)
        if rng.random() < 0.3:
            path = "/" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789/%.-_?=&") for _ in range(rng.randint(1, 40)))
        body = b"" if rng.random() < 0.5 else json.dumps(chat_body(rng)).encode()
        known = {("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("POST", CHAT), ("POST", COMPLETIONS)}
        base = path.split("?")[0]
        expect = "any" if (method, base) in known or method in ("HEAD", "OPTIONS") or base == "/%00" or \
            (method == "POST" and base in (CHAT, COMPLETIONS)) else "error"
        return "methods_paths", http_bytes(method, path, body), expect

    @gen(5)
    def auth():
        key = rng.choice([None, "", "wrong", "x" * 5000, API_KEY + "x", API_KEY[:-1], "\xe9\xe9", API_KEY.upper()])
        hdr = {}
        if rng.random() < 0.3 and key is not None:
            hdr = {"Authorization": rng.choice(["Basic " + key, "Bearer", "Bearer  ", "bearer" + key, key])}
        path = rng.choice([CHAT, COMPLETIONS, "/v1/models"])
        method = "GET" if path == "/v1/models" else "POST"
        body = b"" if method == "GET" else json.dumps(chat_body(rng) if path == CHAT else completion_body(rng)).encode()
        return "auth", http_bytes(method, path, body, headers=hdr, key=key), "error"

    @gen(6)
    def framing():
        path = rng.choice([CHAT, COMPLETIONS])
        body = json.dumps(chat_body(rng) if path == CHAT else completion_body(rng)).encode()
        k = rng.randrange(9)
        if k == 0:
            return "framing", http_bytes("POST", path, body, headers={"Content-Length": "-5"}), "error"
        if k == 1:
            return "framing", http_bytes("POST", path, body, headers={"Content-Length": "abc"}), "error"
        if k == 2:
            return "framing", http_bytes("POST", path, body, headers={"Content-Length": "99999999999999999999999"}), "error"
        if k == 3:
            return "framing", http_bytes("GARBAGE", "", b"", version=""), "error"
        if k == 4:
            return "framing", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", "any"
        if k == 5:
            return "framing", b"\r\n\r\n\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n", "error"
        if k == 6:
            return "framing", http_bytes("POST", path, body, length=False), "error"  # no Content-Length
        if k == 7:  # a chunked body: supported or refused, both are right
            chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
            return "framing", http_bytes("POST", path, chunked, headers={"Transfer-Encoding": "chunked",
                                                                         "Content-Length": None}), "any"
        return "framing", b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", "any"

    @gen(2)
    def long_headers():  # each well over 64 KB of header
        k = rng.randrange(3)
        if k == 0:
            h = {"X-Long": "a" * rng.choice([70000, 300000])}
        elif k == 1:
            h = {f"X-H{i}": "v" * 20 for i in range(rng.choice([5000, 20000]))}
        else:
            h = {"X-" + "n" * 100000: "v"}
        return "long_headers", http_bytes("GET", "/health", b"", headers=h), "error"

    @gen(20)
    def valid():
        path = rng.choice([CHAT, COMPLETIONS, "/health", "/v1/models"])
        if path in (CHAT, COMPLETIONS):
            body = chat_body(rng) if path == CHAT else completion_body(rng)
            body["stream"] = rng.random() < 0.3
            return "valid", http_bytes("POST", path, json.dumps(body).encode()), "valid"
        return "valid", http_bytes("GET", path), "valid"

    total = sum(w for w, _ in gens)
    out = []
    for _ in range(n):
        x = rng.uniform(0, total)
        for w, f in gens:
            x -= w
            if x <= 0:
                break
        cat, data, expect = f()
        out.append((cat, data.replace(b"Content-Length: None\r\n", b""), expect))
    return out


class Conn:
    """A keep-alive raw socket: send bytes, read one response (status, headers, body), or see a close."""

    def __init__(self, port, timeout):
        self.port, self.timeout, self.sock, self.buf = port, timeout, None, b""

    def close(self):
        if self.sock:
            self.sock.close()
        self.sock, self.buf = None, b""

    def exchange(self, data, head_request=False):
        """-> ("response", status, headers, body) | ("closed",) | ("hang",); reconnects when needed."""
        fresh = self.sock is None
        if fresh:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        try:
            self.sock.sendall(data)
        except OSError:
            # the server may close as it answers early (an oversized body): read what it said
            pass
        try:
            r = self.read_response(head_request)
        except socket.timeout:
            self.close()
            return ("hang",)
        except OSError:
            r = None
        if r is None:
            self.close()
            if not fresh:  # a keep-alive connection the server had closed: once more on a fresh one
                return self.exchange(data, head_request)
            return ("closed",)
        status, headers, body = r
        if headers.get("connection", "").lower() == "close" or r[0] is None:
            self.close()
        return ("response", status, headers, body)

    def recv(self):
        b = self.sock.recv(65536)
        if not b:
            raise ConnectionResetError("eof")
        self.buf += b

    def read_response(self, head_request):
        try:
            while b"\r\n\r\n" not in self.buf:
                self.recv()
        except ConnectionResetError:
            return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1])
        headers = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            headers[k.strip().lower()] = v.strip()
        if head_request or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self.recv()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self.recv()
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    return status, headers, body
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                self.recv()
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, headers, body
        try:  # to the close
            while True:
                self.recv()
        except ConnectionResetError:
            pass
        body, self.buf = self.buf, b""
        headers["connection"] = "close"
        return status, headers, body


def judge(cat, expect, out, head_request):
    """None if the outcome is right for the case, else why not."""
    if out[0] == "hang":
        return "no answer and no close (hang)"
    if out[0] == "closed":
        return None if expect in ("error", "any", "lenient") else "closed without an answer"
    _, status, headers, body = out
    if status >= 500 and status != 503 and not (status in (501, 505) and cat in ("methods_paths", "framing")):
        return f"status {status}"
    if expect == "error" and not 400 <= status < 500:
        return f"status {status}, want 4xx"
    if expect == "valid" and status not in (200, 503):
        return f"status {status}, want 200 or 503"
    transport = cat in ("long_headers", "framing")  # the HTTP layer's own refusals may carry its own page
    if status >= 400 and body and not head_request and not transport and not is_error_json(body):
        return f"status {status} body is not OpenAI error JSON: {body[:120]!r}"
    return None


def hostile(suite, jetmoe, m, tmp, asan):
    n, workers, seed = 10000, 16, 20240601
    timeout = 60 if asan else 30
    try:
        srv = Server(jetmoe, m, "--api-key", API_KEY, "--parallel", 2, "--queue", 64, "--ctx", 256,
                     "--threads", 1, "--max-body", 1 << 20)
    except RuntimeError as e:
        suite.check("serve_hostile_start", False, str(e))
        return
    t0 = time.time()
    todo = cases(seed, n)
    # a few 10 MB bodies, sent whole or only announced
    big = json.dumps(chat_body(random.Random(1), messages=[{"role": "user", "content": "x" * (10 << 20)}])).encode()
    for i in range(4):
        todo.insert(i * 2500, ("huge_body", http_bytes("POST", CHAT, big), "error"))
        todo.insert(i * 2500 + 1, ("huge_body", http_bytes("POST", CHAT, b"", headers={
            "Content-Length": str(10 << 20), "Content-Type": "application/json"}), "error"))
    counts, fails, failed_cats, statuses, lock = {}, [], {}, {}, threading.Lock()
    it = iter(enumerate(todo))
    lenient = 0

    def worker():
        nonlocal lenient
        c = Conn(srv.port, timeout)
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                break
            i, (cat, data, expect) = nxt
            head_request = data.startswith(b"HEAD ")
            try:
                out = c.exchange(data, head_request)
            except OSError as e:  # could not even connect
                out = ("refused", str(e))
            why = f"connect failed: {out[1]}" if out[0] == "refused" else judge(cat, expect, out, head_request)
            if cat in ("huge_body", "long_headers", "framing"):
                c.close()  # the rest of a refused or misframed request may still be on this socket
            with lock:
                counts[cat] = counts.get(cat, 0) + 1
                key = out[1] if out[0] == "response" else out[0]
                statuses[key] = statuses.get(key, 0) + 1
                if expect == "lenient" and out[0] == "response" and out[1] == 200:
                    lenient += 1
                if why:
                    fails.append(f"#{i} {cat}: {why}; request {data[:160]!r}")
                    failed_cats[cat] = failed_cats.get(cat, 0) + 1
        c.close()

    # slow clients: a byte a second of a valid request, in parallel with everything else
    slow_stop, slow_out = threading.Event(), []

    def slow(k):
        req = http_bytes("POST", CHAT, json.dumps(chat_body(random.Random(k))).encode())
        try:
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        except OSError as e:
            slow_out.append(f"connect: {e}")
            return
        sent = 0
        try:
            while not slow_stop.is_set() and sent < len(req):
                s.sendall(req[sent:sent + 1])
                sent += 1
                slow_stop.wait(1.0)
            slow_out.append(f"sent {sent} bytes")
        except OSError:
            slow_out.append(f"closed by the server after {sent} bytes")
        finally:
            s.close()

    slows = [threading.Thread(target=slow, args=(k,), daemon=True) for k in range(4)]
    for t in slows:
        t.start()
    time.sleep(1.5)
    # with the slow clients mid-request, a normal request is answered at once
    t1 = time.time()
    try:
        st, _, _ = srv.request("GET", "/health", timeout=10)
    except OSError as e:
        st = str(e)
    during = (st, time.time() - t1)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    slow_stop.set()
    for t in slows:
        t.join(10)
    fuzz_secs = time.time() - t0
    stuck = sum(t.is_alive() for t in threads)

    sent = sum(counts.values())
    per_cat = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0])))
    suite.check("serve_hostile_requests", not fails and not stuck and sent == len(todo) and srv.alive(),
                f"{len(fails)} wrong of {sent} ({stuck} workers stuck, server alive: {srv.alive()}; by category: "
                + ", ".join(f"{k} {v}" for k, v in sorted(failed_cats.items())) + "): " + " | ".join(fails[:6]),
                f"{sent} requests in {fuzz_secs:.1f}s, {workers} keep-alive sockets; {per_cat}; outcomes {codes}; "
                f"{lenient} numbers written 01 or 1. accepted")
    suite.check("serve_hostile_slow_clients", during[0] == 200 and during[1] < 5,
                f"GET /health while 4 clients dripped a byte a second: {during[0]} after {during[1]:.1f}s",
                f"/health answered in {during[1] * 1000:.0f} ms beside 4 slow clients; they: {'; '.join(slow_out)}")
    # and after all that, a normal request
    try:
        st, _, body = srv.request("POST", CHAT, chat_body(random.Random(5), max_tokens=8),
                                  headers={"Authorization": "Bearer " + API_KEY}, timeout=timeout)
        j = json.loads(body) if st == 200 else {}
        ok = st == 200 and isinstance(j["choices"][0]["message"]["content"], str)
    except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException) as e:
        st, body, ok = type(e).__name__, str(e).encode(), False
    suite.check("serve_hostile_then_normal", ok and srv.alive(), f"{st}: {body[:300]!r}")
    rc = srv.stop()
    bad = sanitizer_report(srv.stderr())
    suite.check("serve_hostile_exit", rc == 0 and not bad,
                f"exit {rc} after SIGTERM{' with a sanitizer report' if bad else ''}: {srv.stderr()[-1500:]}")
