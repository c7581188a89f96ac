"""`jetmoe serve` end to end over HTTP (urllib/http.client/raw sockets), on the untrained tiny model of
cli_tests.tiny_model (context 128) and, where a request must hold its slot for a while, a wider one with a
context of 4096 (`slow`: a 4000-token greedy reply takes ~3 s). Each server is started on --port 0 and its
port read from the "listening on http://127.0.0.1:PORT" line.

  serve_endpoints_shape            /health, /v1/models (id = the directory's name), / (the page), chat and
                                   text completions in OpenAI's shape with usage adding up
  serve_stream_chunks              chat and text streams: text/event-stream, every event parses, the chat
                                   stream opens with the role, the last chunk has finish_reason, then [DONE];
                                   the pieces join to the non-streamed reply
  serve_greedy_matches_generate    temperature 0 == `jetmoe generate --greedy --max-new N` on the same prompt,
                                   alone and with 4 sampled requests decoding beside it
  serve_stop_string                a stop string ends the reply before it, finish_reason "stop"
  serve_errors                     400 (bad JSON, wrong types, out of range, n=2, too many stops, a prompt over
                                   the context), 404, 405, 413 (Content-Length and chunked), in OpenAI's shape
  serve_queue_full_503             --parallel 1 --queue 1: a third request while one runs and one waits: 503
  serve_api_key                    --api-key: none or a wrong key 401, the right one 200, /health open
  serve_disconnect_frees_slot      --parallel 1: a streaming client that hangs up mid-reply frees the slot
                                   (the next request is answered long before the abandoned reply would end)
  serve_shutdown_inflight          SIGTERM with a request in flight: it completes, exit 0
  serve_generation_config_defaults the checkpoint's generation_config.json (temperature 0, max_new_tokens 3)
                                   is a request's default: two seeds agree, 3 tokens; the request's own
                                   max_tokens wins; a malformed file stops serve with its name and field

Called from tests/run_tests.py as run(suite, build, tmp).
"""
import http.client
import json
import os
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
CHECKS = ("serve_endpoints_shape", "serve_stream_chunks", "serve_greedy_matches_generate", "serve_stop_string",
          "serve_errors", "serve_queue_full_503", "serve_api_key", "serve_disconnect_frees_slot",
          "serve_shutdown_inflight", "serve_generation_config_defaults")


class Server:
    def __init__(self, jetmoe, model, *args):
        self.p = subprocess.Popen([jetmoe, "serve", model, "--port", "0", "--threads", "1", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        self.port, self.err = None, ""
        line = self.p.stderr.readline()  # the first line: listening, or the error
        self.err += line
        m = re.match(r"listening on http://127\.0\.0\.1:(\d+)$", line.strip())
        if m:
            self.port = int(m.group(1))
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self):
        for line in self.p.stderr:
            self.err += line

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, headers, body bytes)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = json.dumps(body) if isinstance(body, (dict, list)) else body
        h = {"Content-Type": "application/json"} if data is not None else {}
        h.update(headers or {})
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        out = (r.status, dict(r.getheaders()), r.read())
        c.close()
        return out

    def post(self, path, body, **kw):
        st, h, b = self.request("POST", path, body, **kw)
        try:
            return st, h, json.loads(b)
        except ValueError:
            return st, h, b

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = "timeout"
        self.reader.join(timeout=5)
        return rc


def sse_events(raw):
    """The data lines of an event stream, in order; None if the framing is off."""
    text = raw.decode()
    if not text.endswith("\n\n"):
        return None
    events = []
    for block in text[:-2].split("\n\n"):
        if not block.startswith("data: ") or "\n" in block:
            return None
        events.append(block[6:])
    return events


