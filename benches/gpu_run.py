#!/usr/bin/env python3
"""The runs a lent GPU gets: each one command that fits the GPU machine's limits (a few minutes of
device time, at most 8 files back), its phases ordered by what they teach, each under its own time
cap so that a hang or a crash in one loses nothing of the others, results written as they come.

    python3 benches/gpu_run.py first OUT     # at most 7 minutes
    python3 benches/gpu_run.py second OUT    # at most 5 minutes: what the first could not reach
    python3 benches/gpu_run.py first OUT --dry       # the same on the emulated device at toy sizes
    python3 benches/gpu_run.py fallbacks LOG # what a parity log's failures leave (see below)
    python3 benches/gpu_run.py trim .gpu     # in a packed copy (.gpu/): keep only the test
                                             # executables the runs use (TEST_EXES), so that
                                             # what travels stays within 64 MiB

first:  info (driver, GPU, every kernel compiled to a cubin for the GPU and loaded by the driver, with
        the driver's register and shared-memory figures); the fragment-layout test on the hardware;
        the parity suite with a GPU required; the largest shapes (one MultiMNIST step at batch 4096,
        default and routing v2, launches synchronous); training steps at batch 128 and 50 in bf16,
        tf32 and fp32, replayed and eager; every kernel version timed (`bench --ops`) beside the
        napkin's prediction; the PyTorch peer on the same GPU; the notebook's 10 epochs and their test
        accuracy, then the paper preset for the time left; compute-sanitizer memcheck and racecheck.
second: the paper preset and MultiMNIST trained longer, with their test accuracy; an ncu profile of
        the three kernels that take the most time in a training step.

A version that fails the parity suite is named in the summary, and the later phases go on without
it: a failing tf32 or bf16 version drops that precision, a failing fp32 version is replaced by
another fp32 version of its op that passed (through CAPSNET_KERNELS).

OUT gets at most four files: summary.txt (rewritten after every phase), results.jsonl (one JSON
object per figure, appended as it comes), logs.tar.gz (every command's log, repacked after every
phase) and, while a phase runs, live.log (its log so far). Checkpoints stay in a temporary directory.

Binaries: CAPSNET_BIN_DIR (a directory holding capsnet), else .gpu/bin (a packed copy: bin/, tests/, data/mnist),
else target/release; test executables: CAPSNET_TESTS_DIR, else .gpu/tests, else target/release/deps;
MNIST: CAPSNET_DATA, else .gpu/data/mnist, else data/mnist. --dry runs on the emulated device at toy
sizes with the caps of the dry plan; CI runs it (tests/gpu_run.rs).
"""
import datetime
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (phase, cap in seconds on the GPU, cap in the dry run); each plan's caps add up to its limit. The dry
# caps are ceilings with room for a slow, shared 2-core machine (a phase ends when its work does); only
# the training phases fill theirs, by design.
PLANS = {
    "first": (420, [("info", 30, 60), ("fragments", 15, 30), ("parity", 70, 60), ("largest", 25, 60),
                    ("steps", 45, 90), ("ops", 35, 90), ("peer", 45, 60), ("train", 125, 60),
                    ("sanitize", 30, 10)]),
    "second": (300, [("info", 20, 60), ("paper", 165, 30), ("multimnist", 80, 90), ("profile", 35, 10)]),
}
# a tiny model for the dry run, the emulated device running every kernel on the CPU; its training runs
# see a few images in fp32 (the tensor-core versions are emulated lane by lane, slowly)
TOY = ["--conv1-channels", "4", "--primary-maps", "2"]
TOY_TRAIN = ["--limit", "40", "--val-limit", "20", "--batch-size", "20"]


# The test executables the runs use; `trim` removes every other one from a packed copy.
TEST_EXES = ("fragments", "cuda")


def trim(pack):
    """Removes from PACK/tests every file that is not a test executable of TEST_EXES (the newest of
    each); returns (kept, removed) file names."""
    tests = os.path.join(pack, "tests")
    if not os.path.isdir(tests):
        raise SystemExit(f"{tests}: no such directory (pack the binaries and test executables there first)")
    keep = {os.path.basename(e) for e in (newest(tests, stem) for stem in TEST_EXES) if e}
    kept, removed = [], []
    for f in sorted(os.listdir(tests)):
        if f in keep:
            kept.append(f)
        else:
            os.remove(os.path.join(tests, f))
            removed.append(f)
    return kept, removed


