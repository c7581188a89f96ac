#!/usr/bin/python3
"""Decode benchmarks: KV-cached greedy decoding of the C model against the
PyTorch peer on the small bench config, and on JetMoE-8B's layout (random
weights) in BF16, Q8 and Q4 against the memory-bandwidth roofline. Prints
figures; never passes or fails.

  bench/decode.py [--threads 1,2] [--synthetic DIR] [--skip-8b] [--skip-small] [--kv-cache bf16] [--build build]
                  [--reps 3] [--reps-8b 2]

Every figure is given at each thread count side by side (default 1 and 2),
and a row where more threads decode slower is marked.

Small config (bench/common.h): `jetmoe init` writes a random fp32 checkpoint
to a temporary directory; build/bench/decode and bench/decode_ref.py decode
it with the same prompt (128 tokens, then 64 new) and threads; the ratios
C / PyTorch of prefill and decode tokens/s are printed, and whether the two
greedy decodes agree.

8B layout: DIR (default build/synthetic-8b) gets bf16/ from bench/make_synthetic
and q8/, q4/ from `jetmoe quantize` when they are absent (about 17 + 9 + 5 GB;
the first run takes some minutes), then build/bench/decode runs on each with a
512-token prompt and 16 new tokens, and once more at each thread count with
--kernels read (products that only read their bytes): what the same steps
cost at the memory system's pace, and the kernels' share of the gap. Each
step there is also paired with a 256 MB read right after it (bench/decode
--paired): the median step against the machine as it was then, beside the
roofline's best of 20 reads. Each
figure is the best of --reps-8b rounds (2), as the small config's of --reps. A token
reads ~4.7 GB of active BF16 weights (2.3B parameters: k of E experts), so
there decode is bound by memory bandwidth to a few tokens/s, and a 512-token
prefill takes about a minute.
"""
import argparse
import ctypes
import json
import os
import struct
import subprocess
import sys
import time
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from run_bench import json_lines, load_note  # noqa: E402


def run(cmd, env):
    """Runs a bench (its progress and summary go to our stderr) -> its JSON result."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True).stdout
    return json_lines(out)[-1]


def leading_agreement(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def thread_env(t):
    """t threads, and OpenMP's passive waiting, as the jetmoe CLI starts itself (cli/main.c), for both sides."""
    return dict(os.environ, OMP_NUM_THREADS=str(t), OMP_WAIT_POLICY="passive")


def keep_best(best, t, r):
    """best[t] becomes run r if it decoded faster than the one kept (or none is)."""
    if t not in best or r["decode_tok_s"] > best[t]["decode_tok_s"]:
        best[t] = r


def flag(r1, r2):
    """The 2-thread column's mark: more threads must never be slower."""
    return "" if r2 >= r1 else "  <- more threads slower"


