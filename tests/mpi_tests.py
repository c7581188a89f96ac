"""Scale-out checks (README: Scaling out), run with Open MPI's mpirun on this machine's cores
(--oversubscribe: 4 ranks on 2 cores). run_tests.py calls run().

  mpi_np1_same_as_plain          mpirun -np 1 trains bit for bit what a plain run does
  mpi_dp2 / mpi_pp2 / mpi_dp2_pp2  2, 2 and 4 ranks against one process, 20 steps: every logged loss
                                 within 1e-5 relative, final weights within 1e-5; the layout in
                                 metrics.jsonl's first line and the trainer state
  mpi_resume_2_to_1 / _1_to_2    saved at one layout, resumed at another: final weights as a straight run
  mpi_sigkill_one_rank           SIGKILL to one rank: every rank exits non-zero within the bound, the
                                 latest checkpoint loads, and resuming finishes the run
  mpi_sigusr1_saves_once         SIGUSR1 to mpirun (forwarded to every rank): all stop at one step, one
                                 checkpoint there, exit 130, resumable to the straight run's weights
  mpi_hang_times_out             a rank stopped (SIGSTOP) makes the others give up after --timeout
  mpi_bad_grid                   --pp that does not divide the ranks, or exceeds the layers: clear errors
  mpi_sft_dp2 / mpi_dpo_pp2      SFT on 2 replicas and DPO on 2 stages against 1 rank (the fine-tuning
                                 tasks share the grid)

Root: Open MPI refuses to run as root unless told; CI runs as root, so the runner says so in the
environment it gives mpirun (OMPI_ALLOW_RUN_AS_ROOT*), never the user's.
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import time

import numpy as np

import run_tests  # its fixtures, used at call time (run_tests imports this module too)


def run_cmd(cmd):
    """One process with the ranks' environment: 1 thread each, so that a run on N ranks differs from
    one process only in how the ranks' sums are ordered (not in BLAS's per-thread blocking)."""
    return run_tests.run(cmd, env=mpi_env())


def pretrain_fixture(*a):
    return run_tests.pretrain_fixture(*a)

CHECKS = ("mpi_np1_same_as_plain", "mpi_dp2", "mpi_pp2", "mpi_dp2_pp2", "mpi_resume_2_to_1", "mpi_resume_1_to_2",
          "mpi_sigkill_one_rank", "mpi_sigusr1_saves_once", "mpi_hang_times_out", "mpi_bad_grid", "mpi_sft_dp2", "mpi_dpo_pp2")
KILL_BOUND = 30.0  # seconds from SIGKILL of one rank until every rank has exited (README: Scaling out)


def check(suite, name, ok, msg):
    """msg says what passed, or why not."""
    suite.check(name, ok, msg, msg)


def mpi_env():
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               OMPI_MCA_rmaps_base_oversubscribe="1",
               # containers often forbid the cross-memory attach vader uses for large messages
               OMPI_MCA_btl_vader_single_copy_mechanism="none")
    if "ASAN_OPTIONS" in env:  # the ASan build: what Open MPI keeps for the process's life is not ours
        env["ASAN_OPTIONS"] += ":fast_unwind_on_malloc=0"  # whole stacks through Open MPI's libraries
        # LSan's exit scan read a dynamic TLS block of Open MPI's with a bogus range ("DTLS 11 at
        # 0x3be6-0x400004ce8") and crashed its tracer ("Tracer caught signal 11") on every -np 1 run:
        # gcc 12's runtime tracking glibc's dynamic TLS; without it LSan still scans static TLS
        env["ASAN_OPTIONS"] += ":intercept_tls_get_addr=0"
        env["LSAN_OPTIONS"] = "suppressions=" + os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "lsan_mpi.supp") + ":print_suppressions=0"
        env["OMPI_MCA_mca_base_component_disable_dlclose"] = "1"  # its components' frames keep their names
    return env


def mpirun(n, args, timeout=600):
    cmd = ["mpirun", "-np", str(n), "--bind-to", "none"] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), timeout=timeout)


def read_safetensors(path):
    with open(path, "rb") as f:
        buf = f.read()
    n = struct.unpack("<Q", buf[:8])[0]
    header = json.loads(buf[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        dt = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "U64": np.uint64}.get(t["dtype"])
        if dt is not None:
            out[name] = np.frombuffer(buf[8 + n + a:8 + n + b], dtype=dt).reshape(t["shape"])
    return out


def latest(out):
    ck = os.path.join(out, "checkpoints")
    return os.path.join(ck, open(os.path.join(ck, "latest")).read().strip())


def step_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f]
    return lines, [r for r in lines if "loss" in r]


def compare_runs(a, b, tol=1e-5):
    """Problems between two runs' logged losses (relative) and final weights (against the tensor's scale)."""
    problems = []
    _, ra = step_records(a)
    _, rb = step_records(b)
    if [r["step"] for r in ra] != [r["step"] for r in rb]:
        return [f"logged steps differ: {[r['step'] for r in ra]} vs {[r['step'] for r in rb]}"]
    worst_loss = 0.0
    for x, y in zip(ra, rb):
        for k in ("loss", "aux_loss", "z_loss"):
            d = abs(x[k] - y[k]) / max(abs(x[k]), 1e-12)
            worst_loss = max(worst_loss, d)
            if d > tol:
                problems.append(f"step {x['step']} {k}: {x[k]} vs {y[k]} (rel {d:.2e})")
    wa, wb = (read_safetensors(os.path.join(latest(o), "model.safetensors")) for o in (a, b))
    if sorted(wa) != sorted(wb):
        return problems + ["the final checkpoints hold different tensors"]
    worst_w = 0.0
    for name in wa:
        d = float(np.max(np.abs(wa[name] - wb[name]))) / max(1.0, float(np.max(np.abs(wa[name]))))
        worst_w = max(worst_w, d)
        if d > tol:
            problems.append(f"{name}: weights differ by {d:.2e}")
    compare_runs.last = (worst_loss, worst_w)
    return problems[:6]


def run(suite, build, tmp):
    if not any(suite.wanted(n) for n in CHECKS):
        return
    if not shutil.which("mpirun"):
        for n in CHECKS:
            check(suite, n, False, "mpirun is missing (scripts/setup.sh installs openmpi-bin)")
        return
    fixture = pretrain_fixture(suite, build, tmp, "mpi")
    if fixture is None:
        return
    jetmoe, d, recipe = fixture
    # 3 layers (a 2 + 1 pipeline split), 4 micro-batches per step (2 per replica at DP=2: the 1F1B
    # schedule has a steady phase), tied embeddings (the lm_head's gradient crosses stages)
    # lr 1e-3: the fixture's 3e-3 collapses the routers of this tiny model (least-used expert at 0% of its
    # share), where tokens sit on near-ties between experts and one flip from a reordered sum moves a loss
    # by ~1e-5 (README: Scaling out)
    recipe = dict(recipe, grad_accum=4, batch_size=2, checkpoint_every=5, eval_every=10, optimizer={"lr": 1e-3})
    recipe["model"] = dict(recipe["model"], num_hidden_layers=3, tie_word_embeddings=True)
    rpath = os.path.join(d, "recipe.json")
    with open(rpath, "w") as f:
        json.dump(recipe, f)
    total = sum(p["steps"] for p in recipe["phases"])

    def pretrain(out, *extra):
        return [jetmoe, "pretrain", "--recipe", rpath, "--out", os.path.join(d, out), "--quiet"] + list(extra)

    def path(out):
        return os.path.join(d, out)

    one, _ = run_cmd(pretrain("one"))
    if one.returncode != 0:
        for n in CHECKS:
            check(suite, n, False, f"the one-process run failed: {one.stderr.strip()[-300:]}")
        return

    if suite.wanted("mpi_np1_same_as_plain"):
        p = mpirun(1, pretrain("np1"))
        same = p.returncode == 0 and all(
            open(os.path.join(latest(path(o)), "model.safetensors"), "rb").read() ==
            open(os.path.join(latest(path("one")), "model.safetensors"), "rb").read() for o in ("np1",))
        check(suite, "mpi_np1_same_as_plain", same, "final weights bit-identical" if same else
                    f"rc {p.returncode}: {p.stderr.strip()[-300:]}")

    def layout_problems(out, n, dp, pp):
        lines, _ = step_records(path(out))
        first = lines[0] if lines else {}
        want = {"world_size": n, "dp": dp, "pp": pp}
        got = {k: first.get(k) for k in want}
        problems = [] if got == want else [f"metrics.jsonl first line {first}"]
        st = read_safetensors(os.path.join(latest(path(out)), "trainer_state.safetensors"))
        if "layout" not in st or list(st["layout"]) != [n, dp, pp]:
            problems.append(f"trainer state layout {st.get('layout')}")
        return problems

    for name, n, pp in (("mpi_dp2", 2, 1), ("mpi_pp2", 2, 2), ("mpi_dp2_pp2", 4, 2)):
        if not suite.wanted(name):
            continue
        t0 = time.time()
        p = mpirun(n, pretrain(name, "--pp", str(pp)))
        if p.returncode != 0:
            check(suite, name, False, f"rc {p.returncode}: {(p.stderr + p.stdout).strip()[-500:]}")
            continue
        problems = compare_runs(path("one"), path(name)) + layout_problems(name, n, n // pp, pp)
        wl, ww = getattr(compare_runs, "last", (0, 0))
        check(suite, name, not problems, "; ".join(problems) if problems else
                    f"{n} ranks, pp {pp}: {total} steps, losses within {wl:.1e} rel, weights within {ww:.1e} "
                    f"({time.time() - t0:.0f} s)")

    # cross-layout resume: 2 ranks (DP) stop at 10, 1 resumes; 1 stops at 10, 2 ranks (PP) resume
    for name, first_n, first_pp, then_n, then_pp in (("mpi_resume_2_to_1", 2, 1, 1, 1),
                                                     ("mpi_resume_1_to_2", 1, 1, 2, 2)):
        if not suite.wanted(name):
            continue
        out = path(name)

        def leg(n, pp, *extra):
            args = pretrain(name, "--pp", str(pp), *extra)
            return mpirun(n, args) if n > 1 else run_cmd(args)[0]

        a = leg(first_n, first_pp, "--stop-after", "10")
        b = leg(then_n, then_pp, "--resume") if a.returncode == 0 else a
        if a.returncode != 0 or b.returncode != 0:
            check(suite, name, False, f"rc {a.returncode}/{b.returncode}: {(b.stderr + b.stdout).strip()[-400:]}")
            continue
        problems = compare_runs(path("one"), out)
        lines, _ = step_records(out)
        if not any(r.get("resumed") and r.get("world_size") == then_n for r in lines):
            problems.append("no layout line for the resumed session")
        wl, ww = getattr(compare_runs, "last", (0, 0))
        check(suite, name, not problems, "; ".join(problems) if problems else
                    f"{first_n} rank(s) then {then_n}: losses within {wl:.1e}, weights within {ww:.1e}")

    if suite.wanted("mpi_sigkill_one_rank"):
        out = path("killed")
        slow = os.path.join(d, "recipe_long.json")
        long_recipe = dict(recipe, checkpoint_every=2)
        long_recipe["phases"] = [dict(recipe["phases"][0], steps=100), recipe["phases"][1]]
        with open(slow, "w") as f:
            json.dump(long_recipe, f)
        args = [jetmoe, "pretrain", "--recipe", slow, "--out", out, "--quiet", "--timeout", "60"]
        proc = subprocess.Popen(["mpirun", "-np", "2", "--bind-to", "none"] + args, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=mpi_env())
        t_end, ranks = time.time() + 120, []
        while time.time() < t_end and proc.poll() is None:
            if os.path.exists(os.path.join(out, "checkpoints", "latest")) and \
                    open(os.path.join(out, "metrics.jsonl")).read().count("\n") >= 6:
                ranks = [int(x) for x in subprocess.run(["pgrep", "-f", out], capture_output=True,
                                                        text=True).stdout.split() if int(x) != proc.pid]
                ranks = [r for r in ranks if open(f"/proc/{r}/cmdline").read().startswith(jetmoe)]
                if len(ranks) == 2:
                    break
            time.sleep(0.05)
        if len(ranks) != 2:
            proc.kill()
            proc.communicate()
            check(suite, "mpi_sigkill_one_rank", False, f"did not find 2 running ranks (found {ranks})")
        else:
            t0 = time.time()
            os.kill(ranks[1], signal.SIGKILL)
            try:
                _, err = proc.communicate(timeout=KILL_BOUND + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            # mpirun may return while a rank is still on its way out (under ASan, LeakSanitizer's
            # exit scan): every rank must be gone within the bound, counted from the SIGKILL
            def still_alive():
                left = []
                for r in ranks:
                    try:
                        with open(f"/proc/{r}/stat") as f:
                            if f.read().split()[2] != "Z":
                                left.append(r)
                    except OSError:  # gone (or going) between the listing and the read
                        pass
                return left
            alive = still_alive()
            while alive and time.time() - t0 < KILL_BOUND:
                time.sleep(0.05)
                alive = still_alive()
            took = time.time() - t0
            info, _ = run_cmd([jetmoe, "info", os.path.join(out, "checkpoints")])
            resumed, _ = run_cmd([jetmoe, "pretrain", "--recipe", slow, "--out", out, "--quiet", "--resume"])
            lines, recs = step_records(out) if resumed.returncode == 0 else ([], [])
            total_long = sum(p["steps"] for p in long_recipe["phases"])
            ok = (proc.returncode != 0 and took <= KILL_BOUND and not alive and info.returncode == 0 and
                  resumed.returncode == 0 and recs and recs[-1]["step"] == total_long)
            check(suite, "mpi_sigkill_one_rank", ok,
                        f"all exited (mpirun rc {proc.returncode}) {took:.1f} s after the SIGKILL; latest "
                        f"checkpoint loads; resume finished at step {recs[-1]['step'] if recs else '?'}" if ok else
                        f"rc {proc.returncode}, {took:.1f} s, alive {alive}, info rc {info.returncode}, resume rc "
                        f"{resumed.returncode}: {resumed.stderr.strip()[-300:]} / {err.strip()[-300:]}")

    if suite.wanted("mpi_sigusr1_saves_once"):
        # Ctrl-C on mpirun: Open MPI sends SIGTERM to the ranks and SIGKILL one second later
        # (odls_base_sigkill_timeout), too soon to save; SIGUSR1 it forwards to every rank as it is
        out = path("sigusr1")
        proc = subprocess.Popen(["mpirun", "-np", "2", "--bind-to", "none"] + pretrain("sigusr1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env())
        t_end = time.time() + 120
        while time.time() < t_end and proc.poll() is None:
            m = os.path.join(out, "metrics.jsonl")
            if os.path.exists(m) and open(m).read().count("\n") >= 4:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        saved = sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("step_"))
        _, recs = step_records(out)
        at = recs[-1]["step"] if recs else -1
        problems = [] if proc.returncode == 130 else [f"mpirun rc {proc.returncode}"]
        problems += [] if f"step_{at}" in saved else [f"no checkpoint at the stop step {at}: {saved}"]
        resumed = mpirun(2, pretrain("sigusr1", "--resume"))
        problems += [] if resumed.returncode == 0 else [f"resume rc {resumed.returncode}: {resumed.stderr[-300:]}"]
        if not problems:
            problems = compare_runs(path("one"), out)
        check(suite, "mpi_sigusr1_saves_once", not problems, f"stopped at step {at} on both ranks (exit 130), one "
              f"checkpoint there ({saved}), resumed to the straight run's weights" if not problems else
              f"{problems} {err[-300:]}")

    if suite.wanted("mpi_hang_times_out"):
        out = path("hang")
        args = [jetmoe, "pretrain", "--recipe", rpath, "--out", out, "--quiet", "--timeout", "3"]
        proc = subprocess.Popen(["mpirun", "-np", "2", "--bind-to", "none"] + args, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=mpi_env())
        ranks, t_end = [], time.time() + 60
        while time.time() < t_end and proc.poll() is None and len(ranks) != 2:
            if os.path.exists(os.path.join(out, "metrics.jsonl")):
                ranks = [int(x) for x in subprocess.run(["pgrep", "-f", out], capture_output=True,
                                                        text=True).stdout.split() if int(x) != proc.pid]
                ranks = [r for r in ranks if open(f"/proc/{r}/cmdline").read().startswith(jetmoe)]
            time.sleep(0.02)
        if len(ranks) == 2:
            os.kill(ranks[1], signal.SIGSTOP)
            t0 = time.time()
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            took = time.time() - t0
            for r in ranks:
                try:
                    os.kill(r, signal.SIGKILL)
                except OSError:
                    pass
            ok = proc.returncode != 0 and "no answer from the other ranks" in err and took < 30
            check(suite, "mpi_hang_times_out", ok, f"stopped {took:.1f} s after one rank hung (--timeout 3): "
                        f"{[l for l in err.splitlines() if 'no answer' in l][:1]}" if ok else
                        f"rc {proc.returncode}, {took:.1f} s: {err.strip()[-400:]}")
        else:
            proc.kill()
            proc.communicate()
            check(suite, "mpi_hang_times_out", proc.returncode == 0 and False, f"found ranks {ranks}")

    if suite.wanted("mpi_bad_grid"):
        a = mpirun(2, pretrain("bad", "--pp", "3"), timeout=120)
        b = mpirun(2, pretrain("bad2", "--pp", "2", "--overwrite"), timeout=120)
        recipe4 = dict(recipe)
        recipe4["model"] = dict(recipe["model"], num_hidden_layers=1)
        r4 = os.path.join(d, "recipe_1layer.json")
        with open(r4, "w") as f:
            json.dump(recipe4, f)
        c = mpirun(2, [jetmoe, "pretrain", "--recipe", r4, "--out", path("bad3"), "--pp", "2"], timeout=120)
        ok = (a.returncode != 0 and "does not divide" in a.stderr and b.returncode == 0 and
              c.returncode != 0 and "layers" in c.stderr)
        check(suite, "mpi_bad_grid", ok, "--pp 3 on 2 ranks and --pp 2 on a 1-layer model refused with their reasons"
                    if ok else f"{a.returncode} {a.stderr[-200:]} / {b.returncode} / {c.returncode} {c.stderr[-200:]}")

    if suite.wanted("mpi_sft_dp2"):
        sft_problems = sft_check(jetmoe, d, recipe)
        check(suite, "mpi_sft_dp2", not sft_problems, "; ".join(sft_problems) if sft_problems else
                    "SFT on 2 ranks matches one process (losses and weights within 1e-5)")
    if suite.wanted("mpi_dpo_pp2"):
        dpo_problems = dpo_check(jetmoe, d)
        check(suite, "mpi_dpo_pp2", not dpo_problems, "; ".join(dpo_problems) if dpo_problems else
              "DPO on 2 pipeline stages matches one process (losses and weights within 1e-5)")


def sft_check(jetmoe, d, recipe):
    """SFT from the one-process run's checkpoint on pre-tokenized records, 1 rank vs 2."""
    rng = np.random.default_rng(5)
    data = os.path.join(d, "sft.jsonl")
    with open(data, "w") as f:
        for i in range(24):
            n = int(rng.integers(6, 20))
            ids = [int(x) for x in rng.integers(3, 400, n)]
            labels = [-100] * (n // 2) + ids[n // 2:]
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    rec = os.path.join(d, "sft_recipe.json")
    with open(rec, "w") as f:
        json.dump({"max_len": 32, "batch_size": 2, "grad_accum": 2, "epochs": 1, "optimizer": {"lr": 1e-3},
                   "log_every": 1}, f)
    base = latest(os.path.join(d, "one"))
    outs = []
    for n in (1, 2):
        out = os.path.join(d, f"sft{n}")
        args = [jetmoe, "sft", "--model", base, "--data", data, "--recipe", rec, "--out", out, "--quiet"]
        p = mpirun(n, args) if n > 1 else run_cmd(args)[0]
        if p.returncode != 0:
            return [f"sft on {n} rank(s): rc {p.returncode}: {p.stderr.strip()[-300:]}"]
        outs.append(out)
    return compare_runs(*outs)


def dpo_check(jetmoe, d):
    """DPO from the one-process run's checkpoint on pre-tokenized pairs (TRL's names), 1 rank vs 2 stages."""
    rng = np.random.default_rng(7)
    data = os.path.join(d, "pairs.jsonl")
    with open(data, "w") as f:
        for i in range(16):
            prompt = [int(x) for x in rng.integers(3, 400, int(rng.integers(3, 8)))]
            chosen, rejected = ([int(x) for x in rng.integers(3, 400, int(rng.integers(2, 9)))] for _ in range(2))
            f.write(json.dumps({"prompt_input_ids": prompt, "chosen_input_ids": chosen,
                                "rejected_input_ids": rejected}) + "\n")
    rec = os.path.join(d, "dpo_recipe.json")
    with open(rec, "w") as f:
        json.dump({"max_len": 32, "batch_size": 2, "grad_accum": 4, "epochs": 1, "optimizer": {"lr": 1e-4},
                   "log_every": 1, "beta": 0.1}, f)
    base = latest(os.path.join(d, "one"))
    outs = []
    for n in (1, 2):
        out = os.path.join(d, f"dpo{n}")
        args = [jetmoe, "dpo", "--model", base, "--data", data, "--recipe", rec, "--out", out, "--quiet"]
        p = mpirun(n, args + ["--pp", "2"]) if n > 1 else run_cmd(args)[0]
        if p.returncode != 0:
            return [f"dpo on {n} rank(s): rc {p.returncode}: {p.stderr.strip()[-300:]}"]
        outs.append(out)
    return compare_runs(*outs)
