"""One-shot check of the GPU side on a machine with one CUDA GPU, on that machine's own Python
(no virtual environment, nothing fetched): `python -m bench.gpu_check --out DIR`, which is
`make gpu-check OUT=DIR`.

Steps, each under its own time cap and each run (and logged) whatever happened to the ones
before it:

1. versions: python, torch, triton, numpy, transformers, nvcc, the git revision, nvidia-smi
   (name, clocks), what torch sees;
2. install: ``pip install --no-index --no-build-isolation --no-deps -e .`` against this Python,
   building the CUDA extension for sm_90a only with every core (build time recorded); when it
   fails the later steps import the package from the source tree (PYTHONPATH), so the Triton
   backend is still tested and timed;
3. tests: ``pytest -m gpu tests/test_gpu.py`` with a junit XML (in parallel workers when
   pytest-xdist is there) and the number of distinct Triton compilations the suite triggered;
   beside it, on the other half of the cores,
4. warm: the benchmark's Triton kernels and compiled FlexAttention graphs are compiled in
   parallel processes into the on-disk caches (the benchmark itself runs its cases one by one);
5. bench: ``python -m bench`` on CUDA over a short bf16 sweep (16k tokens, S in 128..8192,
   D 64 and 128, causal and not), ours against SDPA's backends, FlexAttention and flash-attn
   (reported as missing where it is not installed);
6. summary: a table of the steps, the test counts and the benchmark, printed last.

DIR receives at most ``MAX_FILES`` files: versions.txt, install.log, pytest-gpu.log,
junit-gpu.xml, bench.log, <device>.csv and summary.md. A capped step is first sent SIGINT, on
which pytest and the benchmark write what they have, then killed at its cap.

``--dry`` rehearses the same plumbing on a machine without a GPU: every step is reached and
writes its file; the CUDA build is skipped, the GPU tests all skip, and the benchmark runs its
one small CPU shape (``--quick``) instead of the CUDA sweep. Nothing it prints is a GPU figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The whole run stays inside 7 minutes: the caps of the steps before the benchmark are fixed
# (warm runs beside the tests, inside their cap), the benchmark gets what is left of
# TOTAL_BUDGET_S (at least BENCH_MIN_CAP_S: the caps before it add up to TOTAL_BUDGET_S -
# BENCH_MIN_CAP_S - SUMMARY_RESERVE_S).
TOTAL_BUDGET_S = 415
CAPS_S = {"versions": 15, "install": 120, "tests": 110, "warm": 105}
BENCH_MIN_CAP_S = 165
SUMMARY_RESERVE_S = 5
MAX_FILES = 8
# A capped step gets SIGINT this long before its cap (pytest and bench then write their files).
GRACE_S = 20
GPU_ARCH_LIST = "9.0a"  # the H200 (sm_90): wgmma needs the arch-specific target
BENCH_PROVIDERS = ("symattn-triton", "symattn-triton-sepv", "symattn-cuda", "sdpa-flash", "sdpa-efficient",
                   "sdpa-cudnn", "flex_attention", "flash_attn_func", "flash_attn_qkvpacked")
# What the package's own rows are compared with: the fastest of these in each case.
PEER_PROVIDERS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex_attention", "flash_attn_func",
                  "flash_attn_qkvpacked")
# Our providers whose kernels compile at run time (the CUDA extension is built at install).
WARM_PROVIDERS = ("symattn-triton", "symattn-triton-sepv")
VERSION_PACKAGES = ("torch", "triton", "numpy", "transformers", "pytest", "hypothesis", "pytest-xdist",
                    "flash-attn", "symattn_kernels")


@dataclass
class Step:
    name: str
    status: str  # pass | fail | timeout | skipped | dry
    seconds: float
    cap_s: float
    detail: str = ""


class Capped:
    """A command started now with stdout and stderr appended to log_path. At cap_s - GRACE_S it
    gets SIGINT (pytest and bench then write what they have), at cap_s it and its children are
    killed."""

    def __init__(self, command: list[str], log_path: Path, cap_s: float, env: dict | None = None):
        self.log_path, self.cap_s = log_path, cap_s
        self.log = log_path.open("a")
        self.log.write(f"$ {shlex.join(command)}\n")
        self.log.flush()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=REPO_ROOT, env=env, start_new_session=True)

    def wait(self) -> tuple[int | None, float]:
        """(exit code, or None when the cap ended it; seconds since the start)."""
        grace = min(GRACE_S, 0.2 * self.cap_s)
        try:
            code = self.proc.wait(timeout=max(0.1, self.start + self.cap_s - grace - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            code = None
        seconds = time.monotonic() - self.start
        self.log.write(f"\n[{'timed out' if code is None else f'exit {code}'} after {seconds:.1f} s, "
                       f"cap {self.cap_s:.0f} s]\n")
        self.log.close()
        return code, seconds


def run_capped(command: list[str], log_path: Path, cap_s: float, env: dict | None = None) -> tuple[int | None, float]:
    """Run command under Capped and wait for it."""
    return Capped(command, log_path, cap_s, env).wait()


def _warm_tasks() -> list:
    """(provider, shape) calls that compile what the sweep will: ours once per compiled variant
    (head dim, causal, values; at the shortest length the autotuner compiles every candidate),
    compiled FlexAttention once per shape (it compiles per shape)."""
    from bench.registry import REGISTRY, Shape

    sweep = REGISTRY["shared_attention"].shape_sets["gpu-check"]
    ours = [(provider, Shape(B=1, S=min(s.S for s in sweep), H=shape.H, D=shape.D, causal=shape.causal))
            for provider in WARM_PROVIDERS
            for shape in {(s.H, s.D, s.causal): s for s in sweep}.values()]
    return ours + [("flex_attention", shape) for shape in sweep]


def _warm_one(task) -> str:
    """Run one warm task's forward and forward+backward once, in a worker process."""
    import torch

    from bench.registry import REGISTRY
    from bench.runner import bind_step

    name, shape = task
    op = REGISTRY["shared_attention"]
    provider = next(p for p in op.providers("cuda") if p.name == name)
    if provider.bind is None:
        return f"{name} {shape.label}: not usable: {provider.reason}"
    start = time.monotonic()
    try:
        inputs, grad_out = op.make_inputs(shape, torch.bfloat16, "cuda")
        for mode in ("fwd", "fwdbwd"):
            bind_step(provider, shape, mode, inputs, grad_out)()
        torch.cuda.synchronize()
    except Exception as exc:  # the benchmark reports it again, case by case
        return f"{name} {shape.label}: {type(exc).__name__}: {str(exc)[:200]}"
    return f"{name} {shape.label}: {time.monotonic() - start:.1f} s"