def small(a):
    decode = os.path.join(ROOT, a.build, "bench", "decode")
    with tempfile.TemporaryDirectory(prefix="jetmoe-decode-") as td:
        cfg_path, model = os.path.join(td, "config.json"), os.path.join(td, "model")
        # the config comes from bench/common.h by way of the C bench, so there is one copy of it
        subprocess.run([decode, "--bench-config", cfg_path], check=True)
        subprocess.run([os.path.join(ROOT, a.build, "jetmoe"), "init", model, "--config", cfg_path, "--seed", "1"],
                       check=True, stdout=subprocess.DEVNULL)
        with open(cfg_path) as f:
            cfg = json.load(f)
        c, py = {}, {}
        # best of a.reps runs, each thread count in turn: on shared virtual CPUs a run can lose a core to
        # someone else for seconds, and the best run is the one that measured the code
        for rep in range(a.reps):
            for t in a.thread_list:
                common = ["--threads", str(t), "--prompt", "128", "--new", "64"]
                keep_best(c, t, run([decode, model] + common, thread_env(t)))
                keep_best(py, t, run(["/usr/bin/python3", os.path.join(ROOT, "bench", "decode_ref.py"), model,
                                      "--check"] + common, thread_env(t)))
        busy_rows = busy(decode, model, a.thread_list)

    t1, tn = a.thread_list[0], a.thread_list[-1]
    print(f"small config: vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"{cfg['num_key_value_heads']} KV heads x {cfg['kv_channels']}, FFN {cfg['intermediate_size']}, "
          f"{cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}; random fp32; prompt 128, 64 new, "
          f"best of {a.reps} runs; "
          f"{c[t1]['cpu']}, {c[t1]['kernels']} kernels")
    print(f"  {'decode tok/s':14}" + "".join(f" {f'{t} thread' + ('s' if t > 1 else ''):>10}" for t in a.thread_list)
          + f" {f'{tn}/{t1}':>6}   prefill tok/s at {tn}")
    for name, r in (("C", c), ("PyTorch", py)):
        print(f"  {name:14}" + "".join(f" {r[t]['decode_tok_s']:10.1f}" for t in a.thread_list)
              + f" {r[tn]['decode_tok_s'] / r[t1]['decode_tok_s']:5.2f}x   {r[tn]['prefill_tok_s']:.0f}"
              + flag(r[t1]["decode_tok_s"], r[tn]["decode_tok_s"]))
    print(f"  {'C / PyTorch':14}" + "".join(f" {c[t]['decode_tok_s'] / py[t]['decode_tok_s']:9.2f}x"
                                            for t in a.thread_list))
    print(f"  {'C / roofline':14}" + "".join(f" {c[t]['ratio']:10.0%}" for t in a.thread_list)
          + f"   ({c[t1]['active_weight_bytes'] / 1e6:.1f} MB per token; read bandwidth "
          + ", ".join(f"{c[t]['bandwidth_gbs']:.1f}" for t in a.thread_list) + " GB/s)")
    # where the step's weights fit in the last-level cache they stay there, and
    # reads of that cache, not the memory, are the ceiling (bench/decode's "cached")
    if all("cached_roofline_tok_s" in c[t] for t in a.thread_list):
        print(f"  {'C / cached':14}" + "".join(f" {c[t]['cached_ratio']:10.0%}" for t in a.thread_list)
              + "   (those MB read again and again: "
              + ", ".join(f"{c[t]['cached_bandwidth_gbs']:.1f}" for t in a.thread_list)
              + " GB/s, the ceiling if they all stay in the caches)")
    ceiling = {t: max(c[t]["roofline_tok_s"], c[t].get("cached_roofline_tok_s", 0)) for t in a.thread_list}
    # the peer against the same ceiling: C can be 2x the peer only where the
    # peer runs at under half of it
    print(f"  {'PyTorch / ceil':14}" + "".join(f" {py[t]['decode_tok_s'] / ceiling[t]:10.0%}"
                                            for t in a.thread_list)
          + "   (of the higher of C's two ceilings: 2x PyTorch is within reach only below 50%)")
    for t in a.thread_list:
        n, total = leading_agreement(c[t]["ids"], py[t]["ids"]), len(c[t]["ids"])
        print(f"  greedy ids at {t} thread{'s' if t > 1 else ''}: C and PyTorch agree on "
              + (f"all {total}" if n == total else f"the first {n} of {total}")
              + f"; PyTorch cached vs uncached reference: max |logits diff| {py[t]['check_max_abs_diff']:.1e}"
              + ("" if py[t]["check_greedy_agrees"] else " (its greedy ids differ!)"), flush=True)
    print(f"  a busy machine: C decode tok/s while other processes spin on cores (each a busy loop)")
    print(f"  {'':14}" + "".join(f" {f'{t} thread' + ('s' if t > 1 else ''):>10}" for t in a.thread_list))
    for hogs, r in busy_rows:
        print(f"  {f'{hogs} spinning':14}" + "".join(
            f" {r[t]:10.1f}" for t in a.thread_list) + "   (" + ", ".join(
            f"{c[t]['decode_tok_s'] / r[t]:.1f}x slower" for t in a.thread_list) + " than quiet)", flush=True)


def busy(decode, model, threads):
    """C decode tok/s at each thread count while 1, then as many processes as
    there are cores spin on busy loops: [(hogs, {threads: tok/s})]."""
    rows = []
    for hogs in sorted({1, os.cpu_count() or 1}):
        procs = [subprocess.Popen(["/usr/bin/python3", "-c", "while True: pass"]) for _ in range(hogs)]
        try:
            time.sleep(0.5)
            rows.append((hogs, {t: run([decode, model, "--threads", str(t), "--prompt", "128", "--new", "64"],
                                       thread_env(t))["decode_tok_s"] for t in threads}))
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return rows


def checkpoint_complete(d):
    """config.json and every file the index names (each is written whole, then renamed)."""
    if not os.path.exists(os.path.join(d, "config.json")):
        return False
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return True
    try:
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            files = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all(os.path.exists(os.path.join(d, fn)) for fn in files)


