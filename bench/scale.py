#!/usr/bin/python3
"""Scale-out on this machine: `jetmoe pretrain` on the bench config (bench/common.h: vocab 32000,
hidden 256, 4 layers, 8 experts top-2) on 1 rank and on 2 ranks as data parallel (DP=2) and as a
pipeline (PP=2), with the same global batch; tokens/s, bytes communicated per step, the time ranks
wait for each other (for PP: the pipeline bubble), and from those measured volumes an estimate of
JetMoE-8B's step time on 8 and 64 hosts at a stated network bandwidth. Prints figures; never passes
or fails. Every rank gets 1 thread (2 ranks on 2 cores); the 1-rank run is shown with 1 and 2 threads.

Usage: bench/scale.py [--steps 16] [--seq 256] [--batch 2] [--accum 8] [--gbps 100]
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from run_bench import cpu_model, load_note  # noqa: E402

BENCH = dict(vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_key_value_heads=4, kv_channels=64,
             intermediate_size=704, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)
J8B = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_key_value_heads=16, kv_channels=128,
           intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2)


def params(c, active):
    """Parameter count (total, or active per token: top-k of the experts), tied embeddings."""
    H, V, L, E = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["num_local_experts"]
    A, F = c["num_key_value_heads"] * c["kv_channels"], c["intermediate_size"]
    e = c["num_experts_per_tok"] if active else E
    layer = 2 * H + 2 * A * H + 2 * E * H + e * 2 * A * H + H + e * 3 * F * H + H
    return V * H + L * layer + H


def write_shard(path, n, vocab, seed):
    rng = np.random.default_rng(seed)
    tok = rng.integers(3, vocab, n, dtype=np.uint16)
    tok[rng.integers(0, n, n // 300)] = 2  # documents end with EOS
    with open(path, "wb") as f:
        f.write(b"JMTOKENS" + struct.pack("<IIQII", 1, 2, n, vocab, 2) + b"\0" * 32)
        f.write(tok.tobytes())


def mpi_env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none")
    return env


def run(jetmoe, recipe, out, ranks, pp, threads):
    cmd = [jetmoe, "pretrain", "--recipe", recipe, "--out", out, "--quiet", "--threads", str(threads)]
    if ranks > 1:
        cmd = ["mpirun", "-np", str(ranks), "--bind-to", "none"] + cmd + ["--pp", str(pp)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(threads))
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {p.stderr[-600:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(l) for l in f if '"loss"' in l]
    return recs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--gbps", type=float, default=100.0, help="network bandwidth per host for the 8B estimate")
    args = ap.parse_args()
    jetmoe = os.path.join(ROOT, "build", "jetmoe")
    if not shutil.which("mpirun"):
        sys.exit("mpirun is missing: make setup")
    print(f"# bench/scale: {cpu_model()}", flush=True)
    load_note()
    tmp = tempfile.mkdtemp(prefix="jetmoe-scale-")
    try:
        os.makedirs(os.path.join(tmp, "shards"))
        write_shard(os.path.join(tmp, "shards", "data.bin"), 4_000_000, BENCH["vocab_size"], 1)
        recipe = {"model": BENCH, "sources": {"web": os.path.join(tmp, "shards")},
                  "phases": [{"name": "p", "steps": args.steps, "mixture": {"web": 1.0}}],
                  "seq_len": args.seq, "batch_size": args.batch, "grad_accum": args.accum,
                  "optimizer": {"lr": 3e-4}, "schedule": {"type": "wsd", "warmup_steps": 2}, "seed": 1,
                  "checkpoint_every": 100000, "log_every": 1}
        rpath = os.path.join(tmp, "recipe.json")
        with open(rpath, "w") as f:
            json.dump(recipe, f)
        tokens_step = args.seq * args.batch * args.accum
        rows = []
        for name, ranks, pp, threads in (("1 rank, 1 thread", 1, 1, 1), ("1 rank, 2 threads", 1, 1, 2),
                                         ("DP=2 (1 thread each)", 2, 1, 1), ("PP=2 (1 thread each)", 2, 2, 1)):
            recs = run(jetmoe, rpath, os.path.join(tmp, name.split()[0] + str(threads)), ranks, pp, threads)
            # the session's rate over its steps after the first two (start-up, first touch of memory)
            rate = recs[-1]["tokens_per_s"]
            step_s = tokens_step / rate
            mb = np.median([r.get("comm_mb", 0.0) for r in recs[2:]])
            wait = np.median([r.get("comm_wait", 0.0) for r in recs[2:]])
            rows.append((name, rate, mb, wait, step_s, recs[-1]["loss"]))
            print(f"{name:24s} {rate:9.0f} tok/s  step {step_s * 1e3:7.1f} ms  {mb:8.2f} MB sent/step  "
                  f"waiting {wait * 1e3:6.1f} ms/step ({100 * wait / step_s:4.1f}%)  loss {recs[-1]['loss']:.4f}",
                  flush=True)
        base1, base2 = rows[0][1], rows[1][1]
        print(f"\nspeed-up over 1 rank x 1 thread: DP=2 {rows[2][1] / base1:.2f}x, PP=2 {rows[3][1] / base1:.2f}x; "
              f"over 1 rank x 2 threads: DP=2 {rows[2][1] / base2:.2f}x, PP=2 {rows[3][1] / base2:.2f}x")
        P, M = 2, args.accum
        print(f"pipeline: {M} micro-batches per replica, 1F1B's bubble (P-1)/(M+P-1) = {(P - 1) / (M + P - 1):.1%}; "
              f"measured waiting {rows[3][3] / rows[3][4]:.1%} of a step (the bubble plus imbalance)")
        pb = params(BENCH, False)
        print(f"DP=2 sends {rows[2][2]:.2f} MB per step = {rows[2][2] * 1e6 / (4 * pb):.2f} x the fp32 parameters "
              f"({pb / 1e6:.2f}M): ZeRO-1's reduce-scatter + all-gather move 2 (N-1)/N x 4 bytes per parameter "
              "per rank")

        # JetMoE-8B estimate from the measured volumes and this machine's measured compute rate
        flops_tok_bench = 6 * params(BENCH, True)
        achieved = base2 * flops_tok_bench  # training FLOP/s of 2 cores, measured above
        p8, a8 = params(J8B, False), params(J8B, True)
        gbs = args.gbps / 8 * 1e9
        tokens_8b = 4 * 2 ** 20  # the report's batch: 4M tokens per step
        host_flops = achieved / 2 * 64  # a 64-core host at this machine's per-core rate
        print(f"\nJetMoE-8B estimate: {p8 / 1e9:.2f}B parameters, {a8 / 1e9:.2f}B active; 6 x active FLOPs per token; "
              f"a step of {tokens_8b / 2 ** 20:.0f}M tokens (the report's batch); compute at this machine's measured "
              f"{achieved / 2 / 1e9:.1f} GFLOP/s per core ({flops_tok_bench / 1e6:.1f} MFLOP/token on the bench config), "
              f"64 cores per host; network {args.gbps:.0f} Gb/s per host; communication not overlapped (upper bound)")
        print(f"{'hosts':>5s} {'layout':>16s} {'compute s':>10s} {'comm s':>8s} {'bubble':>7s} {'step s':>8s}")
        for hosts in (8, 64):
            for pp in (1, 4):
                dp = hosts // pp
                comp = tokens_8b * 6 * a8 / (host_flops * hosts)
                # ZeRO-1 within each stage: reduce-scatter + all-gather of the stage's share of the parameters
                dp_bytes = 2 * (dp - 1) / dp * 4 * p8 / pp if dp > 1 else 0
                # the pipeline: each micro-batch's activations forward and their gradient back, per boundary
                micro = tokens_8b // dp // 4096  # sequences of 4096 per replica, one per micro-batch
                pp_bytes = 2 * micro * 4096 * J8B["hidden_size"] * 4 if pp > 1 else 0
                comm = (dp_bytes + pp_bytes) / gbs
                bubble = (pp - 1) / (micro + pp - 1) if pp > 1 else 0
                step = comp / (1 - bubble) + comm
                print(f"{hosts:5d} {f'DP={dp} x PP={pp}':>16s} {comp:10.1f} {comm:8.1f} {bubble:7.1%} {step:8.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