def newest(directory, stem):
    """The newest executable `stem-<hash>` in `directory` (cargo's test executables), or None."""
    if not directory or not os.path.isdir(directory):
        return None
    found = [os.path.join(directory, f) for f in os.listdir(directory)
             if re.fullmatch(re.escape(stem) + r"-[0-9a-f]{16}", f)]
    found = [f for f in found if os.access(f, os.X_OK)]
    return max(found, key=os.path.getmtime) if found else None


def first_dir(*candidates):
    for c in candidates:
        if c and os.path.isdir(c):
            return c
    return candidates[-1]


def fallbacks(log_text):
    """From a parity log's `version-check: OP VERSION PRECISION default|- ok|FAIL` lines: the failed
    versions, the precisions to leave out (a tensor-core version failed), and the CAPSNET_KERNELS
    spec that replaces a failed fp32 version by another fp32 version of its op that passed."""
    rows = re.findall(r"^version-check: (\S+) (\S+) (\S+) (\S+) (ok|FAIL)", log_text, re.M)
    failed = [(op, v, p) for op, v, p, _, r in rows if r == "FAIL"]
    skip = sorted({p for _, _, p in failed if p != "fp32"})
    kernels, stuck = [], []
    for op, v, p in failed:
        if p != "fp32":
            continue
        passed = [pv for pop, pv, pp, _, r in rows if pop == op and pp == "fp32" and r == "ok"]
        if passed:
            kernels.append(f"{op}={passed[0]}")
        else:
            stuck.append(op)
    return {"checked": len(rows), "failed": [f"{op} {v}" for op, v, _ in failed], "skip_precisions": skip,
            "kernels": ",".join(kernels), "no_fp32_version_left": stuck}


