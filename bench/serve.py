#!/usr/bin/python3
"""`jetmoe serve` under concurrent streaming clients: aggregate decode tokens/s at 1, 2, 4 and 8
streams (continuous batching over --parallel 8 slots), on the small bench config and on the
JetMoE-8B layout (q4, random weights). Prints figures; never passes or fails.

  bench/serve.py [--streams 1,2,4,8] [--threads 2] [--skip-8b] [--skip-small] [--synthetic DIR] [--build build]

Each client streams POST /v1/completions (a ~40-token prompt, temperature 0, stream_options.include_usage)
and the server's usage gives its tokens; a row is N clients each making --requests requests back to
back. "decode tok/s" is the streams' completion tokens over the time from the first token of the round
to its last (prefill of the first prompts excluded); "ttft" the median time to a stream's first token.
The models have no tokenizer of their own: both have Llama-2's vocabulary (32000), so the Llama-2
tokenizer of ../shared/fixtures is passed with --tokenizer (the rows are skipped without it).

Small config: bench/common.h's (via build/bench/decode --bench-config), `jetmoe init`, fp32.
8B layout: DIR/q4 (default build/synthetic-8b/q4), made by bench/decode.py (make bench-8b runs it first).
The goal on the 8B layout is 4 streams >= 3x one stream's tokens/s: a decode step reads the active
experts' weights once for every sequence in the batch, so until compute binds, more streams are
nearly free.
"""
import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from run_bench import cpu_model, load_note  # noqa: E402

LLAMA_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "llama2-tokenizer", "tokenizer.model")
PROMPT = ("The history of the printing press begins in the fifteenth century, when movable type made it "
          "possible to produce books quickly. Its effects on")


def start(jetmoe, model, args, threads):
    cmd = [jetmoe, "serve", model, "--port", "0", "--threads", str(threads)] + args
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, errors="replace")
    port = None
    for line in p.stderr:
        m = re.search(r"listening on http://[^:\s]+:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
        sys.stderr.write(line)
    if port is None:
        p.wait()
        raise RuntimeError(f"jetmoe serve exited {p.returncode} before listening")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()  # keep draining
    return p, port


def stream(port, max_tokens, seed):
    """One streamed completion -> (t_first_token, t_last_token, completion tokens), wall-clock times."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}: {r.read()[:300]!r}")
    first = last = None
    tokens, chunks = None, 0
    for line in r:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        j = json.loads(data)
        if j.get("usage"):
            tokens = j["usage"]["completion_tokens"]
        if j.get("choices"):
            now = time.time()
            first = first or now
            last = now
            chunks += 1
    c.close()
    return first, last, tokens if tokens is not None else chunks


def round_of(port, n, requests, max_tokens):
    """n clients, each `requests` streams back to back -> (decode tok/s, median ttft s, tokens)."""
    out, errors = [], []

    def client(k):
        for j in range(requests):
            t0 = time.time()
            try:
                f, l, tok = stream(port, max_tokens, 1000 * k + j)
                out.append((t0, f, l, tok))
            except Exception as e:  # noqa: BLE001 (a bench reports, it does not stop)
                errors.append(str(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors or not out:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:1]}")
    tokens = sum(r[3] for r in out)
    span = max(r[2] for r in out) - min(r[1] for r in out)
    ttft = statistics.median(r[1] - r[0] for r in out)
    return tokens / max(span, 1e-9), ttft, tokens


def table(name, jetmoe, model, a, max_tokens, extra):
    try:
        p, port = start(jetmoe, model, ["--parallel", str(max(a.stream_list)), "--tokenizer", LLAMA_TOKENIZER]
                        + extra, a.threads)
    except RuntimeError as e:
        print(f"{name}: {e}")
        return
    try:
        stream(port, 4, 0)  # warm-up: pages in the weights
        rows = {}
        for n in a.stream_list:
            rows[n] = round_of(port, n, a.requests, max_tokens)
            print(f"  {n} stream{'s' if n > 1 else ''}: {rows[n][0]:.2f} tok/s", file=sys.stderr, flush=True)
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)
    one = rows[a.stream_list[0]][0]
    print(f"{name}: {a.requests} streamed completions per client, {max_tokens} new tokens each, "
          f"prompt {len(PROMPT)} chars, --threads {a.threads}, --parallel {max(a.stream_list)}; {cpu_model()}")
    print(f"  {'streams':>7} {'decode tok/s':>12} {'vs 1':>6} {'ttft p50':>9} {'tokens':>7}")
    for n, (tps, ttft, tokens) in rows.items():
        print(f"  {n:7d} {tps:12.2f} {tps / one:5.2f}x {ttft:8.2f}s {tokens:7d}")
    if 4 in rows:
        print(f"  4 streams vs 1: {rows[4][0] / one:.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=2, help="streams per client, back to back")
    ap.add_argument("--build", default="build")
    ap.add_argument("--synthetic", default=os.path.join(ROOT, "build", "synthetic-8b"),
                    help="the 8B-layout checkpoints (q4/ is served)")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-small", action="store_true")
    a = ap.parse_args()
    a.stream_list = sorted({int(s) for s in a.streams.split(",")})
    jetmoe = os.path.join(ROOT, a.build, "jetmoe")
    if not os.path.exists(LLAMA_TOKENIZER):
        print(f"serve bench: skipped, no Llama-2 tokenizer at {LLAMA_TOKENIZER} (both models use its vocabulary)")
        return 0
    load_note()
    if not a.skip_small:
        with tempfile.TemporaryDirectory(prefix="jetmoe-serve-bench-") as td:
            cfg, model = os.path.join(td, "config.json"), os.path.join(td, "model")
            subprocess.run([os.path.join(ROOT, a.build, "bench", "decode"), "--bench-config", cfg], check=True)
            subprocess.run([jetmoe, "init", model, "--config", cfg, "--seed", "1"], check=True,
                           stdout=subprocess.DEVNULL)
            table("serve, small config (bench/common.h, fp32)", jetmoe, model, a, 64, ["--ctx", "512"])
    if not a.skip_8b:
        q4 = os.path.join(a.synthetic, "q4")
        if not os.path.exists(os.path.join(q4, "config.json")):
            print(f"serve, 8B layout: skipped, no checkpoint at {q4} (bench/decode.py makes it: make bench-8b)")
            return 0
        table(f"serve, JetMoE-8B layout (q4, random weights, {q4})", jetmoe, q4, a, 16,
              ["--ctx", "256", "--kv-cache", "bf16"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