def run(suite, build, tmp):
    if not any(suite.wanted(n) for n in CHECKS):
        return
    jetmoe = os.path.join(ROOT, build, "jetmoe")

    def jm(*args):
        p = subprocess.run([jetmoe] + list(args), capture_output=True, text=True, errors="replace", timeout=300)
        return p

    d = os.path.join(tmp, "serve")
    model = tiny_model(suite, jm, d)
    if not model:
        return
    slow = os.path.join(d, "slow")
    with open(os.path.join(d, "slow.json"), "w") as f:
        # slow enough that a 4000-token reply takes seconds (2 s on one thread of an AMD EPYC family 26
        # model 2; at hidden 256 it took 1 s, as long as the queue test's pauses, and that test flaked)
        json.dump(dict(vocab_size=400, hidden_size=512, num_hidden_layers=2, num_key_value_heads=2, kv_channels=64,
                       intermediate_size=1024, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=4096), f)
    p = jm("init", slow, "--config", os.path.join(d, "slow.json"), "--seed", "5")
    for f in os.listdir(os.path.join(d, "tok")):
        shutil.copy(os.path.join(d, "tok", f), slow)

    servers = []

    def start(m, *args):
        s = Server(jetmoe, m, *args)
        servers.append(s)
        return s

    def finish(s, name):
        """Stops s; a crash or a sanitizer report fails the check name."""
        rc = s.stop()
        if rc != 0 or sanitizer_report(s.err):
            suite.check(name + "_clean_exit", False, f"exit {rc}: {s.err[-1500:]}")

    try:
        s = start(model)
        if s.port is None:
            suite.check("serve_endpoints_shape", False, f"no listening line: {s.err[-500:]}")
            s.stop()
            return
        endpoints(suite, s)
        streams(suite, s)
        greedy(suite, s, jm, model)
        errors(suite, s)
        finish(s, "serve_main")

        if suite.wanted("serve_api_key"):
            s = start(model, "--api-key", "sk-test-123")
            body = {"prompt": "The", "max_tokens": 2}
            a = s.post("/v1/completions", body)[0]
            b = s.post("/v1/completions", body, headers={"Authorization": "Bearer sk-test-124"})[0]
            c = s.post("/v1/completions", body, headers={"Authorization": "Bearer sk-test-12"})[0]
            e = s.post("/v1/completions", body, headers={"Authorization": "Bearer sk-test-123"})[0]
            m = s.request("GET", "/v1/models")[0]
            h = s.request("GET", "/health")[0]
            suite.check("serve_api_key", (a, b, c, e, m, h) == (401, 401, 401, 200, 401, 200),
                        f"none/wrong/prefix/right/models/health: {(a, b, c, e, m, h)}")
            finish(s, "serve_api_key")

        if suite.wanted("serve_generation_config_defaults"):
            g = os.path.join(d, "with_gen")
            shutil.rmtree(g, ignore_errors=True)
            shutil.copytree(model, g)
            gpath = os.path.join(g, "generation_config.json")
            with open(gpath, "w") as f:
                json.dump({"bos_token_id": 1, "eos_token_id": 2, "temperature": 0, "max_new_tokens": 3}, f)
            s = start(g)
            r = [s.post("/v1/completions", {"prompt": "The", "seed": k}) for k in (1, 2)]
            six = s.post("/v1/completions", {"prompt": "The", "seed": 1, "max_tokens": 6})
            finish(s, "serve_generation_config_defaults")
            with open(gpath, "w") as f:
                f.write('{"top_p": 1.5}')
            bad = start(g)
            rc = bad.stop()
            texts = [x[2]["choices"][0]["text"] if x[0] == 200 else None for x in r]
            ok = all(x[0] == 200 for x in r + [six]) and texts[0] == texts[1] and \
                r[0][2]["usage"]["completion_tokens"] <= 3 and six[2]["usage"]["completion_tokens"] > 3 and \
                bad.port is None and rc != 0 and gpath in bad.err and "top_p" in bad.err
            suite.check("serve_generation_config_defaults", ok,
                        f"{str(r)[:400]} max_tokens 6: {str(six)[:200]}; malformed: exit {rc} {bad.err[-300:]!r}")

        if p.returncode != 0:
            suite.check("serve_slow_model_setup", False, p.stderr[-400:])
            return
        long_req = {"prompt": "The", "max_tokens": 4000, "temperature": 0}
        if suite.wanted("serve_queue_full_503"):
            s = start(slow, "--parallel", "1", "--queue", "1")
            results = []
            t1 = threading.Thread(target=lambda: results.append(s.post("/v1/completions", long_req, timeout=600)[0]))
            t1.start()
            time.sleep(0.25)  # running
            t2 = threading.Thread(target=lambda: results.append(s.post("/v1/completions", long_req, timeout=600)[0]))
            t2.start()
            time.sleep(0.25)  # waiting
            st, _, body = s.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
            t1.join()
            t2.join()
            suite.check("serve_queue_full_503", st == 503 and sorted(results) == [200, 200] and
                        isinstance(body, dict) and body.get("error", {}).get("code") == "server_overloaded",
                        f"third: {st} {body}; the others: {results}")
            finish(s, "serve_queue_full_503")

        if suite.wanted("serve_disconnect_frees_slot"):
            s = start(slow, "--parallel", "1")
            t0 = time.time()
            s.post("/v1/completions", long_req)
            full = time.time() - t0
            sock = socket.create_connection(("127.0.0.1", s.port))
            body = json.dumps(dict(long_req, stream=True)).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            first = sock.recv(4096)
            sock.close()
            t0 = time.time()
            st, _, out = s.post("/v1/completions", {"prompt": "The", "max_tokens": 4, "temperature": 0})
            took = time.time() - t0
            suite.check("serve_disconnect_frees_slot", b"200 OK" in first and st == 200 and took < full / 2,
                        f"first bytes {first[:60]!r}; next request {st} after {took:.2f}s (a whole reply: {full:.2f}s)",
                        f"next request answered after {took:.2f}s, a whole reply takes {full:.2f}s")
            finish(s, "serve_disconnect_frees_slot")

        if suite.wanted("serve_shutdown_inflight"):
            s = start(slow, "--parallel", "1")
            res = []
            t = threading.Thread(target=lambda: res.append(s.post("/v1/completions", dict(long_req, max_tokens=1500))))
            t.start()
            time.sleep(0.4)
            s.p.send_signal(signal.SIGTERM)
            t.join(timeout=30)
            rc = s.stop()
            ok = rc == 0 and res and res[0][0] == 200 and res[0][2]["choices"][0]["finish_reason"] == "length"
            suite.check("serve_shutdown_inflight", ok and not sanitizer_report(s.err),
                        f"exit {rc}; in flight: {str(res)[:300]}; stderr {s.err[-600:]}")
    finally:
        for s in servers:
            if s.p.poll() is None:
                s.p.kill()
                s.p.wait()