class Run:
    def __init__(self, plan, out, dry, kernels=None, precision=None):
        self.plan, self.out, self.dry = plan, out, dry
        self.limit, self.phases = PLANS[plan]
        if dry:
            self.limit = sum(p[2] for p in self.phases)
        self.start = time.monotonic()
        self.work = tempfile.mkdtemp(prefix=f"capsnet-gpu-{plan}-")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        os.makedirs(out, exist_ok=True)
        for f in ("summary.txt", "results.jsonl", "logs.tar.gz", "live.log"):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        self.bin = first_dir(os.environ.get("CAPSNET_BIN_DIR"), os.path.join(ROOT, ".gpu/bin"),
                             os.path.join(ROOT, "target/release"))
        self.tests = first_dir(os.environ.get("CAPSNET_TESTS_DIR"), os.path.join(ROOT, ".gpu/tests"),
                               os.path.join(ROOT, "target/release/deps"))
        self.data = first_dir(os.environ.get("CAPSNET_DATA"), os.path.join(ROOT, ".gpu/data/mnist"),
                              os.path.join(ROOT, "data/mnist"))
        self.env = dict(os.environ, CAPSNET_DATA=self.data, PYTHONUNBUFFERED="1")
        for d in ("/usr/local/cuda/bin", "/usr/local/cuda-13.0/bin"):
            if os.path.isdir(d):
                self.env["PATH"] = self.env.get("PATH", "") + ":" + d
        libs = [d for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib") if os.path.isdir(d)]
        if libs:
            self.env["LD_LIBRARY_PATH"] = ":".join(filter(None, [self.env.get("LD_LIBRARY_PATH")] + libs))
        if dry:
            self.env["CAPSNET_EMULATOR"] = "plain"
            self.env.pop("CAPSNET_REQUIRE_GPU", None)
        else:
            self.env["CAPSNET_REQUIRE_GPU"] = "1"
        self.device = ["--device", "emulated" if dry else "cuda"]
        self.model = TOY if dry else []
        self.fallback = {"failed": [], "skip_precisions": [], "kernels": kernels or "", "no_fp32_version_left": []}
        if kernels:
            self.env["CAPSNET_KERNELS"] = kernels
        self.train_precision = precision
        self.rows = []       # (phase, result, seconds, cap)
        self.notes = {}      # phase -> lines for the summary
        self.header = []

    # ---- output --------------------------------------------------------------------------------------
    def elapsed(self):
        return time.monotonic() - self.start

    def note(self, phase, line):
        """A line for the phase's part of the summary (and its log)."""
        self.notes.setdefault(phase, []).append(line)
        if getattr(self, "live", None) and os.path.exists(self.live):
            with open(self.live, "a") as log:
                log.write(f"[summary] {line}\n")

    def result(self, record):
        record = dict(record, plan=self.plan, dry=self.dry)
        with open(os.path.join(self.out, "results.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self):
        done = len(self.rows) == len(self.phases)
        lines = [f"capsnet GPU run '{self.plan}'{' (DRY RUN: emulated device, toy sizes)' if self.dry else ''}, "
                 f"started {self.started}, {'ended after' if done else 'running for'} {self.elapsed():.0f} s "
                 f"of its {self.limit} s"]
        lines += self.header
        lines.append("")
        lines.append(f"{'phase':<12} {'result':<28} {'seconds':>7} {'cap':>5}")
        for phase, result, secs, cap in self.rows:
            lines.append(f"{phase:<12} {result:<28} {secs:>7.1f} {cap:>5.0f}")
        if self.plan == "first":
            extra = "".join(f" --{k} {v}" for k, v in [("kernels", self.fallback["kernels"]),
                                                      ("precision", self.train_precision or (
                                                          self.training_precision() if self.fallback["skip_precisions"]
                                                          else None))] if v)
            lines.append("")
            lines.append(f"the second run, with what passed: python3 benches/gpu_run.py second OUT{extra}")
        for phase, _, _, _ in self.rows:
            if self.notes.get(phase):
                lines.append("")
                lines.append(f"== {phase}")
                lines += ["  " + n for n in self.notes[phase]]
        tmp = os.path.join(self.out, ".summary.txt.tmp")
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, os.path.join(self.out, "summary.txt"))

    def pack_logs(self):
        tmp = os.path.join(self.out, ".logs.tar.gz.tmp")
        with tarfile.open(tmp, "w:gz") as t:
            t.add(self.logs, arcname="logs")
        os.replace(tmp, os.path.join(self.out, "logs.tar.gz"))

    # ---- commands ------------------------------------------------------------------------------------
    def cmd(self, argv, timeout, env=None, label=None):
        """Runs argv with its output appended to the phase's live log, stopped (SIGTERM, then SIGKILL
        after 10 s) at `timeout` seconds or at the phase's cap. Returns (status, output, stopped)."""
        timeout = max(1.0, min(timeout, self.phase_deadline - time.monotonic()))
        e = dict(self.env, **(env or {}))
        with open(self.live, "a") as log:
            log.write(f"\n$ {' '.join(argv)}   [cap {timeout:.0f} s]\n")
            log.flush()
            at = log.tell()
            t0 = time.monotonic()
            try:
                p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=e, cwd=ROOT,
                                     start_new_session=True)
            except OSError as err:
                log.write(f"cannot run {argv[0]}: {err}\n")
                return 127, f"cannot run {argv[0]}: {err}", False
            stopped = False
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stopped = True
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    rc = p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    rc = p.wait()
            log.write(f"[exit {rc}{', stopped at its cap' if stopped else ''}, {time.monotonic() - t0:.1f} s]\n")
        with open(self.live, "rb") as f:
            f.seek(at)
            output = f.read().decode(errors="replace")
        return rc, output, stopped

    def capsnet(self, args, timeout, env=None):
        return self.cmd([os.path.join(self.bin, "capsnet")] + args, timeout, env)

    def json_lines(self, output, phase, **extra):
        n = 0
        for line in output.splitlines():
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                self.result(dict(rec, phase=phase, **extra))
                n += 1
        return n

    def remaining(self):
        return self.phase_deadline - time.monotonic()

    # ---- phases --------------------------------------------------------------------------------------
    def run(self):
        self.started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.header.append(f"binaries: {self.bin}; tests: {self.tests}; data: {self.data}")
        if not self.dry:
            smi = shutil.which("nvidia-smi")
            if smi:
                r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                    "--format=csv,noheader"], capture_output=True, text=True)
                self.header.append("nvidia-smi: " + (r.stdout.strip() or r.stderr.strip()))
        self.write_summary()
        for name, cap, dry_cap in self.phases:
            cap = dry_cap if self.dry else cap
            left = self.limit - self.elapsed() - 3
            if left < 5:
                self.rows.append((name, "not run: no time left", 0.0, cap))
                self.write_summary()
                continue
            cap = min(cap, left)
            self.phase_deadline = time.monotonic() + cap
            self.live = os.path.join(self.out, "live.log")
            self.current = name
            with open(self.live, "w") as log:
                log.write(f"== phase {name}, cap {cap:.0f} s, {self.elapsed():.0f} s into the run\n")
            t0 = time.monotonic()
            try:
                result = getattr(self, "phase_" + name)() or "ok"
            except Exception as err:  # a broken phase must not take the others with it
                result = "FAILED (the script: %s)" % err
                with open(self.live, "a") as log:
                    log.write(f"\nthe phase broke: {err!r}\n")
            n = len(self.rows) + 1
            if os.path.exists(self.live):
                os.replace(self.live, os.path.join(self.logs, f"{n:02d}-{name}.log"))
            self.rows.append((name, result, time.monotonic() - t0, cap))
            self.write_summary()
            self.pack_logs()
        self.write_summary()
        shutil.rmtree(self.work, ignore_errors=True)

    @staticmethod
    def verdict(outcomes):
        """One phase's result from its commands' (status, stopped)."""
        if any(stopped for _, stopped in outcomes):
            return "stopped at its cap"
        bad = [rc for rc, _ in outcomes if rc != 0]
        return "ok" if not bad else f"FAILED ({len(bad)} of {len(outcomes)} commands)"

    def phase_info(self):
        rc, out, stopped = self.capsnet(["info"] + (["--emulated"] if self.dry else []), 60)
        for line in out.splitlines():
            if line.startswith(("CUDA driver", "NVRTC", "device", "kernels", "error")):
                self.note("info", line)
        self.result({"kind": "info", "ok": rc == 0, "lines": [l for l in out.splitlines() if l.startswith(("device", "kernels"))]})
        return self.verdict([(rc, stopped)])

    def test_exe(self, stem, args, env=None):
        assert stem in TEST_EXES, f"{stem}: add it to TEST_EXES, or trim leaves it behind"
        exe = newest(self.tests, stem)
        if exe is None:
            self.note(self.current, f"no {stem} test executable in {self.tests}")
            return 2, "", False
        return self.cmd([exe, "--nocapture"] + args, 600, env)

    def phase_fragments(self):
        rc, out, stopped = self.test_exe("fragments", [])
        for line in out.splitlines():
            if line.startswith(("mma ", "test result", "thread '")) or "panicked" in line:
                self.note("fragments", line)
        self.result({"kind": "fragments", "ok": rc == 0, "sums": [l for l in out.splitlines() if l.startswith("mma ")]})
        return self.verdict([(rc, stopped)])

    def phase_parity(self):
        env = {"CAPSNET_PARITY_OPS": "dense_bwd_weight"} if self.dry else {}
        args = ["cuda_every_kernel_version_matches_cpu"] if self.dry else []
        rc, out, stopped = self.test_exe("cuda", args, env)
        fb = fallbacks(out)
        for line in out.splitlines():
            if line.startswith(("test result", "version-check:")) and ("FAIL" in line or line.startswith("test result")):
                self.note("parity", line)
            elif re.match(r"test \S+ \.\.\. FAILED", line):
                self.note("parity", line)
        self.note("parity", f"{fb['checked']} versions checked; failed: {', '.join(fb['failed']) or 'none'}")
        if fb["failed"]:
            kernels = ",".join(filter(None, [self.fallback["kernels"], fb["kernels"]]))
            self.fallback = dict(fb, kernels=kernels)
            if kernels:
                self.env["CAPSNET_KERNELS"] = kernels
            self.note("parity", f"later phases: CAPSNET_KERNELS={kernels or '(unchanged)'}; precisions left out: "
                                f"{', '.join(fb['skip_precisions']) or 'none'}; ops with no fp32 version left: "
                                f"{', '.join(fb['no_fp32_version_left']) or 'none'}")
        self.result({"kind": "parity", "ok": rc == 0, **fb})
        return self.verdict([(rc, stopped)])

    def precisions(self):
        return [p for p in ("bf16", "tf32", "fp32") if p not in self.fallback["skip_precisions"]]

    def training_precision(self):
        return self.train_precision or ("fp32" if self.dry else self.precisions()[0])

    def phase_largest(self):
        outcomes = []
        batch = "8" if self.dry else "4096"
        for label, extra in [("default", []), ("routing v2", ["--kernels", "routing=v2"])]:
            if self.remaining() < 5:
                break
            d = os.path.join(self.work, "largest-" + label.replace(" ", "-"))
            rc, out, stopped = self.capsnet(
                ["train", "--dataset", "multimnist", "--batch-size", batch, "--limit", batch,
                 "--val-limit", "8" if self.dry else "256",
                 "--epochs", "1", "--checkpoint-minutes", "0", "--checkpoint-dir", d,
                 "--precision", self.training_precision()] + self.device + self.model + extra,
                self.remaining(), env={"CUDA_LAUNCH_BLOCKING": "1"})
            errors = [l for l in out.splitlines() if l.startswith("error")]
            self.note("largest", f"MultiMNIST, batch {batch}, {label}: exit {rc}" + (f": {errors[-1]}" if errors else ""))
            self.result({"kind": "largest", "batch": int(batch), "kernels": label, "ok": rc == 0,
                         "error": errors[-1] if errors else None})
            outcomes.append((rc, stopped))
            shutil.rmtree(d, ignore_errors=True)
        return self.verdict(outcomes)

    def phase_steps(self):
        outcomes = []
        batches = ["2"] if self.dry else ["128", "50"]
        steps = ["--steps", "1", "--warmup", "2"] if self.dry else ["--steps", "20", "--warmup", "3"]
        runs = [(b, p, eager) for b in batches for p in self.precisions() for eager in (False, True)]
        if self.dry:  # both ways in fp32, bf16 replayed
            runs = [("2", "fp32", False), ("2", "fp32", True), ("2", "bf16", False)]
        for b, p, eager in runs:
            if self.remaining() < 3:
                break
            rc, out, stopped = self.capsnet(["bench", "--batch-size", b, "--precision", p, "--json"] + steps +
                                            (["--eager"] if eager else []) + self.device + self.model, self.remaining())
            self.json_lines(out, "steps", eager=eager)
            for line in out.splitlines():
                if line.startswith("batch "):
                    self.note("steps", f"{p} {'eager' if eager else 'graph'}: {line}")
                elif line.startswith("error"):
                    self.note("steps", f"{p} batch {b} {'eager' if eager else 'graph'}: {line}")
            outcomes.append((rc, stopped))
        return self.verdict(outcomes)

    def phase_ops(self):
        outcomes = []
        napkin = {}
        if not self.dry:
            rc, out, _ = self.cmd([sys.executable, os.path.join(ROOT, "benches/napkin.py"), "--json", "128", "50"], 20)
            for line in out.splitlines():
                if line.startswith("{"):
                    rec = json.loads(line)
                    napkin[(rec["batch"], rec["op"], rec["layer"], rec["version"])] = rec["napkin_ms"]
        batches = ["2"] if self.dry else ["128", "50"]
        reps = ["--steps", "1"] if self.dry else ["--steps", "10"]
        for b in batches:
            if self.remaining() < 3:
                break
            rc, out, stopped = self.capsnet(["bench", "--ops", "--json", "--batch-size", b] + reps + self.device + self.model,
                                            self.remaining())
            outcomes.append((rc, stopped))
            for line in out.splitlines():
                if not line.startswith("{"):
                    if line.startswith("error") or "MISMATCH" in line:
                        self.note("ops", line)
                    continue
                rec = json.loads(line)
                name, rest = rec["op"].split(" ", 1)
                layer = rest if name == "routing" else rest.split()[0]
                rec["napkin_ms"] = napkin.get((rec["batch"], name, layer, rec["version"]))
                self.result(dict(rec, phase="ops"))
                if rec["ms"] is not None:
                    pred = rec["napkin_ms"]
                    self.note("ops", f"batch {b:>4} {rec['op']:<40} {rec['version']:<5} {rec['ms']:>9.4f} ms"
                                     + (f"  napkin {pred:>8.4f} ms  ({rec['ms'] / pred:.1f}x)" if pred else ""))
        return self.verdict(outcomes)

    def phase_peer(self):
        script = os.path.join(ROOT, "benches/capsnet_torch_bench.py")
        outcomes = []
        runs = [("2", "fp32", [])] if self.dry else [
            ("128", "bf16-autocast", ["--compile"]), ("128", "fp32", []), ("128", "tf32", []),
            ("50", "bf16-autocast", ["--compile"]), ("50", "fp32", [])]
        for b, p, extra in runs:
            if self.remaining() < 5:
                break
            args = [sys.executable, script, "--batch-size", b, "--precision", p] + extra
            args += ["--device", "cpu", "--steps", "1", "--warmup", "1"] if self.dry else ["--device", "cuda", "--steps", "30", "--warmup", "10"]
            rc, out, stopped = self.cmd(args, self.remaining())
            got = self.json_lines(out, "peer", precision=p, compile=bool(extra), batch=int(b))
            last = [l for l in out.splitlines() if l.strip() and not l.startswith(("$ ", "[exit"))][-1:] or [""]
            self.note("peer", f"PyTorch {p}{' + compile' if extra else ''}, batch {b}: "
                              + (last[0][:200] if got or rc else "no report"))
            outcomes.append((rc, stopped))
        return self.verdict(outcomes)

    def train_and_eval(self, phase, name, args, share, eval_args=()):
        """Trains into a directory of its own for `share` of the time left (keeping time for the
        evaluation), then evaluates its best checkpoint on the test set."""
        d = os.path.join(self.work, name)
        budget = self.remaining() * share - (25 if not self.dry else 12)
        rc, out, stopped = self.capsnet(["train", "--checkpoint-dir", d, "--checkpoint-minutes", "1"] + args
                                        + self.device + self.model, max(budget, 5))
        epochs = [l for l in out.splitlines() if re.match(r"epoch \d+: train loss", l)]
        metrics = os.path.join(d, "metrics.jsonl")
        if os.path.exists(metrics):
            shutil.copy(metrics, os.path.join(self.logs, f"{phase}-{name}-metrics.jsonl"))
        best = os.path.join(d, "best.safetensors")
        record = {"kind": "training", "run": name, "args": args, "stopped_at_cap": stopped,
                  "epochs_done": sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0}
        outcomes = [(rc if rc != 130 else 0, False)]  # 130: stopped by the cap, its state saved
        if os.path.exists(best):
            erc, eout, estopped = self.capsnet(["eval", "--checkpoint", best, "--precision", self.training_precision()]
                                               + list(eval_args) + self.device, max(self.remaining(), 5))
            acc = re.findall(r"test accuracy: ([0-9.]+)%", eout)
            record["test_accuracy"] = float(acc[-1]) if acc else None
            outcomes.append((erc, estopped))
        self.result(record)
        self.note(phase, f"{name}: {record['epochs_done']} epochs{' (stopped at its cap)' if stopped else ''}, "
                         f"test accuracy {record.get('test_accuracy')}% " + (epochs[-1] if epochs else ""))
        shutil.rmtree(d, ignore_errors=True)
        return outcomes

    def phase_train(self):
        p = ["--precision", self.training_precision()]
        small = TOY_TRAIN if self.dry else []
        ev = ["--limit", "20"] if self.dry else []
        outcomes = self.train_and_eval("train", "notebook", ["--epochs", "2" if self.dry else "10"] + small + p, 0.7, ev)
        # the paper preset for the time left (the dry run asks for more epochs than fit: its cap stops it)
        outcomes += self.train_and_eval("train", "paper", ["--preset", "paper", "--epochs", "1000" if self.dry else "30"]
                                        + small + p, 1.0, ev)
        return self.verdict(outcomes)

    def sanitizer(self):
        tool = shutil.which("compute-sanitizer", path=self.env.get("PATH"))
        if tool is None:
            self.note(self.current, "compute-sanitizer: not installed here; nothing checked")
        return tool

    def phase_sanitize(self):
        tool = self.sanitizer()
        if tool is None:
            return "not available"
        outcomes = []
        for check in ("memcheck", "racecheck"):
            if self.remaining() < 5:
                break
            rc, out, stopped = self.cmd([tool, "--tool", check, "--error-exitcode", "99",
                                         os.path.join(self.bin, "capsnet"), "bench", "--batch-size", "4", "--steps", "1",
                                         "--warmup", "0", "--eager", "--precision", self.training_precision()]
                                        + self.device + self.model, self.remaining() / 2 + 1)
            unsupported = re.search(r"not supported|Device not supported|error 999", out)
            summary = [l for l in out.splitlines() if "ERROR SUMMARY" in l or "RACECHECK SUMMARY" in l]
            self.note("sanitize", f"{check}: " + ("the runtime does not support it" if unsupported else
                                                 (summary[-1] if summary else f"exit {rc}")))
            self.result({"kind": "sanitizer", "tool": check, "exit": rc, "supported": not unsupported,
                         "summary": summary[-1] if summary else None})
            outcomes.append((rc, stopped))
        return self.verdict(outcomes)

    # ---- the second run --------------------------------------------------------------------------------
    def phase_paper(self):
        p = ["--precision", self.training_precision()]
        small = TOY_TRAIN + ["--epochs", "1000"] if self.dry else ["--epochs", "60"]
        ev = ["--limit", "20"] if self.dry else []
        return self.verdict(self.train_and_eval("paper", "paper", ["--preset", "paper"] + small + p, 1.0, ev))

    def phase_multimnist(self):
        p = ["--precision", self.training_precision()]
        small = ["--limit", "20", "--val-limit", "10", "--batch-size", "10", "--epochs", "1"] if self.dry else ["--epochs", "20"]
        ev = ["--limit", "20"] if self.dry else []
        return self.verdict(self.train_and_eval("multimnist", "multimnist",
                                                ["--dataset", "multimnist", "--preset", "paper"] + small + p, 1.0, ev))

    def phase_profile(self):
        ncu = shutil.which("ncu", path=self.env.get("PATH"))
        if ncu is None:
            self.note("profile", "ncu: not installed here; nothing profiled")
            return "not available"
        step = [os.path.join(self.bin, "capsnet"), "bench", "--batch-size", "128", "--steps", "2", "--warmup", "0",
                "--eager", "--precision", self.training_precision()] + self.device + self.model
        rc, out, stopped = self.cmd([ncu, "--clock-control", "none", "--metrics", "gpu__time_duration.sum", "--csv"] + step,
                                    self.remaining() / 2)
        times = {}
        scale = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9}
        # ncu --csv rows: "ID","Process ID","Process Name","Host Name","Kernel Name",...,"Metric Unit","Metric Value"
        for row in re.findall(r'^"\d+",.*$', out, re.M):
            cols = [c.strip('"') for c in row.split('","')]
            try:
                name, ns = cols[4].split("(")[0], float(cols[-1].replace(",", "")) * scale[cols[-2]]
            except (IndexError, ValueError, KeyError):
                continue
            times[name] = times.get(name, 0.0) + ns
        top = sorted(times, key=times.get, reverse=True)[:3]
        self.note("profile", "kernel time in a step (ns, summed): " + ", ".join(f"{k} {times[k]:.0f}" for k in top))
        self.result({"kind": "profile", "kernel_ns": times})
        outcomes = [(rc, stopped)]
        if top and self.remaining() > 5:
            rc, out, stopped = self.cmd([ncu, "--clock-control", "none", "--set", "full", "--launch-count", "3",
                                         "-k", "regex:^(" + "|".join(top) + ")$"] + step, self.remaining())
            outcomes.append((rc, stopped))
        return self.verdict(outcomes)


def main(argv):
    if argv[:1] == ["test-exes"]:
        print(json.dumps(TEST_EXES))
        return 0
    if len(argv) == 2 and argv[0] == "trim":
        kept, removed = trim(argv[1])
        missing = [s for s in TEST_EXES if not any(re.fullmatch(re.escape(s) + r"-[0-9a-f]{16}", k) for k in kept)]
        print(f"kept {', '.join(kept) or 'nothing'}; removed {len(removed)} other file(s)")
        if missing:
            print(f"missing test executables: {', '.join(missing)}", file=sys.stderr)
            return 1
        return 0
    if len(argv) >= 2 and argv[0] == "fallbacks":
        with open(argv[1]) as f:
            print(json.dumps(fallbacks(f.read())))
        return 0
    if len(argv) < 2 or argv[0] not in PLANS:
        print(__doc__, file=sys.stderr)
        return 2
    plan, out, rest = argv[0], argv[1], argv[2:]
    kernels = precision = None
    dry = "--dry" in rest
    if "--kernels" in rest:
        kernels = rest[rest.index("--kernels") + 1]
    if "--precision" in rest:
        precision = rest[rest.index("--precision") + 1]
    Run(plan, out, dry, kernels, precision).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