def stored_interleaved(d):
    """Whether a quantized checkpoint says jetmoe.quant_interleave (its rows
    as decoding reads them best; copies this bench wrote before the key hold
    them row-major, and are re-quantized)."""
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            with open(os.path.join(d, fn), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                return "jetmoe.quant_interleave" in json.loads(f.read(n)).get("__metadata__", {})
    return False


def drop_cached(d):
    """Asks the kernel to drop what the page cache holds of a checkpoint's
    files (the bench's own: their data is untouched), so that the variant
    read next has the room: bf16 and q8 together (~25 GB) overfill a 24 GB
    machine, and a q8 run after bf16 read part of its file from disk
    mid-run (21% of the roofline at one thread, 54% at two right after)."""
    if not os.path.isdir(d):
        return
    for fn in os.listdir(d):
        fd = os.open(os.path.join(d, fn), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(d):
    """Brings a checkpoint's files into the page cache before the bench maps
    them: the three variants (~30 GB) do not fit in RAM together, and a decode
    that waits on the disk measures the disk. -> GB/s.

    Read as `jetmoe` reads them, through a mapping that asks for 2 MB pages
    (MADV_HUGEPAGE, then MADV_POPULATE_READ), after dropping what the cache
    holds of these files (the bench's own; their data is untouched): pages
    cached earlier by read() sit in small folios, which a mapping can only
    map 4 KB at a time, and on a virtual machine that alone cost decoding up
    to half its speed (bench/decode prints how much was on 2 MB pages)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    PROT_READ, MAP_PRIVATE, MADV_HUGEPAGE, MADV_POPULATE_READ = 1, 2, 14, 22
    t0, n = time.time(), 0
    for fn in sorted(os.listdir(d)):
        path = os.path.join(d, fn)
        size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            addr = libc.mmap(None, size, PROT_READ, MAP_PRIVATE, fd, 0) if size else None
            mapped = addr not in (None, ctypes.c_void_p(-1).value)
            if mapped:
                libc.madvise(addr, size, MADV_HUGEPAGE)
            # unmappable (or empty), or before Linux 5.14 (no MADV_POPULATE_READ): read it plainly
            if not mapped or libc.madvise(addr, size, MADV_POPULATE_READ):
                with open(path, "rb") as f:
                    while f.read(64 << 20):
                        pass
            if mapped:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        n += size
    return n / 1e9 / max(time.time() - t0, 1e-9)


def big(a):
    """-> the number of variants that could not be prepared or run."""
    jetmoe = os.path.join(ROOT, a.build, "jetmoe")
    bf16 = os.path.join(a.synthetic, "bf16")
    # make_synthetic skips the shards that are already complete, so a rerun costs nothing
    subprocess.run([os.path.join(ROOT, "bench", "make_synthetic"), bf16], check=True)
    rows, failed = [], 0
    for name in ("bf16", "q8", "q4"):
        d = os.path.join(a.synthetic, name)
        try:
            if name != "bf16" and not (checkpoint_complete(d) and stored_interleaved(d)):
                # the directory is this bench's own (or absent): --overwrite replaces only what it wrote
                print(f"$ jetmoe quantize {bf16} --to {name} --out {d} --overwrite", file=sys.stderr, flush=True)
                subprocess.run([jetmoe, "quantize", bf16, "--to", name, "--out", d, "--overwrite"], check=True)
            for other in ("bf16", "q8", "q4"):
                if other != name:
                    drop_cached(os.path.join(a.synthetic, other))
            print(f"{name}: read through the page cache at {read_through(d):.1f} GB/s", file=sys.stderr, flush=True)
            def decode(t, kernels="auto"):
                return run([os.path.join(ROOT, a.build, "bench", "decode"), d, "--threads", str(t),
                            "--prompt", str(a.prompt_8b), "--new", str(a.new_8b), "--kv-cache", a.kv_cache,
                            "--weights", a.weights, "--kernels", kernels, "--paired", "256"], thread_env(t))
            # best of a.reps_8b rounds, each running every figure once: the
            # round right after read_through often streams far slower than the
            # next (bf16 at one thread 57% of the roofline, its fastest step
            # 154 ms against a median of 196; the read-only run that followed
            # 80%): the memory the page cache just gave up goes back to the
            # host (this VM's free page reporting), and a fresh copy into it
            # is backed anew; the best round is the one that measured the code
            r = {"read": {}}
            for _ in range(a.reps_8b):
                for t in a.thread_list:
                    # the same steps with products that only read their bytes:
                    # the ceiling of this access pattern (and of the step's
                    # threading) on this machine, beside the roofline's plain read
                    for kernels, into in (("auto", r), ("read", r["read"])):
                        keep_best(into, t, decode(t, kernels))
            rows.append((name, r))
        except subprocess.CalledProcessError as e:
            print(f"{name}: {' '.join(e.cmd[:2])} failed (exit {e.returncode}); skipping it", file=sys.stderr)
            failed += 1
    if not rows:
        return failed
    t1, tn = a.thread_list[0], a.thread_list[-1]
    first = rows[0][1][t1]
    print(f"JetMoE-8B layout (random weights, {a.synthetic}): prompt {a.prompt_8b}, {a.new_8b} new, "
          f"{a.kv_cache} KV cache, weights {'copied into RAM' if a.weights == 'ram' else 'mapped'}, "
          f"best of {a.reps_8b} run{'s' if a.reps_8b > 1 else ''}; {first['cpu']}")
    print(f"  {'weights':8} {'kernels':15} {'MB/token':>8}" + "".join(
        f" {f'{t} thr tok/s':>12} {'GB/s':>5} {'of roof':>7} {'paired':>6} {'+KV':>9}" for t in a.thread_list)
        + f" {f'{tn}/{t1}':>6}"
        + "".join(f" {f'read-only {t} thr':>18} {'kernels/it':>10}" for t in a.thread_list))
    for name, r in rows:
        print(f"  {r[t1]['weight_type']:8} {r[t1]['kernels']:15} {r[t1]['active_weight_bytes'] / 1e6:8.0f}" + "".join(
            f" {r[t]['decode_tok_s']:12.3f} {r[t]['bandwidth_gbs']:5.1f} {r[t]['ratio']:7.0%} {r[t]['paired_ratio']:6.0%}"
            f" {r[t]['kv_ratio']:4.0%}/{r[t]['paired_kv_ratio']:4.0%}" for t in a.thread_list)
            + f" {r[tn]['decode_tok_s'] / r[t1]['decode_tok_s']:5.2f}x"
            + "".join(f" {r['read'][t]['decode_tok_s']:10.3f} ({r['read'][t]['ratio']:4.0%})"
                      f" {r[t]['decode_tok_s'] / r['read'][t]['decode_tok_s']:10.0%}" for t in a.thread_list)
            + flag(r[t1]["decode_tok_s"], r[tn]["decode_tok_s"]))
    print(f"  (+KV: of roof / paired counting the KV cache a step reads too, {first['kv_bytes'] / 1e6:.0f} MB "
          f"a step on average)")
    print(f"  (read-only: the same steps with products that only read their bytes (bench/decode --kernels read), "
          f"of roof in brackets; kernels/it: the decode at that thread count over it)")
    print("  (paired: the median step's bytes/s over a 256 MB read right after it, bench/decode --paired: "
          "the machine as it was at that step, where the roofline is its best of 20 reads)")
    print("  (of roof: decode tok/s over read bandwidth / active weight bytes, measured in the same run; "
          "prefill tok/s " + ", ".join(f"{name} {r[tn]['prefill_tok_s']:.1f}" for name, r in rows) + f" at {tn} threads)")
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="thread counts, side by side (default 1,2)")
    ap.add_argument("--build", default="build")
    ap.add_argument("--synthetic", default=os.path.join(ROOT, "build", "synthetic-8b"),
                    help="where the 8B-layout checkpoints live (bf16/, q8/, q4/)")
    ap.add_argument("--skip-8b", action="store_true", help="only the small config against PyTorch")
    ap.add_argument("--skip-small", action="store_true", help="only the 8B layout")
    ap.add_argument("--prompt-8b", type=int, default=512)
    ap.add_argument("--new-8b", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="runs per small-config figure; the best is shown")
    ap.add_argument("--reps-8b", type=int, default=2, help="runs per 8B-layout figure; the best is shown")
    ap.add_argument("--kv-cache", default="bf16", choices=("f32", "bf16"), help="the 8B runs' KV cache")
    ap.add_argument("--weights", default="ram", choices=("map", "ram"),
                    help="the 8B runs' weights: copied into 2 MB-page memory as the roofline's buffer is (the "
                         "default; jetmoe's --weights ram, Q8/Q4 rows interleaved), or read in place from the "
                         "mapped checkpoint")
    a = ap.parse_args()
    a.thread_list = sorted({int(t) for t in a.threads.split(",")})
    if a.reps < 1 or a.reps_8b < 1:
        ap.error("--reps and --reps-8b must be at least 1")
    load_note()
    if not a.skip_small:
        small(a)
    return 1 if not a.skip_8b and big(a) else 0


if __name__ == "__main__":
    sys.exit(main())
