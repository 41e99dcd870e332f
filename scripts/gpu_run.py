"""On a machine with a GPU: the whole test suite on CUDA, the benchmarks and their report.

    python3 scripts/gpu_run.py OUT [--no-tests] [--no-bench] [--suites train,gaussian,iwae]
                               [-- more pytest arguments for the benchmarks, e.g. -k iwae]

Everything lands in OUT: env.txt (versions, nvidia-smi), install.log, tests.log and
junit.xml, bench-<suite>.log and bench/<suite>.json per benchmark file, the merged
<device>-<date>.json (pytest-benchmark's JSON: device, torch / triton versions, commit),
RESULTS.md and charts/ from benchmarks/report.py, and gpu_run.log, this script's own account.

Made for a machine with torch and triton already installed and no network: nothing is
fetched. fastvae is installed in place (pip install -e . --no-deps --no-build-isolation) when
the Python at hand does not import this checkout's fastvae already. Test files whose optional
imports (hypothesis, scipy, ...) are missing are left out, and the benchmarks are skipped
without pytest-benchmark, each with a line saying so; pythae and pyro-ppl rows skip
themselves when those are missing.

Exit status: 0 when everything ran and passed; 1 when tests failed or a benchmark suite did not
finish (the benchmarks still run after failed tests); 2 when nothing could run (no CUDA device
without --allow-cpu, no pytest, fastvae not importable).

Each step can be given a time limit (--tests-timeout, --bench-timeout, seconds): on expiry
pytest gets SIGINT and still writes its junit / benchmark JSON for what it finished.
FASTVAE_COMMIT (env) names the commit where the checkout has no .git.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "benchmarks" / "report.py"
SUITES = ("gaussian", "iwae", "train")
OPTIONAL_TEST_IMPORTS = ("hypothesis", "scipy", "matplotlib", "tqdm")


class Runner:
    def __init__(self, out: Path):
        self.out = out
        self.log_file = (out / "gpu_run.log").open("a")

    def log(self, message: str) -> None:
        line = f"[{datetime.datetime.now():%H:%M:%S}] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def run(self, cmd: list[str], log_name: str, timeout: float | None = None, **kw) -> int:
        """cmd with stdout and stderr to OUT/log_name; on timeout SIGINT (pytest then writes
        its reports), SIGKILL 60 s later. Returns the exit status (124 after a timeout)."""
        self.log(f"$ {' '.join(cmd)}  > {log_name}")
        start = time.monotonic()
        with (self.out / log_name).open("w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, **kw)
            try:
                rc = proc.wait(timeout=timeout or None)
            except subprocess.TimeoutExpired:
                self.log(f"time limit of {timeout:.0f} s reached: interrupting")
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                rc = 124
        self.log(f"exit {rc} after {time.monotonic() - start:.0f} s")
        return rc

    def tail(self, log_name: str, lines: int = 15) -> None:
        path = self.out / log_name
        if path.exists():
            for line in path.read_text(errors="replace").splitlines()[-lines:]:
                self.log(f"  | {line}")


def capture(cmd: list[str], cwd: Path | str = REPO) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return proc.returncode, proc.stdout + proc.stderr


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def commit_id() -> str | None:
    rc, out = capture(["git", "rev-parse", "HEAD"])
    if rc == 0 and re.fullmatch(r"[0-9a-f]{40}", out.strip()):
        return out.strip()
    return os.environ.get("FASTVAE_COMMIT")


def device_slug() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub("[^a-z0-9]+", "-", name.lower()).strip("-")


def write_environment(r: Runner) -> None:
    import torch

    lines = [
        f"python {sys.version.split()[0]} ({sys.executable})",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}",
        f"triton {_version('triton')}",
        f"pytest {_version('pytest')}, pytest-benchmark {_version('pytest-benchmark')}",
        f"hypothesis {_version('hypothesis')}, scipy {_version('scipy')}, "
        f"matplotlib {_version('matplotlib')}",
        f"pythae {_version('pythae')}, pyro-ppl {_version('pyro-ppl')}",
        f"cuda available: {torch.cuda.is_available()}",
        f"commit: {commit_id()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name(0)}")
    if shutil.which("nvidia-smi"):
        lines += ["", capture(["nvidia-smi"])[1]]
    (r.out / "env.txt").write_text("\n".join(lines) + "\n")
    for line in lines[:9]:
        r.log(line)


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def ensure_fastvae(r: Runner) -> bool:
    """This checkout's fastvae (with fastvae.kernels) importable from anywhere, installing it
    in place without the network when it is not."""
    probe = [sys.executable, "-c", "import fastvae, fastvae.kernels; print(fastvae.__file__)"]
    rc, out = capture(probe, cwd="/")
    if rc == 0 and str(REPO) in out:
        r.log(f"fastvae already installed from this checkout: {out.strip()}")
        return True
    r.log("installing fastvae in place (no dependencies, no build isolation, no network)")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    r.run([*cmd, "--no-index", "-e", "."], "install.log")
    rc, out = capture(probe, cwd="/")
    if rc == 0 and str(REPO) in out:
        return True
    r.log(f"fastvae is not importable from this checkout: {out.strip()[-500:]}")
    r.tail("install.log")
    return False


def test_ignores(r: Runner) -> list[str]:
    """--ignore for each test file that imports an optional module this Python lacks."""
    ignores = []
    for module in OPTIONAL_TEST_IMPORTS:
        if has_module(module):
            continue
        pattern = re.compile(rf"^\s*(import|from)\s+{module}\b", re.MULTILINE)
        for path in sorted((REPO / "tests").glob("test_*.py")):
            if pattern.search(path.read_text()):
                r.log(f"{module} is not installed: leaving out {path.relative_to(REPO)}")
                ignores.append(f"--ignore={path.relative_to(REPO)}")
    return ignores


def run_tests(r: Runner, timeout: float | None) -> bool:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra"]
    cmd += [f"--junitxml={r.out / 'junit.xml'}", *test_ignores(r)]
    rc = r.run(cmd, "tests.log", timeout)
    r.tail("tests.log", 25)
    return rc == 0


def run_bench(r: Runner, suites: list[str], args: argparse.Namespace) -> tuple[bool, list[Path]]:
    if not has_module("pytest_benchmark"):
        r.log("pytest-benchmark is not installed: the benchmarks cannot run here (skipped)")
        return False, []
    for peer in ("pythae", "pyro"):
        if not has_module(peer):
            r.log(f"{peer} is not installed: its training-step rows will be skipped")
    (r.out / "bench").mkdir(exist_ok=True)
    ok, files = True, []
    for suite in suites:
        json_path = r.out / "bench" / f"{suite}.json"
        cmd = [sys.executable, "-m", "pytest", f"benchmarks/bench_{suite}.py", "-p"]
        cmd += ["no:cacheprovider", "-ra", "--benchmark-only"]
        cmd += ["--benchmark-columns=median,iqr,ops", f"--benchmark-json={json_path}"]
        cmd += [f"--benchmark-min-rounds={args.min_rounds}"]
        cmd += [f"--benchmark-max-time={args.max_time}", *args.pytest_args]
        rc = r.run(cmd, f"bench-{suite}.log", args.bench_timeout)
        r.tail(f"bench-{suite}.log", 8)
        ok = ok and rc == 0
        if json_path.exists():
            files.append(json_path)
        else:
            r.log(f"no results from bench_{suite}.py")
    return ok, files


def load_report_module():
    """benchmarks/report.py by its path (no other installed "benchmarks" package can shadow it)."""
    spec = importlib.util.spec_from_file_location("fastvae_bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclasses
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the logs and results")
    parser.add_argument("--no-tests", action="store_true", help="skip the test suite")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmarks")
    parser.add_argument("--suites", default=",".join(SUITES), help="benchmark files to run")
    parser.add_argument("--tests-timeout", type=float, default=0, help="seconds; 0: none")
    parser.add_argument("--bench-timeout", type=float, default=0, help="per suite; 0: none")
    parser.add_argument("--min-rounds", type=int, default=5)
    parser.add_argument("--max-time", type=float, default=0.5, help="seconds per case")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU too")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if extra or "--" in argv else 0)])
    args.pytest_args = extra  # after --: more arguments for the benchmarks' pytest
    suites = [s for s in args.suites.split(",") if s]
    if unknown := set(suites) - set(SUITES):
        parser.error(f"unknown suites {sorted(unknown)}; choose from {SUITES}")

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    r = Runner(args.out)
    os.chdir(REPO)
    if not has_module("torch"):
        r.log("torch is not installed")
        return 2
    write_environment(r)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        r.log("no CUDA device: this script is for a GPU machine (--allow-cpu to run anyway)")
        return 2
    if not has_module("pytest"):
        r.log("pytest is not installed: neither the tests nor the benchmarks can run")
        return 2
    if not ensure_fastvae(r):
        return 2

    status = 0
    if not args.no_tests and not run_tests(r, args.tests_timeout):
        r.log("TESTS FAILED (or were interrupted); going on with the benchmarks")
        status = 1
    if not args.no_bench:
        ok, files = run_bench(r, suites, args)
        status = status or (0 if ok else 1)
        if files:
            report = load_report_module()
            merged = args.out / f"{device_slug()}-{datetime.date.today():%Y-%m-%d}.json"
            report.merge(files, merged, commit=commit_id())
            r.log(f"results: {merged}")
            rc = r.run(
                [sys.executable, str(REPORT), str(merged), "--out-dir", str(r.out)], "report.log"
            )
            r.tail("report.log", 5)
            status = status or (0 if rc == 0 else 1)
    r.log(f"done, exit status {status}; everything is in {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