def endpoints(suite, s):
    if not suite.wanted("serve_endpoints_shape"):
        return
    problems = []
    st, h, b = s.request("GET", "/health")
    if st != 200 or json.loads(b) != {"status": "ok"}:
        problems.append(f"/health {st} {b!r}")
    st, h, b = s.request("GET", "/v1/models")
    m = json.loads(b) if st == 200 else None
    if not m or m.get("object") != "list" or [x["id"] for x in m["data"]] != ["model"]:
        problems.append(f"/v1/models {st} {b!r}")
    st, h, b = s.request("GET", "/")
    if st != 200 or not h.get("Content-Type", "").startswith("text/html") or b"<html" not in b.lower():
        problems.append(f"/ {st} {h.get('Content-Type')} {b[:80]!r}")
    st, _, r = s.post("/v1/chat/completions", {"model": "model", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 5, "seed": 1})
    try:
        c = r["choices"][0]
        u = r["usage"]
        ok = st == 200 and r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion" and \
            isinstance(r["created"], int) and r["model"] == "model" and c["index"] == 0 and \
            c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str) and \
            c["finish_reason"] in ("stop", "length") and u["completion_tokens"] <= 5 and \
            u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] > 5
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        problems.append(f"chat {st} {r}")
    st, _, r = s.post("/v1/completions", {"prompt": "The license", "max_tokens": 6, "temperature": 0})
    try:
        c = r["choices"][0]
        ok = st == 200 and r["id"].startswith("cmpl-") and r["object"] == "text_completion" and \
            isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length") and \
            r["usage"]["completion_tokens"] <= 6 and (c["finish_reason"] == "stop") == (r["usage"]["completion_tokens"] < 6)
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        problems.append(f"completions {st} {r}")
    suite.check("serve_endpoints_shape", not problems, "; ".join(problems))


