#!/usr/bin/python3
"""Benchmark peer: forward (or training-step) throughput of the PyTorch reference
(tests/ref/jetmoe_ref.py).

  python3 bench/forward_ref.py --threads 2 --batch 8 --seq 256 [--train] [--config JSON]
                               [--iters N] [--warmup N] [--seed S] [--json]

Builds a random model in memory (spec init), runs warmup + timed full forward
passes under torch.no_grad() (logits and the three losses) — or with --train,
full training steps (forward, backward of loss_total, grad-norm clip, AdamW
without decay on 1-D parameters) — and prints one JSON line
{"impl":"pytorch","what":"forward"|"train","tokens_per_s":...,"seconds_per_iter":...,...}.
"""

import argparse
import json
import os
import sys
import time

BENCH_DEFAULT = {"vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 4,
                 "num_key_value_heads": 4, "kv_channels": 64, "intermediate_size": 704,
                 "num_local_experts": 8, "num_experts_per_tok": 2}


def size_thread_pools(threads):
    """Sizes the OpenMP/OpenBLAS pools before torch loads (see main for why)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--config", default="", help="JSON overrides merged into the bench config")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--train", action="store_true", help="time training steps instead of forwards")
    args = ap.parse_args()

    # Debian's torch calls the system BLAS (libblas.so.3 -> OpenBLAS, pthread
    # build here), whose thread pool is sized from the environment when the library
    # is loaded: size it to --threads before importing torch. Busy-waiting OpenBLAS
    # and libgomp workers fight over the cores (every small op then costs ~8 ms on a
    # 2-vCPU VM); passive OpenMP waiting + a short OpenBLAS spin measured ~1.7x
    # faster at 2 threads. Both can be overridden from the environment.
    size_thread_pools(args.threads)
    global torch, ref
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref"))
    import jetmoe_ref as ref

    torch.set_num_threads(args.threads)
    raw = dict(BENCH_DEFAULT)
    if args.config:
        raw.update(json.loads(args.config))
    cfg = ref.normalize_config(raw)
    params = ref.init_params(cfg, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), generator=g)

    if args.train:
        params = {n: p.requires_grad_(True) for n, p in params.items()}
        opt = torch.optim.AdamW([{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}],
                                lr=5e-4, betas=(0.9, 0.95), eps=1e-8)

        def step():
            opt.zero_grad()
            o = ref.forward(cfg, params, tokens)
            o["loss_total"].backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            return o
    else:
        def step():
            with torch.no_grad():
                return ref.forward(cfg, params, tokens)
    for _ in range(max(0, args.warmup)):
        step()
    times = []
    for _ in range(max(1, args.iters)):
        t0 = time.perf_counter()
        out = step()
        float(out["loss_total"])
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]  # median
    res = {"impl": "pytorch", "what": "train" if args.train else "forward", "tokens_per_s": args.batch * args.seq / sec,
           "seconds_per_iter": sec, "threads": args.threads, "batch": args.batch,
           "seq": args.seq, "iters": len(times), "torch": torch.__version__}
    if not args.json:
        print("pytorch reference: %d x %d tokens, %d threads: %.4f s/iter (median of %d), "
              "%.0f tokens/s, loss_total %.4f" % (args.batch, args.seq, args.threads, sec,
                                                   len(times), res["tokens_per_s"],
                                                   float(out["loss_total"])), file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