def warm(workers: int) -> None:
    """Compile the benchmark's Triton kernels and FlexAttention graphs in parallel processes, so
    that the benchmark, which runs its cases one by one, finds them in Triton's and Inductor's
    on-disk caches instead of compiling one at a time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    tasks = _warm_tasks()
    print(f"warming {len(tasks)} calls in {workers} processes", flush=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for line in pool.map(_warm_one, tasks):
            print(line, flush=True)


def probe() -> None:
    """Print what the checks need to know about this Python, as JSON (run in a subprocess, so
    that a broken torch or CUDA cannot take the orchestrator down)."""
    import importlib.metadata as metadata
    import platform

    info = {"python": f"{platform.python_version()} ({sys.executable})"}
    for name in VERSION_PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    import torch

    info["torch cuda"] = torch.version.cuda or "none (CPU build)"
    info["cuda available"] = torch.cuda.is_available()
    if info["cuda available"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = (f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                       f"{props.total_memory / 2**30:.0f} GiB")
    try:
        import symattn_kernels

        backends = symattn_kernels.info()["backends"]
        info["backends"] = {name: ("usable" if entry["usable"] else f"unusable: {entry['reason']}")
                            for name, entry in backends.items()}
    except Exception as exc:  # reported, not fatal: the steps after it say what it breaks
        info["backends"] = {"import symattn_kernels": f"failed: {type(exc).__name__}: {exc}"}
    print(json.dumps(info))


def _probe(env: dict, log_path: Path) -> dict:
    """probe() in a subprocess with env; {} (and the error in the log) when it fails."""
    command = [sys.executable, "-m", "bench.gpu_check", "probe"]
    with log_path.open("a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        try:
            result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            log.write("[probe timed out after 60 s]\n")
            return {}
        log.write(result.stdout + result.stderr)
    lines = result.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if result.returncode == 0 and lines else {}
    except json.JSONDecodeError:
        return {}


def _command_output(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return f"{command[0]}: not found"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return f"{shlex.join(command)}: timed out after 15 s"
    return (result.stdout + result.stderr).strip()


def git_commit() -> str:
    """The revision of the tree; a copy without .git has it from SYMATTN_GIT_COMMIT."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SYMATTN_GIT_COMMIT") or "unknown (no git; set SYMATTN_GIT_COMMIT)"