def streams(suite, s):
    if not suite.wanted("serve_stream_chunks"):
        return
    problems = []
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count."}]}),
                       ("/v1/completions", {"prompt": "It is"})):
        body = dict(body, max_tokens=20, temperature=0)
        st, h, raw = s.request("POST", path, dict(body, stream=True))
        ev = sse_events(raw) if st == 200 else None
        if not h.get("Content-Type", "").startswith("text/event-stream") or not ev or ev[-1] != "[DONE]":
            problems.append(f"{path}: {st} {h.get('Content-Type')} {raw[-200:]!r}")
            continue
        chunks = [json.loads(e) for e in ev[:-1]]
        chat = path.startswith("/v1/chat")
        obj = "chat.completion.chunk" if chat else "text_completion"
        if any(c["object"] != obj or c["id"] != chunks[0]["id"] for c in chunks):
            problems.append(f"{path}: object/id {chunks[:2]}")
        last = chunks[-1]["choices"][0]
        if last["finish_reason"] not in ("stop", "length") or any(
                c["choices"][0]["finish_reason"] is not None for c in chunks[:-1]):
            problems.append(f"{path}: finish_reason {chunks[-1]}")
        if chat:
            if chunks[0]["choices"][0]["delta"] != {"role": "assistant"} or last["delta"] != {}:
                problems.append(f"{path}: role first / empty delta last: {chunks[0]} {chunks[-1]}")
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        else:
            text = "".join(c["choices"][0]["text"] for c in chunks)
        st, _, whole = s.post(path, body)
        want = whole["choices"][0]["message"]["content"] if chat else whole["choices"][0]["text"]
        if text != want:
            problems.append(f"{path}: streamed {text!r} != whole {want!r}")
    suite.check("serve_stream_chunks", not problems, "; ".join(problems))


def greedy(suite, s, jm, model):
    if suite.wanted("serve_greedy_matches_generate"):
        prompts = ["The license", "You may not use this file except", "Copyright (C) 2007 Free"]
        problems = []
        for i, prompt in enumerate(prompts):
            n = 24 + 8 * i
            g = jm("generate", model, "--prompt", prompt, "--greedy", "--max-new", str(n), "--quiet", "--threads", "1")
            req = {"prompt": prompt, "max_tokens": n, "temperature": 0}
            alone = s.post("/v1/completions", req)[2]["choices"][0]["text"]
            # with 4 sampled requests decoding beside it (started together: all in one batch)
            out, others = {}, []

            def one(k, body):
                out[k] = s.post("/v1/completions", body)

            ts = [threading.Thread(target=one, args=(k, {"prompt": f"Other {k} {prompt}", "max_tokens": 40,
                                                         "temperature": 1.0, "seed": k})) for k in range(4)]
            ts.append(threading.Thread(target=one, args=("g", req)))
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            busy = out["g"][2]["choices"][0]["text"]
            others = [out[k][0] for k in range(4)]
            want = g.stdout
            for name, text in (("alone", alone), ("batched", busy)):
                got = prompt + text
                got += "" if got.endswith("\n") else "\n"
                if g.returncode != 0 or got != want:
                    problems.append(f"{prompt!r} {name}: {got!r} != generate's {want!r} {g.stderr[-200:]}")
            if others != [200] * 4:
                problems.append(f"the other requests: {others}")
        suite.check("serve_greedy_matches_generate", not problems, "; ".join(problems),
                    f"{len(prompts)} prompts, alone and beside 4 sampled requests")
    if suite.wanted("serve_stop_string"):
        whole = s.post("/v1/completions", {"prompt": "The license", "max_tokens": 30, "temperature": 0})[2]
        text = whole["choices"][0]["text"]
        stop = text[5:8] if len(text) > 8 else None
        r = s.post("/v1/completions", {"prompt": "The license", "max_tokens": 30, "temperature": 0,
                                       "stop": [stop, "\u00e9\u00e9"]})[2] if stop else None
        ok = r is not None and r["choices"][0]["text"] == text[:text.index(stop)] and \
            r["choices"][0]["finish_reason"] == "stop"
        suite.check("serve_stop_string", ok, f"whole {text!r}, stop {stop!r}: {r}")


