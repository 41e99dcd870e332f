"""benchmarks/RESULTS.md and speed-up charts from pytest-benchmark result files.

    python -m benchmarks.report [FILE ...] [--out-dir DIR]

FILE: --benchmark-json files of the suites in benchmarks/ (default: the latest
benchmarks/results/<device>-<date>.json of each device). Writes DIR/RESULTS.md (default DIR:
benchmarks/) and DIR/charts/<device>-train.png, DIR/charts/<device>-ops.png; with a traffic
file of benchmarks/traffic.py (--traffic; default, when no FILE is given: the latest
benchmarks/results/traffic-<device>-<date>.json), a section of memory traffic and launches.
The rows of benchmarks/bench_host.py (kind "host": the Triton path's host code with its kernels
stubbed) get a section of their own, out of the op tables and targets.
Every number comes from the files and benchmarks/targets.json (the targets, the devices' peak
bandwidths, the time model's constants); the only hand-written text is benchmarks/why.txt, the
reasons given for missed targets, keyed by target id.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
WHY_FILE = HERE / "why.txt"
TARGETS_FILE = HERE / "targets.json"


def load_targets(path: Path = TARGETS_FILE) -> dict:
    """benchmarks/targets.json: targets per device class, peak bandwidths, the traffic model."""
    return json.loads(Path(path).read_text())


TARGETS = load_targets()
# Peak memory bandwidth on paper, bytes/s; the first pattern found in the device name wins.
PEAK_BANDWIDTH = tuple(
    (pattern, float(bandwidth)) for pattern, bandwidth in TARGETS["peak_bandwidth"]["devices"]
)
OP_IMPLS = ("fastvae", "eager", "compile")
HOST_IMPLS = ("triton-host", "fastvae", "eager")  # bench_host.py's: stubbed, torch path, eager
TRAIN_IMPLS = ("fastvae", "fastvae-compile", "eager", "compile", "pythae", "pyro", "networks")
TRAIN_BASELINES = ("eager", "compile", "pythae", "pyro")
COMPILED = ("compile", "fastvae-compile")
TIERS = {"small": 0, "medium": 1, "large": 2}
DATE_NAME = re.compile(r"^(?P<device>.+)-(?P<date>\d{4}-\d{2}-\d{2})$")


# -- reading result files --------------------------------------------------------------------


@dataclass
class Row:
    """One benchmark: kind "op" (name: the op, phase: fwd / fwd+bwd) or "train" (name: the
    workload, phase: "step"); times in seconds."""

    kind: str
    name: str
    impl: str
    phase: str
    size: str
    tier: str
    median: float
    iqr: float
    rounds: int
    peak_bytes: int | None
    bytes_moved: int | None
    extra: dict


@dataclass
class Result:
    path: Path
    device_slug: str
    date: str
    meta: dict
    rows: list[Row]
    skipped: list[dict] = field(default_factory=list)

    @property
    def device_name(self) -> str:
        env = self.meta.get("environment") or {}
        if env.get("device"):
            return env["device"]
        for row in self.rows:
            if row.extra.get("device"):
                return row.extra["device"]
        return self.device_slug

    @property
    def is_cuda(self) -> bool:
        return not self.device_name.lower().startswith("cpu")

    @property
    def device_class(self) -> str:
        return "cuda" if self.is_cuda else "cpu"

    def environment(self) -> dict:
        env = dict(self.meta.get("environment") or {})
        for row in self.rows:  # files from before the top-level "environment"
            for key in ("device", "torch", "triton", "fastvae_backend"):
                env.setdefault(key, row.extra.get(key))
        return env

    def rows_of(self, kind: str) -> list[Row]:
        return [r for r in self.rows if r.kind == kind]


def parse_row(bench: dict) -> Row:
    extra = bench.get("extra_info") or {}
    params = bench.get("params") or {}
    group = bench.get("group") or ""
    stats = bench["stats"]
    kind = extra.get("kind") or ("train" if "workload_name" in params else "op")
    parts = group.split(" ", 2)
    if kind == "train":
        name = extra.get("workload") or params.get("workload_name") or parts[1]
        phase, size = "step", parts[2] if len(parts) > 2 else ""
    else:
        name = extra.get("op") or params.get("op_name") or parts[0]
        phase = extra.get("pass_name") or params.get("pass_name") or parts[1]
        size = extra.get("size") or (parts[2] if len(parts) > 2 else "")
    return Row(
        kind=kind,
        name=name,
        impl=extra.get("impl") or params.get("impl") or "?",
        phase=phase,
        size=size,
        tier=extra.get("tier") or "",
        median=stats["median"],
        iqr=stats.get("iqr", 0.0),
        rounds=stats.get("rounds", 0),
        peak_bytes=extra.get("peak_bytes"),
        bytes_moved=extra.get("bytes_moved"),
        extra=extra,
    )


def load(path: Path) -> Result:
    data = json.loads(path.read_text())
    match = DATE_NAME.match(path.stem)
    slug, date = (match["device"], match["date"]) if match else (path.stem, "")
    if not date and data.get("datetime"):
        date = data["datetime"][:10]
    meta = {k: v for k, v in data.items() if k not in ("benchmarks", "skipped")}
    rows = [parse_row(b) for b in data.get("benchmarks", [])]
    return Result(path, slug, date, meta, rows, data.get("skipped") or [])


def latest_per_device(directory: Path) -> list[Path]:
    """The newest <device>-<date>.json of each device in `directory` that holds benchmarks (an
    interrupted run can leave an empty file)."""
    candidates: dict[str, list[tuple[str, float, Path]]] = {}
    for path in directory.glob("*.json"):
        if TRAFFIC_NAME.match(path.stem):  # benchmarks/traffic.py's counts, not benchmarks
            continue
        if match := DATE_NAME.match(path.stem):
            key = (match["date"], path.stat().st_mtime, path)
            candidates.setdefault(match["device"], []).append(key)
    latest = []
    for device in sorted(candidates):
        for _, _, path in sorted(candidates[device], reverse=True):
            if _has_benchmarks(path):
                latest.append(path)
                break
    return latest


def _has_benchmarks(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("benchmarks"))
    except (OSError, ValueError, AttributeError):
        return False


# -- numbers and formatting ------------------------------------------------------------------


def device_pattern(device_name: str) -> str | None:
    """The PEAK_BANDWIDTH pattern of a device name (the first found in it), or None."""
    for pattern, _ in PEAK_BANDWIDTH:
        if pattern.lower() in device_name.lower():
            return pattern
    return None


def peak_bandwidth(device_name: str) -> float | None:
    pattern = device_pattern(device_name)
    return None if pattern is None else dict(PEAK_BANDWIDTH)[pattern]


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    value = seconds * 1e3
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(value: float | None, suffix: str = "×") -> str:
    if value is None:
        return "–"
    return f"{value:.2f}{suffix}" if value >= 0.1 else f"{value:.2g}{suffix}"


def mib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.1f}"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def divide(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(header: list[str], rows: Iterable[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def slugify(text: str) -> str:
    return re.sub("[^a-z0-9]+", "-", text.lower()).strip("-")


# -- op tables -------------------------------------------------------------------------------


@dataclass
class OpCase:
    name: str
    phase: str
    size: str
    tier: str
    impls: dict[str, Row]

    def median(self, impl: str) -> float | None:
        row = self.impls.get(impl)
        return row.median if row else None

    def speedup(self, baseline: str) -> float | None:
        return divide(self.median(baseline), self.median("fastvae"))

    def peak_ratio(self, baseline: str = "eager") -> float | None:
        mine, theirs = self.impls.get("fastvae"), self.impls.get(baseline)
        if mine is None or theirs is None:
            return None
        return divide(mine.peak_bytes, theirs.peak_bytes)

    def gbps(self, impl: str = "fastvae") -> float | None:
        row = self.impls.get(impl)
        if row is None or not row.bytes_moved:
            return None
        return row.bytes_moved / row.median / 1e9


def op_cases(result: Result, kind: str = "op") -> list[OpCase]:
    """The rows of `kind` ("op", or bench_host.py's "host") by (op, pass, size)."""
    cases: dict[tuple[str, str, str], OpCase] = {}
    for row in result.rows_of(kind):
        key = (row.name, row.phase, row.size)
        case = cases.setdefault(key, OpCase(row.name, row.phase, row.size, row.tier, {}))
        case.impls[row.impl] = row
        case.tier = case.tier or row.tier
    order = {name: i for i, name in enumerate(dict.fromkeys(k[0] for k in cases))}
    seen = {key: i for i, key in enumerate(cases)}
    return sorted(
        cases.values(),
        key=lambda c: (
            order[c.name],
            c.phase != "fwd",
            TIERS.get(c.tier, 3),
            seen[(c.name, c.phase, c.size)],
        ),
    )


def op_section(result: Result) -> list[str]:
    cases = op_cases(result)
    if not cases:
        return []
    bandwidth = peak_bandwidth(result.device_name) if result.is_cuda else None
    out = ["### Fused ops", ""]
    out.append(
        "Median time of one call (ms); speed-up = the baseline's time / fastvae's; peak = "
        "fastvae's peak memory / eager's."
    )
    if result.is_cuda:
        peak_text = f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else "unknown for this device"
        out.append(
            "GB/s: the minimum bytes the op must move (docs/math.md) / fastvae's "
            f"time; roofline: the device's peak bandwidth on paper ({peak_text})."
        )
    out.append("")
    for name in dict.fromkeys(c.name for c in cases):
        header = ["pass", "size", "tier", "fastvae", "eager", "compile", "vs eager"]
        header += ["vs compile", "peak vs eager"]
        if result.is_cuda:
            header += ["GB/s", "% roofline"]
        rows = []
        for c in (c for c in cases if c.name == name):
            row = [c.phase, c.size, c.tier or "–"]
            row += [ms(c.median(impl)) for impl in OP_IMPLS]
            row += [ratio(c.speedup("eager")), ratio(c.speedup("compile")), ratio(c.peak_ratio())]
            if result.is_cuda:
                gbps = c.gbps()
                row += ["–" if gbps is None else f"{gbps:.0f}"]
                row += [pct(divide(gbps * 1e9, bandwidth)) if gbps and bandwidth else "–"]
            rows.append(row)
        out += [f"`{name}`", "", table(header, rows, "lll" + "r" * (len(header) - 3)), ""]
    return out


# -- host code before a launch (benchmarks/bench_host.py) -----------------------------------


def host_section(
    result: Result, modeled: list[TrafficRow] | None = None, targets: dict | None = None
) -> list[str]:
    """bench_host.py's rows: per op, pass and size the stubbed Triton path's host time, its
    launches, the torch path's and eager's times, and the host time over the traffic MODEL's
    GPU time of fastvae (`modeled`: a traffic file's rows) where it has the case."""
    cases = op_cases(result, kind="host")
    if not cases:
        return []
    model = (TARGETS if targets is None else targets)["traffic"]["model"]
    by_case = {(r.name, r.phase, r.size): r for r in modeled or [] if r.kind == "op"}
    stubbed = HOST_IMPLS[0]
    device = next((r.extra["device"] for c in cases for r in c.impls.values()
                   if r.extra.get("device")), "this CPU")  # fmt: skip
    out = ["### Host code before a launch (CPU, kernels stubbed)", ""]
    out.append(
        "The Python host code of the Triton path, measured on this CPU with the kernels "
        "stubbed; a GPU run adds the launches themselves. benchmarks/bench_host.py runs each "
        f"op's Triton path on CPU tensors ({device}) with every kernel launch replaced by a "
        "stub that does nothing: host µs is the median CPU time of one call of what remains "
        "(argument checks, the autograd.Function, layouts, buffers, the seed draw, "
        "wrap_triton, and the torch ops around the kernels, which run on this CPU here and "
        "are launches on a GPU). launches: the stubbed kernel launches + those torch ops, per "
        "call. Beside it, measured in the same run and the same way (one thread, CPU time): "
        "the same op on fastvae's torch path (the CPU path) and the eager recipe."
    )
    names = " / ".join(d["name"] for d in model["devices"])
    if by_case:
        out.append(
            f"host ÷ MODEL ({names}): the host time over fastvae's GPU time in the memory "
            "traffic section's MODEL (not a measurement), where the traffic file has the "
            "case: above 1× the GPU would wait for the host."
        )
    out.append("")
    header = ["op", "pass", "size", "host µs", "launches", "torch path µs", "eager µs"]
    if by_case:
        header.append(f"host ÷ MODEL: {names}")
    rows = []
    for c in cases:
        mine = c.impls.get(stubbed)
        launches = "–"
        if mine is not None and "launches" in mine.extra:
            launches = f"{mine.extra['launches']}+{mine.extra.get('torch_ops', 0)}"
        us = [c.median(impl) for impl in HOST_IMPLS]
        row = [f"`{c.name}`", c.phase, c.size, us_text(_us(us[0])), launches]
        row += [us_text(_us(t)) for t in us[1:]]
        if by_case:
            traffic_row = by_case.get((c.name, c.phase, c.size))
            counts = traffic_row.counts.get("fastvae") if traffic_row else None
            shares = [
                ratio(divide(_us(us[0]), model_us(counts, d, model))) for d in model["devices"]
            ]
            row.append(" / ".join(shares))
        rows.append(row)
    out += [table(header, rows, "lll" + "r" * (len(header) - 3)), ""]
    return out


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


# -- training-step tables --------------------------------------------------------------------


@dataclass
class TrainCase:
    workload: str
    size: str
    impls: dict[str, Row]
    skipped: dict[str, str]

    def median(self, impl: str) -> float | None:
        row = self.impls.get(impl)
        return row.median if row else None

    def speedup(self, baseline: str, impl: str = "fastvae") -> float | None:
        """impl's paired speed-up over baseline where the run measured one
        (bench_train.paired_speedups: fastvae against the eager-mode baselines, fastvae-compile
        against compile), else the ratio of the two cases' medians."""
        paired = self.paired(baseline, impl)
        return paired if paired is not None else self.median_ratio(baseline, impl)

    def paired(self, baseline: str, impl: str = "fastvae") -> float | None:
        row = self.impls.get(impl)
        return (row.extra.get("paired") or {}).get(baseline) if row else None

    def median_ratio(self, baseline: str, impl: str = "fastvae") -> float | None:
        return divide(self.median(baseline), self.median(impl))

    def peak_ratio(self, baseline: str = "eager", impl: str = "fastvae") -> float | None:
        mine, theirs = self.impls.get(impl), self.impls.get(baseline)
        if mine is None or theirs is None:
            return None
        return divide(mine.peak_bytes, theirs.peak_bytes)

    def latent_share(self, impl: str) -> float | None:
        """The share of impl's step outside the networks: 1 - networks' time / impl's. None for
        the compiled rows, whose networks are compiled too (the networks row is eager)."""
        total, networks = self.median(impl), self.median("networks")
        if total is None or networks is None or impl in COMPILED:
            return None
        return max(0.0, 1.0 - networks / total)


def train_cases(result: Result) -> list[TrainCase]:
    cases: dict[str, TrainCase] = {}
    for row in result.rows_of("train"):
        case = cases.setdefault(row.name, TrainCase(row.name, row.size, {}, {}))
        case.impls[row.impl] = row
    for skip in result.skipped:
        params = skip.get("params") or {}
        if "workload_name" in params and params["workload_name"] in cases:
            cases[params["workload_name"]].skipped[params.get("impl", "?")] = skip["reason"]
    return list(cases.values())


def top_ops_text(row: Row | None, n: int = 4) -> str:
    profile = (row.extra.get("profile") or {}) if row else {}
    top = profile.get("top") or []
    if not top:
        return "no profile recorded"
    parts = [f"{escape(name)} {share:.0%}" for name, _, share in top[:n]]
    return f"{profile.get('clock', 'cpu')} self time {profile['total_ms']:.1f} ms: " + ", ".join(
        parts
    )


def train_section(result: Result) -> list[str]:
    cases = train_cases(result)
    if not cases:
        return []
    out = ["### Training steps", ""]
    out.append(
        "One step = zero_grad, loss, backward, Adam step, with the same networks and batch for "
        "every implementation (benchmarks/bench_train.py). Speed-up over an eager-mode "
        "baseline (eager, pythae, pyro) = the median over rounds of a loop that times one step "
        "of the baseline and one of fastvae back to back (paired: the machine's drift between "
        "cases cancels; runs before 2026-12-01 have no paired loop); fastvae-compile's over "
        "compile is paired the same way where the run has that loop; fastvae's over compile = the "
        "ratio of the separate cases' medians, which the tables below give. Peak = fastvae's "
        "peak memory / eager's; latent share = 1 − (the "
        "networks-only step's time / the step's time): the share of the step spent outside "
        "the encoder and decoder (sampling, KL or log-weights, prior, likelihood, bound). The "
        "networks-only step runs eagerly, so compiled rows get no share. Profiles (top ops by "
        "self time, torch.profiler, one step) are shown under missed targets."
    )
    out.append("")
    header = ["workload", "size", "fastvae ms"] + [f"vs {b}" for b in TRAIN_BASELINES]
    header += ["peak vs eager", "latent share: fastvae", "eager"]
    rows = []
    for c in cases:
        row = [c.workload, c.size, ms(c.median("fastvae"))]
        row += [ratio(c.speedup(b)) for b in TRAIN_BASELINES]
        row += [ratio(c.peak_ratio()), pct(c.latent_share("fastvae")), pct(c.latent_share("eager"))]
        rows.append(row)
    out += [table(header, rows, "ll" + "r" * (len(header) - 2)), ""]
    for c in cases:
        out += [f"`{c.workload}` ({c.size})", ""]
        header = ["implementation", "median ms", "IQR ms", "rounds", "fastvae's speed-up"]
        header += ["ratio of medians", "peak MiB", "latent share", "notes"]
        rows = []
        for impl in TRAIN_IMPLS:
            row = c.impls.get(impl)
            if row is None:
                reason = c.skipped.get(impl)
                if reason:
                    rows.append([impl, "skipped", "", "", "", "", "", "", escape(reason)])
                continue
            notes = []
            if "graph_breaks" in row.extra:
                notes.append(
                    f"compiled in {row.extra.get('compile_s', 0):.0f} s, "
                    f"{row.extra['graph_breaks']} graph breaks"
                )
            mine = impl in ("fastvae", "networks")
            speedup = "" if mine else ratio(c.speedup(impl))
            of_medians = "" if mine else ratio(c.median_ratio(impl))
            share = "" if impl == "networks" else pct(c.latent_share(impl))
            rows.append(
                [
                    impl,
                    ms(row.median),
                    ms(row.iqr),
                    str(row.rounds),
                    speedup,
                    of_medians,
                    mib(row.peak_bytes),
                    share,
                    "; ".join(notes),
                ]
            )
        out += [table(header, rows, "lrrrrrrrl"), ""]
    return out


# -- targets ---------------------------------------------------------------------------------


@dataclass
class Check:
    """One target on one device: id (the key for why.txt), text, measured value, met, and
    lines of detail shown under a miss ("profile: ...")."""

    id: str
    text: str
    measured: str
    met: bool
    details: list[str] = field(default_factory=list)


def train_profile(case: TrainCase, impls: Iterable[str]) -> list[str]:
    lines = []
    networks = case.median("networks")
    for impl in impls:
        total = case.median(impl)
        if total is None:
            continue
        split = ""
        if networks is not None:
            latent = max(0.0, total - networks)
            split = f"networks {ms(networks)} ms, the rest (latent ops) {ms(latent)} ms; "
        profile = top_ops_text(case.impls.get(impl))
        lines.append(f"profile: {impl} {ms(total)} ms = {split}{profile}")
    return lines


def device_targets(result: Result, kind: str, targets: dict | None = None) -> list[dict]:
    """The targets of `kind` ("train", "ops") for the result's device class, from targets.json."""
    targets = TARGETS if targets is None else targets
    return (targets.get("targets") or {}).get(result.device_class, {}).get(kind, [])


def _expand(target: dict, **case) -> tuple[str, str]:
    """A target's (id, text) for one case: its format strings over its fields and the case's."""
    fields = {**target, **case}
    return target["id"].format(**fields), target["text"].format(**fields)


def train_checks(result: Result, targets: dict | None = None) -> list[Check]:
    checks = []
    cases = {c.workload: c for c in train_cases(result)}
    for target in device_targets(result, "train", targets):
        workloads = list(cases) if target["workload"] == "*" else [target["workload"]]
        baseline = target["baseline"]
        for workload in workloads:
            case = cases.get(workload)
            if case is None:
                continue
            check_id, text = _expand(target, workload=workload)
            if target["check"] == "speedup":
                impl = target.get("impl", "fastvae")  # or fastvae-compile against compile
                value = case.speedup(baseline, impl)
                if value is None:
                    continue
                met = value >= target["min_speedup"]
                details = train_profile(case, (impl, baseline))
            elif target["check"] == "peak":
                value = case.peak_ratio(baseline)
                if value is None:
                    continue
                met = value <= target["max_peak"]
                details = [
                    f"peak: fastvae {mib(case.impls['fastvae'].peak_bytes)} MiB, {baseline} "
                    f"{mib(case.impls[baseline].peak_bytes)} MiB"
                ]
            else:
                raise ValueError(f"targets.json: unknown train check {target['check']!r}")
            checks.append(Check(check_id, text, f"{value:.2f}×", met, details))
    return checks


def op_checks(result: Result, targets: dict | None = None) -> list[Check]:
    checks = []
    cases = op_cases(result)
    names = list(dict.fromkeys(c.name for c in cases))
    for target in device_targets(result, "ops", targets):
        ops = names if target["ops"] == "*" else target["ops"]
        check = target["check"]
        if check == "roofline":
            checks += _roofline_checks(result, target, [c for c in cases if c.name in ops])
        elif check == "case":
            for c in cases:
                if (
                    c.name in ops
                    and c.tier == target["tier"]
                    and target.get("pass", c.phase) == c.phase
                ):
                    checks += _case_check(target, c)
        elif check == "every_case":
            for name in (n for n in ops if n in names):
                checks += _every_case_check(target, name, [c for c in cases if c.name == name])
        else:
            raise ValueError(f"targets.json: unknown op check {check!r}")
    return checks


def _roofline_checks(result: Result, target: dict, cases: list[OpCase]) -> list[Check]:
    bandwidth = peak_bandwidth(result.device_name)
    checks = []
    for c in cases:
        gbps = c.gbps()
        if c.tier != target["tier"] or gbps is None or bandwidth is None:
            continue
        share = gbps * 1e9 / bandwidth
        check_id, text = _expand(target, op=c.name, phase=c.phase, size=c.size)
        measured = f"{share:.0%} ({gbps:.0f} GB/s of {bandwidth / 1e9:.0f})"
        checks.append(Check(check_id, text, measured, share >= target["min_roofline"]))
    return checks


def _case_check(target: dict, c: OpCase) -> list[Check]:
    """One case against min_speedup (>=), max_peak (<=) and peak_below (<), those given."""
    values = {"speedup": c.speedup(target["baseline"]), "peak": c.peak_ratio(target["baseline"])}
    conditions = []
    if "min_speedup" in target:
        conditions.append(("speedup", lambda v: v >= target["min_speedup"]))
    if "max_peak" in target:
        conditions.append(("peak", lambda v: v <= target["max_peak"]))
    if "peak_below" in target:
        conditions.append(("peak", lambda v: v < target["peak_below"]))
    if any(values[key] is None for key, _ in conditions):
        return []
    met = all(test(values[key]) for key, test in conditions)
    check_id, text = _expand(target, op=c.name, phase=c.phase, size=c.size)
    return [Check(check_id, text, target["measured"].format(**values), met)]


def _every_case_check(target: dict, name: str, cases: list[OpCase]) -> list[Check]:
    ratios = [(c, c.speedup(target["baseline"])) for c in cases]
    ratios = [(c, r) for c, r in ratios if r is not None]
    if not ratios:
        return []
    slow = [(c, r) for c, r in ratios if r < target["min_speedup"]]
    worst, value = min(ratios, key=lambda cr: cr[1])
    measured = f"{len(ratios) - len(slow)}/{len(ratios)} cases; slowest "
    measured += f"{worst.phase} {worst.size}: {value:.2f}×"
    slower = ", ".join(f"{c.phase} {c.size} {r:.2f}×" for c, r in slow)
    check_id, text = _expand(target, op=name)
    return [Check(check_id, text, measured, not slow, [f"slower: {slower}"])]


def read_why(path: Path) -> list[tuple[str, str]]:
    """(pattern, text) pairs from `path`: lines "PATTERN: text", PATTERN an fnmatch pattern
    over "<device class or slug>/<target id>"; # starts a comment."""
    if not path.exists():
        return []
    pairs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ": " not in line:
            continue
        pattern, text = line.split(": ", 1)
        pairs.append((pattern.strip(), text.strip()))
    return pairs


def why_for(result: Result, check: Check, why: list[tuple[str, str]]) -> str | None:
    keys = [f"{result.device_slug}/{check.id}", f"{result.device_class}/{check.id}"]
    return why_text(keys, why)


def why_text(keys: list[str], why: list[tuple[str, str]]) -> str | None:
    """The text of the first why.txt pattern that matches one of `keys`."""
    for pattern, text in why:
        if any(fnmatch.fnmatchcase(key, pattern) for key in keys):
            return text
    return None


def targets_section(
    result: Result, why: list[tuple[str, str]], targets: dict | None = None
) -> list[str]:
    checks = train_checks(result, targets) + op_checks(result, targets)
    if not checks:
        return []
    met = sum(c.met for c in checks)
    out = ["### Targets", "", f"{met} of {len(checks)} met on this device.", ""]
    keys = [result.device_slug, result.device_class]
    return out + check_lines(checks, keys, why, prefix=f"{result.device_class}/") + [""]


def check_lines(checks: list[Check], keys: list[str], why, prefix: str = "") -> list[str]:
    """Met / missed lines of `checks`, with their details and reason (why.txt, matched
    against "<key>/<target id>" for each key, or against the id itself for no key)."""
    out = []
    for c in checks:
        mark = "met" if c.met else "**missed**"
        out.append(f"- {mark}: {c.text}: {c.measured} (`{prefix}{c.id}`)")
        if c.met:
            continue
        for line in c.details:
            out.append(f"  - {escape(line)}")
        reason = why_text([f"{key}/{c.id}" for key in keys] or [c.id], why)
        if reason is None:
            reason = f"not explained yet: add `{prefix}{c.id}: ...` to benchmarks/why.txt"
        out.append(f"  - why: {reason}")
    return out


# -- charts ----------------------------------------------------------------------------------


def charts(result: Result, out_dir: Path) -> list[Path]:
    """Bar charts of fastvae's speed-ups (log scale, 1× marked): training steps against each
    baseline, and ops against eager and torch.compile."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no charts")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    times = FuncFormatter(lambda value, _: f"{value:g}×")

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    slug = slugify(f"{result.device_slug}-{result.date}")  # one chart set per result file
    title = f"{result.device_name}, {result.date}"

    cases = train_cases(result)
    baselines = [b for b in TRAIN_BASELINES if any(c.speedup(b) for c in cases)]
    if cases and baselines:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
        width = 0.8 / len(baselines)
        for i, baseline in enumerate(baselines):
            values = [c.speedup(baseline) or 0.0 for c in cases]
            xs = [j + (i - (len(baselines) - 1) / 2) * width for j in range(len(cases))]
            ax.bar(xs, values, width, label=f"vs {baseline}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cases)), [c.workload for c in cases])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(times)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("fastvae's speed-up (×)")
        ax.set_title(f"Training steps: {title}")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{slug}-train.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    ops = [c for c in op_cases(result) if c.speedup("eager") or c.speedup("compile")]
    if ops:
        fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(ops) + 1)))
        ys = list(range(len(ops)))
        for offset, baseline in ((-0.2, "eager"), (0.2, "compile")):
            values = [c.speedup(baseline) or 0.0 for c in ops]
            ax.barh([y + offset for y in ys], values, 0.4, label=f"vs {baseline}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(ys, [f"{c.name} {c.phase} {c.size}" for c in ops], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(times)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("fastvae's speed-up (×)")
        ax.set_title(f"Fused ops: {title}", fontsize=10)
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = out_dir / f"{slug}-ops.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# -- memory traffic and launches (benchmarks/traffic.py) ----------------------------------------

TRAFFIC_NAME = re.compile(r"^traffic-(?P<device>.+)-(?P<date>\d{4}-\d{2}-\d{2})$")
TRAFFIC_IMPLS = ("fastvae", "eager", "compile")
PASS_PHASES = {"fwd": ("fwd",), "fwd+bwd": ("fwd", "bwd"), "step": ("fwd", "bwd")}


def latest_traffic(directory: Path) -> Path | None:
    """The newest traffic-<device>-<date>.json of benchmarks/traffic.py in `directory`."""
    candidates = [
        (match["date"], path.stat().st_mtime, path)
        for path in directory.glob("traffic-*.json")
        if (match := TRAFFIC_NAME.match(path.stem))
    ]
    return max(candidates)[2] if candidates else None


def add_counts(a: dict, b: dict) -> dict:
    """a + b of two count dicts: numbers added, nested dicts (by kind, names) added key-wise."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict):
            merged = dict(out.get(key) or {})
            for k, v in value.items():
                merged[k] = merged.get(k, 0) + v
            out[key] = merged
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
    return out


@dataclass
class TrafficRow:
    """One op pass ("fwd", "fwd+bwd") at one size, or a training workload's latent part
    ("step"): each implementation's counts summed over the pass's phases, and the minimum."""

    kind: str
    name: str
    size: str
    tier: str
    phase: str
    counts: dict[str, dict]
    minimum: dict
    skipped: dict[str, str]
    reused: dict[str, str]

    def nbytes(self, impl: str) -> int | None:
        c = self.counts.get(impl)
        if c is None:
            return None
        return c["bytes"] if "bytes" in c else c["read"] + c["write"]

    def launches(self, impl: str) -> int | None:
        c = self.counts.get(impl)
        return None if c is None else c["launches"]

    def fastvae(self, key: str) -> int | None:
        c = self.counts.get("fastvae")
        return None if c is None else c.get(key)

    def stores_ratio(self) -> float | None:
        return divide(self.fastvae("write_accessed"), self.minimum.get("write"))

    def loads_ratio(self, distinct: bool = False) -> float | None:
        key = "read" if distinct else "read_accessed"
        return divide(self.fastvae(key), self.minimum.get("read"))

    def vs_eager(self, what: str) -> float | None:
        get = self.nbytes if what == "bytes" else self.launches
        return divide(get("fastvae"), get("eager"))


def traffic_rows(data: dict) -> list[TrafficRow]:
    rows = []
    for case in data.get("cases", []):
        if case["kind"] == "train":
            passes = ["step"]
        else:
            passes = ["fwd", "fwd+bwd"] if "bwd" in case["phases"] else ["fwd"]
        for name in passes:
            phases = PASS_PHASES[name]
            counts = {}
            for impl, by_phase in case["impls"].items():
                if all(p in by_phase for p in phases):
                    total: dict = {}
                    for p in phases:
                        total = add_counts(total, by_phase[p])
                    counts[impl] = total
            minimum: dict = {}
            for p in phases:
                minimum = add_counts(minimum, case["minimum"][p])
            rows.append(
                TrafficRow(case["kind"], case["name"], case["size"], case.get("tier", ""), name,
                           counts, minimum, case.get("skipped") or {}, case.get("reused") or {})
            )  # fmt: skip
    return rows


def model_us(counts: dict | None, device: dict, model: dict) -> float | None:
    """The MODEL's time in microseconds of one row's counts on a model device: bytes /
    (achievable x peak bandwidth) + launches x the cost of one launch of their kind."""
    if counts is None:
        return None
    bandwidth = peak_bandwidth(device["name"])
    if bandwidth is None:
        raise ValueError(f"targets.json: no peak bandwidth for model device {device['name']!r}")
    nbytes = counts["bytes"] if "bytes" in counts else counts["read"] + counts["write"]
    launch_us = 0.0
    for kind, n in counts.get("by_kind", {}).items():
        if kind not in model["launch_us"]:
            raise ValueError(f"targets.json: no launch cost for launches of kind {kind!r}")
        launch_us += n * model["launch_us"][kind]
    return nbytes / (device["achievable"] * bandwidth) * 1e6 + launch_us


def size_text(nbytes: int | None) -> str:
    if nbytes is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def us_text(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def launch_text(row: TrafficRow, impl: str) -> str:
    """fastvae: Triton kernels + torch ops; compile: generated kernels + extern calls."""
    c = row.counts.get(impl)
    if c is None:
        return "–"
    kinds = c.get("by_kind", {})
    if impl == "fastvae":
        text = f"{kinds.get('triton', 0)}+{kinds.get('torch', 0)}"
        return text + (f" ({c.get('in_ops', 0)} in ops)" if row.kind == "train" else "")
    if impl == "compile":
        return f"{kinds.get('inductor', 0)}+{kinds.get('extern', 0)}"
    return str(c["launches"])


def measured_cases(results: list[Result], device: dict) -> tuple[str, dict] | None:
    """(device name, {(op, pass, size): OpCase}) of the CUDA result of a model device (the
    same peak-bandwidth pattern), or None."""
    pattern = device_pattern(device["name"])
    for result in results:
        if result.is_cuda and pattern and device_pattern(result.device_name) == pattern:
            return result.device_name, {(c.name, c.phase, c.size): c for c in op_cases(result)}
    return None


def traffic_table(rows: list[TrafficRow], model: dict, measured: list) -> str:
    """Op rows (pass, size) or training rows (workload, size), side by side."""
    first = ["workload", "size"] if rows and rows[0].kind == "train" else ["pass", "size"]
    header = [*first, "launches: fastvae", "eager", "compile", "bytes: fastvae"]
    header += ["eager", "compile", "minimum", "stores ÷ min", "loads ÷ min", "bytes ÷ eager"]
    header += ["launches ÷ eager"]
    header += [f"{d['name']} MODEL µs: fastvae / eager / compile" for d in model["devices"]]
    header += [f"measured on {name} µs: fastvae / eager / compile" for name, _ in measured]
    lines = []
    for r in rows:
        loads = ratio(r.loads_ratio())
        if r.loads_ratio() is not None:
            loads += f" ({ratio(r.loads_ratio(distinct=True))})"
        row = [r.name if r.kind == "train" else r.phase, r.size]
        row += [launch_text(r, impl) for impl in TRAFFIC_IMPLS]
        row += [size_text(r.nbytes(impl)) for impl in TRAFFIC_IMPLS]
        row += [size_text(r.minimum.get("read", 0) + r.minimum.get("write", 0))]
        row += [ratio(r.stores_ratio()), loads, ratio(r.vs_eager("bytes"))]
        row += [ratio(r.vs_eager("launches"))]
        for device in model["devices"]:
            times = [model_us(r.counts.get(impl), device, model) for impl in TRAFFIC_IMPLS]
            row.append(" / ".join(us_text(t) for t in times))
        for _, cases in measured:
            case = cases.get((r.name, r.phase, r.size))
            times = [case.median(impl) if case else None for impl in TRAFFIC_IMPLS]
            row.append(" / ".join(us_text(None if t is None else t * 1e6) for t in times))
        lines.append(row)
    return table(header, lines, "ll" + "r" * (len(header) - 2))


def traffic_checks(rows: list[TrafficRow], targets: dict | None = None) -> list[Check]:
    targets = TARGETS if targets is None else targets
    checks = []
    op_rows = [r for r in rows if r.kind == "op"]
    names = list(dict.fromkeys(r.name for r in op_rows))
    values = {
        "stores": lambda r: r.stores_ratio(),
        "loads": lambda r: r.loads_ratio(),
        "bytes_vs_eager": lambda r: r.vs_eager("bytes"),
    }
    for target in targets["traffic"]["targets"]:
        check = target["check"]
        if check in values:
            ops = names if target["ops"] == "*" else [n for n in target["ops"] if n in names]
            for name in (n for n in ops if n not in target.get("exclude", ())):
                checks += _ratio_check(target, name, op_rows, values[check])
        elif check == "launches":
            checks += _launch_check(target, [r for r in rows if r.kind == "train"])
        else:
            raise ValueError(f"targets.json: unknown traffic check {check!r}")
    return checks


def _ratio_check(target: dict, name: str, rows: list[TrafficRow], value) -> list[Check]:
    """Every case of op `name` (of target["pass"], if given): value(row) <= max_ratio."""
    wanted = target.get("pass")
    found = [(r, value(r)) for r in rows if r.name == name and wanted in (None, r.phase)]
    found = [(r, v) for r, v in found if v is not None]
    if not found:
        return []
    over = [(r, v) for r, v in found if v > target["max_ratio"]]
    worst, top = max(found, key=lambda rv: rv[1])
    measured = f"{len(found) - len(over)}/{len(found)} cases; worst {worst.phase} {worst.size}: "
    measured += f"{top:.2f}×"
    if target["check"] == "loads":
        measured += f" ({ratio(worst.loads_ratio(distinct=True))} in distinct bytes)"
    details = ["over: " + ", ".join(f"{r.phase} {r.size} {v:.2f}×" for r, v in over)]
    names = (worst.counts.get("fastvae") or {}).get("names") or {}
    if names:
        launches = ", ".join(f"{n} ×{k}" for n, k in names.items())
        details.append(f"fastvae's launches at {worst.phase} {worst.size}: {launches}")
    check_id, text = _expand(target, op=name, **{"pass": wanted})
    return [Check(check_id, text, measured, not over, details)]


def _launch_check(target: dict, rows: list[TrafficRow]) -> list[Check]:
    """fastvae's launches inside its ops in a workload's latent part <= max_launches."""
    row = next((r for r in rows if r.name == target["workload"]), None)
    fastvae = row and row.counts.get("fastvae")
    if not fastvae:
        return []
    value = fastvae.get("in_ops", 0)
    measured = f"{value} launches (the latent part: fastvae {fastvae['launches']}"
    measured += f", eager {row.launches('eager') if 'eager' in row.counts else '–'})"
    names = fastvae.get("in_ops_names") or {}
    details = ["inside fastvae's ops: " + ", ".join(f"{n} ×{k}" for n, k in names.items())]
    details = details if names else []
    check_id, text = _expand(target, workload=row.name)
    return [Check(check_id, text, measured, value <= target["max_launches"], details)]


def traffic_section(
    path: Path,
    data: dict,
    results: list[Result],
    why: list[tuple[str, str]],
    doc_dir: Path,
    targets: dict | None = None,
) -> list[str]:
    targets = TARGETS if targets is None else targets
    model = targets["traffic"]["model"]
    env = data.get("environment") or {}
    rows = traffic_rows(data)
    commit = (env.get("commit") or "unknown")[:12] + (" (dirty)" if env.get("dirty") else "")
    out = [f"## Memory traffic and launches ({env.get('datetime', '')[:10]})", ""]
    out.append(
        "Counted on the CPU by `make traffic` (benchmarks/traffic.py), not timed: fastvae's "
        "Triton kernels run in Triton's interpreter, which counts every load and store; every "
        "aten op of fastvae (around its kernels) and of the eager recipe is counted by a "
        "TorchDispatchMode (views and other ops that move no data left out); torch.compile's "
        "counts are inductor's own (its CPU code generation: a GPU compile may fuse "
        "differently). The times are a **MODEL** of a GPU, **not a GPU measurement**: bytes / "
        "achievable bandwidth + launches × the cost of one launch."
    )
    out.append("")
    facts = [
        ("device", env.get("device")),
        ("torch", env.get("torch")),
        ("triton", env.get("triton")),
        ("commit", commit),
        ("run", env.get("datetime")),
        ("raw counts", f"[{path.name}]({relative(path, doc_dir)})"),
    ]
    out += [f"- {key}: {value}" for key, value in facts if value]
    if env.get("max_elements"):
        out.append(
            f"- fastvae is counted up to {env['max_elements']} elements per tensor "
            "(`--max-elements`; the interpreter runs one program at a time): larger cases "
            "have no fastvae counts"
        )
    reused = {f for r in rows for f in r.reused.values()}
    if reused:
        out.append(
            f"- torch.compile's counts of unchanged recipes reused from {', '.join(sorted(reused))}"
        )
    out.append("")
    out.append("The MODEL's constants (benchmarks/targets.json):")
    out.append("")
    for device in model["devices"]:
        peak = peak_bandwidth(device["name"]) or 0.0
        out.append(
            f"- {device['name']}: {peak / 1e12:.2f} TB/s × {device['achievable']:.0%} achievable "
            f"= {peak * device['achievable'] / 1e12:.2f} TB/s"
        )
    costs = ", ".join(f"{kind} {us:g} µs" for kind, us in model["launch_us"].items())
    out.append(f"- per launch: {costs}")
    out += [f"- {source}" for source in model.get("sources", [])]
    out.append("")
    out.append(
        "Columns: launches (fastvae: Triton kernels + torch ops; eager: aten ops; compile: "
        "generated kernels + extern calls); bytes: the distinct bytes of each launch, summed "
        "(compile: inductor's num_bytes_accessed); minimum: each phase reads every input once "
        "and writes every output once (the backward's inputs: the upstream gradients and the "
        "forward's inputs); stores ÷ min, loads ÷ min: fastvae's bytes stored / loaded, each "
        "access counted (in parentheses: distinct bytes), over the minimum's."
    )
    out.append("")
    checks = traffic_checks(rows, targets)
    if checks:
        met = sum(c.met for c in checks)
        out += ["### Targets (memory traffic)", "", f"{met} of {len(checks)} met.", ""]
        out += check_lines(checks, [], why) + [""]
    measured = [m for d in model["devices"] if (m := measured_cases(results, d))]
    op_rows = [r for r in rows if r.kind == "op"]
    if op_rows:
        out += ["### Ops: bytes and launches", ""]
        for name in dict.fromkeys(r.name for r in op_rows):
            mine = [r for r in op_rows if r.name == name]
            mine.sort(key=lambda r: r.phase != "fwd")
            out += [f"`{name}`", "", traffic_table(mine, model, measured), ""]
            out += _skip_lines(mine)
    train_rows = [r for r in rows if r.kind == "train"]
    if train_rows:
        out += ["### Training steps: the latent part", ""]
        out.append(
            "Everything a step does between the encoder's output and the decoder's input and "
            "from the decoder's output to the loss, forward and backward (the networks are "
            "not counted); fastvae's launches inside its ops in parentheses."
        )
        out.append("")
        out += [traffic_table(train_rows, model, []), ""]
        out += _skip_lines(train_rows)
    return out


def _skip_lines(rows: list[TrafficRow]) -> list[str]:
    seen = {}
    for r in rows:
        for impl, reason in r.skipped.items():
            seen.setdefault((impl, r.size), reason)
    lines = [
        f"- {impl} not counted at {size}: {escape(reason)}" for (impl, size), reason in seen.items()
    ]
    return lines + [""] if lines else []


# -- the document ----------------------------------------------------------------------------


def header_section(result: Result, doc_dir: Path) -> list[str]:
    env = result.environment()
    commit = result.meta.get("commit_info") or {}
    machine = result.meta.get("machine_info") or {}
    cpu = (machine.get("cpu") or {}).get("brand_raw")
    commit_text = (commit.get("id") or "unknown")[:12] + (" (dirty)" if commit.get("dirty") else "")
    facts = [
        ("device", env.get("device")),
        ("CPU", f"{cpu}, {(machine.get('cpu') or {}).get('count', '?')} cores" if cpu else None),
        ("torch", env.get("torch")),
        ("triton", env.get("triton")),
        ("CUDA", env.get("cuda")),
        ("fastvae backend", env.get("fastvae_backend")),
        ("python", machine.get("python_version")),
        ("commit", commit_text),
        ("run", result.meta.get("datetime")),
        ("raw results", f"[{result.path.name}]({relative(result.path, doc_dir)})"),
    ]
    lines = [f"## {env.get('device') or result.device_slug} ({result.date})", ""]
    lines += [f"- {key}: {value}" for key, value in facts if value]
    lines.append("")
    return lines


def skipped_section(result: Result) -> list[str]:
    reasons: dict[str, int] = {}
    for skip in result.skipped:
        if "workload_name" in (skip.get("params") or {}):
            continue  # shown in the training tables
        reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
    if not reasons:
        return []
    out = ["### Skipped op cases", ""]
    out += [f"- {count} × {escape(reason)}" for reason, count in sorted(reasons.items())]
    return out + [""]


def relative(path: Path, start: Path) -> str:
    """path as a link from a document in `start`."""
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def render(
    results: list[Result],
    out_dir: Path,
    why: list[tuple[str, str]],
    traffic: Path | None = None,
    targets: dict | None = None,
) -> str:
    """RESULTS.md: a section per result file, then the traffic file's (if any)."""
    sources = "the pytest-benchmark files in `benchmarks/results/` (`make bench`)"
    if traffic is not None:
        sources += f" and the counts of `make traffic` ({traffic.name})"
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `python -m benchmarks.report` from {sources}; do not edit by hand. The "
        "reasons under missed targets come from `benchmarks/why.txt`.",
        "",
    ]
    traffic_data = json.loads(traffic.read_text()) if traffic is not None else None
    modeled = traffic_rows(traffic_data) if traffic_data is not None else None
    for result in results:
        lines += header_section(result, out_dir)
        for path in charts(result, out_dir / "charts"):
            lines += [f"![{path.stem}]({relative(path, out_dir)})", ""]
        lines += targets_section(result, why, targets)
        lines += train_section(result)
        lines += op_section(result)
        lines += host_section(result, modeled, targets)
        lines += skipped_section(result)
    if traffic is not None:
        lines += traffic_section(traffic, traffic_data, results, why, out_dir, targets)
    return "\n".join(lines).rstrip() + "\n"


def merge(paths: list[Path], out: Path, commit: str | None = None) -> Path:
    """One result file from several runs of one device (e.g. one per benchmark file): the
    first file's machine and commit info, every file's benchmarks and skipped cases. commit:
    the commit id to record where the files have none (a checkout without .git)."""
    datas = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(datas[0])
    merged["benchmarks"] = [b for d in datas for b in d.get("benchmarks", [])]
    merged["skipped"] = [s for d in datas for s in d.get("skipped", [])]
    info = dict(merged.get("commit_info") or {})
    if commit and (not info.get("id") or info.get("id") == "unknown" or "error" in info):
        info.update(id=commit, note="from the runner, not from git")
        merged["commit_info"] = info
    out.write_text(json.dumps(merged, indent=2))
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="result JSON files")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where RESULTS.md goes")
    parser.add_argument("--why", type=Path, default=WHY_FILE, help="reasons for misses")
    parser.add_argument(
        "--merge-into",
        type=Path,
        metavar="JSON",
        help="first merge FILES (runs of one device) into this result file, then report on it",
    )
    parser.add_argument(
        "--traffic",
        type=Path,
        metavar="JSON",
        help="a traffic file of benchmarks/traffic.py (default, with no FILE given: the latest "
        "benchmarks/results/traffic-*.json)",
    )
    parser.add_argument("--targets", type=Path, default=TARGETS_FILE, help="the targets file")
    args = parser.parse_args(argv)
    files = args.files or latest_per_device(RESULTS_DIR)
    traffic = args.traffic or (None if args.files else latest_traffic(RESULTS_DIR))
    if not files and traffic is None:
        parser.error(f"no result files given and none in {RESULTS_DIR}")
    if args.merge_into:
        files = [merge(files, args.merge_into)]
    results = []
    for path in files:
        try:
            results.append(load(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"skipping {path}: not a readable pytest-benchmark result file ({exc})")
    if not results and traffic is None:
        parser.error("no readable result files")
    targets = load_targets(args.targets)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "RESULTS.md"
    out.write_text(render(results, args.out_dir, read_why(args.why), traffic, targets))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