class Check:
    """The steps in order; each records a Step and writes its own files into out."""

    def __init__(self, out: Path, dry: bool):
        self.out, self.dry = out, dry
        self.started = time.monotonic()
        self.steps: list[Step] = []
        self.facts: dict = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self.compile_log = Path(tempfile.mkdtemp(prefix="symattn-gpu-check-")) / "triton-compiles.tsv"
        self.device = "cpu" if dry else "cuda"
        self.warming: Capped | None = None

    def versions(self) -> None:
        path = self.out / "versions.txt"
        start = time.monotonic()
        commit = git_commit()
        path.write_text(f"commit: {commit}\ncpu cores: {os.cpu_count()}\n\n")
        self.facts = _probe(self.env, path)
        self.facts["commit"] = commit
        with path.open("a") as f:
            f.write("\n" + "\n".join(f"{key}: {value}" for key, value in self.facts.items()) + "\n\n")
            f.write(_command_output(["nvcc", "--version"]) + "\n\n")
            smi = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                   "clocks.max.sm,clocks.mem,clocks.max.mem,temperature.gpu,power.draw",
                                   "--format=csv"])
            self.facts["nvidia-smi"] = smi.splitlines()[-1] if smi else ""
            f.write(smi + "\n\n" + _command_output(["nvidia-smi"]) + "\n")
        seconds = time.monotonic() - start
        ok = "torch" in self.facts
        detail = (f"torch {self.facts.get('torch')}, triton {self.facts.get('triton')}, "
                  f"numpy {self.facts.get('numpy')}, GPU: {self.facts.get('gpu', 'none visible to torch')}"
                  if ok else "the Python probe failed (see versions.txt)")
        self.steps.append(Step("versions", "pass" if ok else "fail", seconds, CAPS_S["versions"], detail))

    def install(self) -> None:
        log = self.out / "install.log"
        cap = CAPS_S["install"]
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps",
                   "--disable-pip-version-check", "-e", "."]
        build_env = dict(self.env, TORCH_CUDA_ARCH_LIST=GPU_ARCH_LIST, SYMATTN_BUILD_CUDA="1",
                         MAX_JOBS=str(os.cpu_count() or 1))
        if self.dry:
            log.write_text(f"dry run: not run (CUDA build): TORCH_CUDA_ARCH_LIST={GPU_ARCH_LIST} "
                           f"SYMATTN_BUILD_CUDA=1 MAX_JOBS={build_env['MAX_JOBS']} {shlex.join(command)}\n"
                           "the later steps import the package from the source tree (PYTHONPATH)\n")
            code, seconds, status = 0, 0.0, "skipped"
        else:
            log.write_text("")
            code, seconds = run_capped(command, log, cap, build_env)
            status = "pass" if code == 0 else ("timeout" if code is None else "fail")
        cause = _last_error(log) if status == "fail" else ""
        backends = _probe(self.env, log).get("backends", {})
        self.facts["backends"] = backends
        state = ", ".join(f"{name} {entry.split(':')[0]}" for name, entry in backends.items())
        if status == "pass":
            detail = f"pip -e with the CUDA extension for sm_90a: {seconds:.0f} s; backends: {state}"
        elif status == "skipped":
            detail = f"dry run: no CUDA build; from the source tree (PYTHONPATH): {state}"
        else:
            detail = (f"pip install {status} after {seconds:.0f} s ({cause or 'install.log'}); "
                      f"PYTHONPATH fallback: {state}")
        self.steps.append(Step("install", status, seconds, cap, detail))

    def start_warm(self) -> None:
        """Start compiling the benchmark's kernels in the background (it runs beside the tests:
        each takes half the cores); warm() waits for it."""
        self.warming = None
        if self.dry or not self.facts.get("cuda available"):
            return
        (self.out / "bench.log").write_text("")
        workers = max(1, (os.cpu_count() or 2) // 2)
        # One compile thread per worker process: the workers are the parallelism.
        env = dict(self.env, TORCHINDUCTOR_COMPILE_THREADS="1")
        self.warming = Capped([sys.executable, "-m", "bench.gpu_check", "warm", str(workers)],
                              self.out / "bench.log", CAPS_S["warm"], env)

    def warm(self) -> None:
        if self.warming is None:
            reason = "dry run" if self.dry else "no CUDA device visible to torch"
            self.steps.append(Step("warm", "skipped", 0.0, CAPS_S["warm"], f"{reason}: nothing to compile"))
            return
        code, seconds = self.warming.wait()
        status = "pass" if code == 0 else ("timeout" if code is None else "fail")
        log = self.warming.log_path.read_text(errors="replace")
        failed = [line for line in log.splitlines() if ": " in line and ("Error" in line or "not usable" in line)]
        detail = (f"Triton kernels and FlexAttention graphs of the sweep compiled in parallel (bench.log); "
                  f"{len(failed)} calls failed or unusable")
        self.steps.append(Step("warm", status, seconds, CAPS_S["warm"], detail))

    def tests(self) -> None:
        self.start_warm()
        log = self.out / "pytest-gpu.log"
        junit = self.out / "junit-gpu.xml"
        cap = CAPS_S["tests"]
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider", "-q",
                   "-rfE", "--tb=short", f"--junitxml={junit}"]
        if self.facts.get("cuda available") and self.facts.get("pytest-xdist", "not installed") != "not installed":
            # Compiles, not kernels, take the suite's time: workers compile in parallel, on the
            # half of the cores that the warm step leaves.
            command += ["-n", str(max(2, (os.cpu_count() or 2) // 2))]
        log.write_text("")
        code, seconds = run_capped(command, log, cap, dict(self.env, SYMATTN_TRITON_COMPILE_LOG=str(self.compile_log)))
        counts = junit_counts(junit)
        compiles = compile_summary(self.compile_log)
        detail = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                  f"{counts['skipped']} skipped" if counts else "no junit XML written")
        detail += f"; Triton compilations: {compiles}"
        if code is None:
            status = "timeout"
        elif counts and counts["tests"] and counts["skipped"] == counts["tests"]:
            status = "skipped"  # no CUDA here: every GPU test skips
        else:
            status = "pass" if code == 0 else "fail"
        self.steps.append(Step("tests", status, seconds, cap, detail))

    def bench(self) -> None:
        log = self.out / "bench.log"  # after the warm step's lines, if any
        cap = max(BENCH_MIN_CAP_S, TOTAL_BUDGET_S - SUMMARY_RESERVE_S - (time.monotonic() - self.started))
        command = [sys.executable, "-m", "bench", "--device", self.device, "--ops", "shared_attention",
                   "--providers", *BENCH_PROVIDERS, "--no-plot", "--out", str(self.out)]
        if self.dry:
            command += ["--quick", "--dtype", "fp32"]
        else:
            command += ["--dtype", "bf16", "--shapes", "gpu-check"]
        code, seconds = run_capped(command, log, cap, self.env)
        rows = read_rows(self.out / f"{self.device}.csv")
        measured = sum(row["status"] == "ok" for row in rows)
        detail = f"{measured} of {len(rows)} cases measured"
        if code not in (0, None, 130) and not rows:
            detail += f" ({_last_error(log) or 'bench.log'})"
        if code is None or code == 130:
            status = "timeout"
        elif self.dry:
            status = "dry" if code == 0 else "fail"
            detail += " (dry run: one small CPU shape, not the CUDA sweep)"
        else:
            problems = [row for row in rows if row["status"].startswith(("mismatch", "error"))]
            status = "pass" if code == 0 and not problems else "fail"
            if problems:
                detail += f"; {len(problems)} failed the correctness gate or raised"
        self.steps.append(Step("bench", status, seconds, cap, detail))

    def summary(self) -> str:
        text = render_summary(self.steps, self.facts, read_rows(self.out / f"{self.device}.csv"),
                              self.out / "bench.log", self.dry, time.monotonic() - self.started)
        (self.out / "summary.md").write_text(text + "\n")
        return text


def _last_error(log: Path) -> str:
    """The last line of a step's log that names an error (what the summary quotes for a failed step)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith(("[", "$"))]
    errors = [line for line in lines if "Error:" in line] or lines
    return errors[-1][:200] if errors else ""


def junit_counts(path: Path) -> dict:
    """{tests, passed, failed, errors, skipped} of a junit XML; {} when it is missing or broken."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = Counter()
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    return {"tests": counts["tests"], "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"],
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}


def compile_summary(path: Path) -> str:
    """Distinct Triton kernel compilations in the log the test session wrote (one line per JIT
    compilation: kernel name, tab, cache key), by kernel."""
    try:
        lines = [line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line]
    except OSError:
        return "none recorded"
    distinct = {tuple(line) for line in lines}
    by_kernel = Counter(name for name, _ in distinct)
    listed = ", ".join(f"{name} {count}" for name, count in by_kernel.most_common())
    return f"{len(distinct)} distinct ({len(lines)} in all workers): {listed}"


def read_rows(path: Path) -> list[dict]:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _shape_key(row: dict) -> tuple:
    return (row["mode"], int(row["D"]), row["causal"] == "True", int(row["S"]))


def bench_table(rows: list[dict]) -> list[str]:
    """One line per (mode, D, causal, S): TFLOP/s of every provider that ran (flash-attn's
    count), and the package's best row over the fastest peer (>1: ours faster)."""
    providers = [p for p in BENCH_PROVIDERS if any(r["provider"] == p and r["status"] == "ok" for r in rows)]
    if not providers:
        return ["(no benchmark row measured)"]
    short = {p: p.removeprefix("symattn-") for p in providers}
    lines = ["| mode | D | causal | S | B×H | " + " | ".join(short[p] for p in providers) + " | ours / best peer |",
             "|---|---|---|---|---|" + "---|" * len(providers) + "---|"]
    cases: dict[tuple, dict] = {}
    for row in rows:
        cases.setdefault(_shape_key(row), {})[row["provider"]] = row
    for key, case in cases.items():
        mode, dim, causal, seqlen = key
        first = next(iter(case.values()))
        cells = []
        for p in providers:
            row = case.get(p)
            if row is None:
                cells.append("")
            elif row["status"] == "ok":
                cells.append(f"{float(row['tflops']):.3g}")
            else:
                cells.append(row["status"].split(":")[0])
        ok = {p: float(r["median_ms"]) for p, r in case.items() if r["status"] == "ok"}
        ours = [ms for p, ms in ok.items() if p.startswith("symattn-")]
        peers = [ms for p, ms in ok.items() if p in PEER_PROVIDERS]
        ratio = f"{min(peers) / min(ours):.2f}×" if ours and peers else "–"
        lines.append(f"| {mode} | {dim} | {'yes' if causal else 'no'} | {seqlen} | {first['B']}×{first['H']} | "
                     + " | ".join(cells) + f" | {ratio} |")
    return lines


def _missing_providers(bench_log: Path) -> list[str]:
    """The benchmark's 'skipped provider' lines (providers that cannot run here, and why)."""
    try:
        text = bench_log.read_text(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.startswith("skipped provider ")
            and "not selected" not in line]


def render_summary(steps: list[Step], facts: dict, rows: list[dict], bench_log: Path, dry: bool,
                   total_s: float) -> str:
    title = "GPU check" + (" (DRY RUN on a machine without a GPU: no GPU figure below)" if dry else "")
    lines = [f"## {title}", "",
             f"commit {facts.get('commit', 'unknown')}; {facts.get('gpu', 'no GPU visible to torch')}; "
             f"torch {facts.get('torch', '?')} (CUDA {facts.get('torch cuda', '?')}), triton {facts.get('triton', '?')}, "
             f"numpy {facts.get('numpy', '?')}, python {str(facts.get('python', '?')).split(' ')[0]}",
             f"nvidia-smi: {facts.get('nvidia-smi') or 'not run'}", "",
             "| step | status | seconds | cap | detail |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.cap_s:.0f} | {s.detail} |" for s in steps]
    lines += ["", f"total {total_s:.0f} s of a {TOTAL_BUDGET_S} s budget", ""]
    missing = _missing_providers(bench_log)
    if missing:
        lines += ["Providers that did not run:", *(f"- {m.removeprefix('skipped provider ')}" for m in missing), ""]
    bad = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]
    if bad:
        lines += ["Rows that failed:",
                  *(f"- {r['provider']} {r['mode']} B{r['B']} S{r['S']} H{r['H']} D{r['D']}"
                    f"{' causal' if r['causal'] == 'True' else ''}: {r['status']}" for r in bad[:12]), ""]
    lines += [f"Benchmark ({rows[0]['dtype'] if rows else '-'}, TFLOP/s with flash-attn's count; "
              "'ours / best peer' is the fastest peer's median over our best median):", *bench_table(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the files (created; at most 8 files)")
    parser.add_argument("--dry", action="store_true",
                        help="rehearse on a machine without a GPU: no CUDA build, GPU tests skip, bench --quick on CPU")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.dry)
    for step in (check.versions, check.install, check.tests, check.warm, check.bench):
        print(f"gpu-check: {step.__name__} ...", flush=True)
        try:
            step()
        except Exception as exc:  # the orchestrator's own bug must not hide the other steps
            check.steps.append(Step(step.__name__, "fail", 0.0, 0.0, f"gpu_check raised {type(exc).__name__}: {exc}"))
    print(check.summary(), flush=True)
    files = [p for p in args.out.iterdir()]
    if len(files) > MAX_FILES:
        print(f"gpu-check: {len(files)} entries in {args.out}, more than {MAX_FILES}", flush=True)
        return 1
    return 0 if all(s.status in ("pass", "skipped", "dry") for s in check.steps) else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["probe"]:
        probe()
    elif sys.argv[1:2] == ["warm"]:
        warm(int(sys.argv[2]))
    else:
        sys.exit(main())