def errors(suite, s):
    if not suite.wanted("serve_errors"):
        return
    comp, chat = "/v1/completions", "/v1/chat/completions"
    user = [{"role": "user", "content": "Hi"}]
    cases = [
        (comp, "{not json", 400, None),
        (comp, '{"prompt": "x", "temperature": NaN}', 400, None),
        (comp, "[1, 2]", 400, None),
        (comp, {"max_tokens": 3}, 400, "prompt"),
        (comp, {"prompt": 7}, 400, "prompt"),
        (comp, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        (comp, {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
        (comp, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        (comp, {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
        (comp, '{"prompt": "x", "temperature": 1e999}', 400, "temperature"),
        (comp, {"prompt": "x", "top_p": 0}, 400, "top_p"),
        (comp, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
        (comp, {"prompt": "x", "seed": "one"}, 400, "seed"),
        (comp, {"prompt": "x", "stream": "yes"}, 400, "stream"),
        (comp, {"prompt": "x", "n": 2}, 400, "n"),
        (comp, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        (comp, {"prompt": "x", "stop": [""]}, 400, "stop"),
        (comp, {"prompt": "x", "stop": 3}, 400, "stop"),
        (comp, {"prompt": "x", "model": 3}, 400, "model"),
        (comp, {"prompt": "word " * 200}, 400, "prompt"),
        (chat, {"messages": []}, 400, "messages"),
        (chat, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        (chat, {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
        (chat, {"messages": user * 60}, 400, "messages"),
    ]
    problems = []
    for path, body, want, param in cases:
        st, h, r = s.post(path, body)
        e = r.get("error") if isinstance(r, dict) else None
        if st != want or not e or set(e) != {"message", "type", "param", "code"} or not e["message"] or \
                e["param"] != param or e["type"] != "invalid_request_error":
            problems.append(f"{path} {str(body)[:60]}: {st} {r}")
    st, _, r = s.post(comp, {"prompt": "word " * 200})
    if "does not fit the context of 128" not in r["error"]["message"]:
        problems.append(f"too long: {r}")
    for method, path, want in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                               ("POST", "/v1/models", 405), ("DELETE", "/health", 405)):
        st, h, b = s.request(method, path, "{}" if method == "POST" else None)
        e = json.loads(b).get("error", {})
        if st != want or not e.get("message") or (want == 405 and "Allow" not in h):
            problems.append(f"{method} {path}: {st} {b!r}")
    # over --max-body (1 MB): told by Content-Length before the body is read, and a chunked body as it comes
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()

    def raw(head, parts):
        """Sends head, then the parts while the server reads them; the status line's code."""
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        got = b""
        try:
            sock.sendall(head)
            for part in parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before the body was all sent, and closed
        try:
            while b"\r\n\r\n" not in got:
                more = sock.recv(65536)
                if not more:
                    break
                got += more
        except ConnectionResetError:
            pass
        sock.close()
        m = re.match(rb"HTTP/1\.1 (\d+)", got)
        return int(m.group(1)) if m else got[:100]

    st = raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
             str(len(big)).encode() + b"\r\n\r\n", [big[:1000]])
    if st != 413:
        problems.append(f"Content-Length over the limit: {st}")
    chunks = [b"%x\r\n%s\r\n" % (len(big[i:i + 65536]), big[i:i + 65536]) for i in range(0, len(big), 65536)]
    st = raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n", chunks + [b"0\r\n\r\n"])
    if st != 413:
        problems.append(f"chunked over the limit: {st}")
    # and the server still answers
    if s.request("GET", "/health")[0] != 200:
        problems.append("no answer after the errors")
    suite.check("serve_errors", not problems, "; ".join(problems), f"{len(cases) + 7} bad requests")
