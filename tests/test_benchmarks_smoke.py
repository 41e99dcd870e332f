"""Runs every case of benchmarks/bench_*.py once at a tiny size on the CPU, untimed, so that
`make test` catches a broken benchmark file, and benchmarks/report.py on synthetic result
files. Needs no pytest-benchmark; pythae's and Pyro's rows skip where those are missing."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae._backend import interpreting, triton_available

# The benchmark files import each other by name, as pytest's default import mode lets them.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("bench_gaussian")
bench_iwae = importlib.import_module("bench_iwae")

TINY = bench.Size(batch=4, dim=8)
TINY_IWAE = {
    "log_mean_exp": bench_iwae.Size(K=3, B=5),
    "importance_sample": bench_iwae.Size(B=4, D=8, K=3),
    "mixture_log_prob": bench_iwae.Size(N=6, C=3, D=4),
    "estimate_log_likelihood": bench_iwae.Size(K=7, B=4, D=3),
}
pytestmark = bench.pytestmark  # the same warning filter as the benchmarks


@pytest.mark.parametrize("pass_name", bench.PASSES)
@pytest.mark.parametrize("impl", bench.IMPLS)
@pytest.mark.parametrize("op_name", bench.OPS)
def test_benchmark_case_runs(op_name, impl, pass_name):
    step = bench.build_case(bench.OPS[op_name], impl, pass_name, TINY, torch.device("cpu"))
    step()


IWAE_CASES = [(name, p) for name, op in bench_iwae.OPS.items() for p in op.passes]


@pytest.mark.parametrize("impl", bench_iwae.IMPLS)
@pytest.mark.parametrize(("op_name", "pass_name"), IWAE_CASES)
def test_iwae_benchmark_case_runs(op_name, pass_name, impl):
    op, size = bench_iwae.OPS[op_name], TINY_IWAE[op_name]
    step = bench_iwae.build_case(op, impl, pass_name, size, torch.device("cpu"))
    step()


def test_iwae_tiny_sizes_cover_every_op():
    assert TINY_IWAE.keys() == bench_iwae.OPS.keys()


# -- bench_likelihoods.py ---------------------------------------------------------------------

bench_likelihoods = importlib.import_module("bench_likelihoods")
TINY_LIKELIHOODS = [
    (name, bench_iwae.Size(**({"K": 3} if name == "bernoulli_log_prob" else {}), B=4, D=5, x=x))
    for name in bench_likelihoods.OPS
    for x in bench_likelihoods.X_DTYPES
]


@pytest.mark.parametrize("impl", bench_likelihoods.IMPLS)
@pytest.mark.parametrize("pass_name", bench.PASSES)
@pytest.mark.parametrize(("op_name", "size"), TINY_LIKELIHOODS)
def test_likelihood_benchmark_case_runs(op_name, size, pass_name, impl):
    op = bench_likelihoods.OPS[op_name]
    bench_iwae.build_case(op, impl, pass_name, size, torch.device("cpu"))()


@pytest.mark.parametrize(("op_name", "size"), TINY_LIKELIHOODS)
def test_likelihood_recipes_agree_with_fastvae(op_name, size):
    """The eager recipes compute what the ops do (here, where the PixelCNN++ recipe's bins are
    all wide enough for its difference of sigmoids)."""
    op = bench_likelihoods.OPS[op_name]
    torch.manual_seed(0)
    args, _ = op.inputs(size, torch.device("cpu"))
    torch.testing.assert_close(op.eager(*args), op.fastvae(*args), rtol=1e-4, atol=1e-4)


# -- bench_host.py: the Triton path's host code, its kernels stubbed ---------------------------

bench_host = importlib.import_module("bench_host")
STUBBED_MODULES = [importlib.import_module(name) for name in bench_host.KERNEL_GETTERS]


@pytest.mark.parametrize("impl", bench_host.IMPLS)
@pytest.mark.parametrize("op_name", bench_host.OPS)
def test_host_benchmark_case_runs(op_name, impl):
    """Every op's fwd+bwd at its smallest size; triton-host takes the Triton path (kernel
    launches counted, all stubbed) and leaves every ops module as it found it."""
    op = bench_host.OPS[op_name]
    before = [vars(m).copy() for m in STUBBED_MODULES]
    step = bench_host.build_case(op, impl, "fwd+bwd", op.sizes[0][1])
    with bench_host.launch_mode(impl) as launches:
        step()
        found = bench_host.counts(step, launches)
    assert [vars(m) for m in STUBBED_MODULES] == before
    if impl != bench_host.STUBBED:
        assert found["launches"] == 0
        return
    assert found["launches"] >= 2  # a forward and a backward kernel at least
    assert found["launches"] == sum(found["launch_names"].values())
    if triton_available():  # the stubs stand for kernels that exist
        known = {
            name
            for module, getter in bench_host.KERNEL_GETTERS.items()
            for name in vars(getattr(importlib.import_module(module), getter)())
        }
        assert set(found["launch_names"]) <= known


def test_host_sizes_are_the_launch_bound_ones():
    sizes = {name: [str(s) for _, s in op.sizes] for name, op in bench_host.OPS.items()}
    assert sizes["reparameterize_kl"] == sizes["gaussian_log_prob"] == ["B=8,D=4", "B=128,D=64"]
    assert sizes["importance_sample"] == ["B=8,D=4,K=10", "B=128,D=64,K=10"]
    assert sizes["log_mean_exp"] == ["K=10,B=8", "K=10,B=128"]
    assert sizes["mixture_log_prob"] == ["N=8,C=10,D=4", "N=128,C=10,D=64"]


def test_host_eager_recipes_match_fastvae():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    prior_mu, prior_logvar = torch.randn(3), torch.randn(3)
    _, kl = bench_host.eager_reparameterize_kl_prior(mu, logvar, prior_mu, prior_logvar)
    with fastvae.use_backend("torch"):
        expected = fastvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    torch.testing.assert_close(kl, expected)
    assert bench_host.eager_reparameterize_samples(mu, logvar, 4).shape == (4, 5, 3)


bench_tril = importlib.import_module("bench_tril")


@pytest.mark.parametrize("pass_name", bench_tril.PASSES)
@pytest.mark.parametrize("impl", bench_tril.IMPLS)
def test_tril_benchmark_case_runs(impl, pass_name):
    out = bench_tril.build_case(impl, pass_name, TINY, torch.device("cpu"))()
    B, D = TINY.batch, TINY.dim
    second = (B,) if pass_name == "fwd" else (B, D, D)  # (z, kl) or (g_mu, g_scale_tril)
    assert [t.shape for t in out] == [(B, D), second]


# -- bench_mnist.py ---------------------------------------------------------------------------

bench_mnist = importlib.import_module("bench_mnist")


@pytest.mark.parametrize("impl", bench_mnist.IMPLS)
def test_mnist_benchmark_case_runs(impl):
    size = bench_iwae.Size(K=6, B=3, D=784)
    step = bench_iwae.build_case(bench_mnist.MNIST_TEST_NLL, impl, "fwd", size, torch.device("cpu"))
    assert step().shape == (3,)


def test_mnist_all_at_once_recipe_agrees_with_the_streamed_estimate():
    """Both estimate log p(x) of the same model: within the estimates' noise at k = 2000."""
    torch.manual_seed(0)
    (model, x), kwargs = bench_mnist.nll_inputs(bench_iwae.Size(K=2000, B=2, D=784), "cpu")
    streamed = bench_mnist.streamed_nll(model, x, **kwargs)
    at_once = bench_mnist.all_at_once_nll(model, x, **kwargs)
    assert torch.allclose(streamed, at_once, atol=1.0), (streamed, at_once)


# -- bench_train.py: every workload and implementation at a tiny size -----------------------

bench_train = importlib.import_module("bench_train")
TINY_TRAIN = {
    name: replace(
        w,
        batch=4,
        x_dim=6,
        latent=3,
        enc_hidden=(8,),
        dec_hidden=(5,),
        samples=min(w.samples, 3),
        components=min(w.components, 5),
    )
    for name, w in bench_train.WORKLOADS.items()
}
# Compiling takes seconds a case: the recipe's is tried on one workload only, and fastvae's,
# whose failure the benchmark reports as a skip, not here (tens of seconds of graph breaks).
COMPILED = ("compile", "fastvae-compile")
TRAIN_CASES = [
    pytest.param(name, impl, id=f"{name}-{impl}")
    for name in bench_train.WORKLOADS
    for impl in bench_train.IMPLS
    if impl not in COMPILED or (name, impl) == ("iwae-k8", "compile")
]


@pytest.mark.parametrize(("workload_name", "impl"), TRAIN_CASES)
def test_train_benchmark_case_runs(workload_name, impl, monkeypatch):
    # Dynamo's tracing without Inductor's code generation, which takes a minute on a cold cache.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    info = {}
    step = bench_train.build_case(TINY_TRAIN[workload_name], impl, torch.device("cpu"), info)
    params = [p.detach().clone() for p in _trainable(step)]
    loss = step()
    assert torch.isfinite(torch.as_tensor(loss)).all()
    if impl in COMPILED:
        assert info["graph_breaks"] >= 0 and info["compile_s"] > 0
    if params:  # the optimizer moved the networks
        assert any(not torch.equal(a, b) for a, b in zip(params, _trainable(step)))


def _trainable(step) -> list[torch.Tensor]:
    """The parameters of a bench_train step's optimizer (none for Pyro's, which has its own)."""
    optimizer = getattr(step, "optimizer", None)
    return [p for group in optimizer.param_groups for p in group["params"]] if optimizer else []


def test_paired_speedups_time_each_installed_eager_baseline(monkeypatch):
    monkeypatch.setattr(bench_train, "PAIRED_ROUNDS", 3)
    monkeypatch.setattr(bench_train, "PAIRED_SECONDS", 0.0)
    workload = TINY_TRAIN["vae"]
    step = bench_train.build_case(workload, "fastvae", torch.device("cpu"))
    calls = []

    def counted():
        calls.append(1)
        return step()

    baselines = bench_train.PAIRED_BASELINES["fastvae"]
    speedups = bench_train.paired_speedups(workload, counted, torch.device("cpu"), baselines)
    installed = ["eager"] + [
        name for name in ("pythae", "pyro") if importlib.util.find_spec(name) is not None
    ]
    assert sorted(speedups) == sorted(installed)
    assert all(math.isfinite(r) and r > 0 for r in speedups.values())
    assert len(calls) == 3 * len(installed)


def test_train_profile_records_top_ops():
    step = bench_train.build_case(TINY_TRAIN["vae"], "fastvae", torch.device("cpu"))
    profile = bench_train.top_ops(step, torch.device("cpu"), n=3)
    assert profile["clock"] == "cpu" and profile["total_ms"] > 0
    assert len(profile["top"]) == 3 and all(0 <= share <= 1 for _, _, share in profile["top"])


# -- report.py on synthetic result files ------------------------------------------------------

report = importlib.import_module("report")


def _bench(group, extra, median, peak, bytes_moved=None):
    extra = {**extra, "peak_bytes": peak}
    if bytes_moved is not None:
        extra["bytes_moved"] = bytes_moved
    stats = {"median": median, "iqr": median / 10, "rounds": 5}
    return {"group": group, "name": group, "params": {}, "extra_info": extra, "stats": stats}


def _results(device_name: str) -> dict:
    """A pytest-benchmark file in miniature: two op cases, one training workload."""
    env = {"device": device_name, "torch": "2.x", "triton": "3.x", "fastvae_backend": "auto"}
    benchmarks = []
    for impl, median in (("fastvae", 1e-4), ("eager", 3e-4), ("compile", 2e-4)):
        for phase in ("fwd", "fwd+bwd"):
            extra = {**env, "kind": "op", "op": "log_mean_exp", "impl": impl}
            extra.update(pass_name=phase, size="K=64,B=262144", tier="large")
            benchmarks.append(
                _bench(f"log_mean_exp {phase} K=64,B=262144", extra, median, 1 << 20, 1 << 26)
            )
    for impl, median in (("fastvae", 0.010), ("eager", 0.012), ("networks", 0.008)):
        extra = {**env, "kind": "train", "workload": "iwae-k64", "impl": impl}
        if impl == "fastvae":
            extra["profile"] = {"clock": "cpu", "total_ms": 9.0, "top": [["aten::addmm", 5, 0.55]]}
        benchmarks.append(_bench("train iwae-k64 B=4,K=64", extra, median, 3 << 20))
    skipped = [
        {
            "name": "bench_train.py::test_train_step[iwae-k64-pythae]",
            "params": {"workload_name": "iwae-k64", "impl": "pythae"},
            "reason": "pythae is not installed",
        }
    ]
    return {
        "machine_info": {"python_version": "3.11", "cpu": {"brand_raw": "test", "count": 2}},
        "commit_info": {"id": "0" * 40, "dirty": False},
        "datetime": "2026-01-01T00:00:00",
        "environment": env,
        "benchmarks": benchmarks,
        "skipped": skipped,
    }


def test_report_writes_results_and_charts(tmp_path):
    files = []
    for slug, name in (("cpu", "cpu x86_64, 2 threads"), ("nvidia-h100", "NVIDIA H100 80GB HBM3")):
        path = tmp_path / f"{slug}-2026-01-01.json"
        path.write_text(json.dumps(_results(name)))
        files.append(path)
    why = tmp_path / "why.txt"
    why.write_text("# comment\ncuda/train/iwae-k64/vs-eager: the networks dominate\n")
    out = report.main([*map(str, files), "--out-dir", str(tmp_path), "--why", str(why)])
    text = out.read_text()
    assert "## cpu x86_64, 2 threads" in text and "## NVIDIA H100 80GB HBM3" in text
    assert "| fwd | K=64,B=262144 | large | 0.100 | 0.300 | 0.200 | 3.00× | 2.00× |" in text
    # 2^26 bytes in 0.1 ms = 671 GB/s, 20% of the H100 SXM's 3.35 TB/s
    assert "| 671 | 20% |" in text
    assert "**missed**: `log_mean_exp` fwd at K=64,B=262144 ≥ 85% of the bandwidth roofline" in text
    assert "**missed**: IWAE K = 64 training step ≥ 1.3× eager: 1.20×" in text
    assert "why: the networks dominate" in text
    assert "met: `iwae-k64` training step ≥ 1.0× eager (CPU): 1.20×" in text
    assert "| pythae | skipped |" in text and "pythae is not installed" in text
    assert "aten::addmm 55%" in text  # the profile under a miss
    assert "| iwae-k64 | B=4,K=64 | 10.0 | 1.20× |" in text  # latent share 20% follows
    for device in ("cpu", "nvidia-h100"):
        for chart in (f"{device}-2026-01-01-train.png", f"{device}-2026-01-01-ops.png"):
            assert (tmp_path / "charts" / chart).stat().st_size > 1000
            assert f"charts/{chart}" in text


def test_report_prefers_the_paired_speedup(tmp_path):
    """A fastvae row with a paired loop's speed-ups: the targets and tables use them (eager
    here: 1.35x paired against 1.20x from the medians), the medians' ratio stays beside them;
    so does a fastvae-compile row's against compile (1.02x paired, 0.91x from the medians)."""
    results = _results("cpu x86_64, 2 threads")
    env = results["benchmarks"][-1]["extra_info"]
    for impl, median, paired in (("fastvae-compile", 0.011, {"compile": 1.02}),
                                 ("compile", 0.010, None)):  # fmt: skip
        extra = {**env, "impl": impl, "paired": paired}
        results["benchmarks"].append(_bench("train iwae-k64 B=4,K=64", extra, median, 3 << 20))
    for bench in results["benchmarks"]:
        if bench["extra_info"].get("kind") == "train" and bench["extra_info"]["impl"] == "fastvae":
            bench["extra_info"]["paired"] = {"eager": 1.35}
    path = tmp_path / "cpu-2026-01-01.json"
    path.write_text(json.dumps(results))
    text = report.main([str(path), "--out-dir", str(tmp_path)]).read_text()
    assert "met: `iwae-k64` training step ≥ 1.0× eager (CPU): 1.35×" in text
    assert "| iwae-k64 | B=4,K=64 | 10.0 | 1.35× |" in text
    assert "| eager | 12.0 |" in text and "| 1.35× | 1.20× |" in text
    assert "met: `iwae-k64` training step under torch.compile ≥ 1.0× the compiled" in text
    assert "recipe (CPU): 1.02×" in text


def test_report_defaults_to_the_latest_file_per_device(tmp_path):
    results = json.dumps(_results("cpu"))
    for name in ("cpu-2026-01-01", "cpu-2026-02-01", "nvidia-h200-2026-01-15", "notes"):
        (tmp_path / f"{name}.json").write_text(results)
    (tmp_path / "cpu-2026-03-01.json").write_text("")  # an interrupted run's empty file
    latest = report.latest_per_device(tmp_path)
    assert [p.name for p in latest] == ["cpu-2026-02-01.json", "nvidia-h200-2026-01-15.json"]


def test_report_merges_runs(tmp_path):
    a, b = _results("NVIDIA H200"), _results("NVIDIA H200")
    a["commit_info"] = {"id": "unknown", "error": "no git"}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (a, b)):
        path.write_text(json.dumps(data))
    merged = json.loads(report.merge(paths, tmp_path / "m.json", commit="abc").read_text())
    assert len(merged["benchmarks"]) == 2 * len(a["benchmarks"])
    assert len(merged["skipped"]) == 2 and merged["commit_info"]["id"] == "abc"
    assert report.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert report.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12


def _host_rows(env: dict) -> list[dict]:
    """bench_host.py's rows: log_mean_exp (which _traffic() has) and reparameterize (not)."""
    rows = []
    for name, size, phase, medians in (
        ("log_mean_exp", "K=64,B=262144", "fwd", (20e-6, 40e-6, 30e-6)),
        ("log_mean_exp", "K=64,B=262144", "fwd+bwd", (52e-6, 90e-6, 80e-6)),
        ("reparameterize", "B=8,D=4,K=10", "fwd", (35e-6, 60e-6, 15e-6)),
    ):
        for impl, median in zip(report.HOST_IMPLS, medians):
            extra = {**env, "kind": "host", "op": name, "impl": impl, "pass_name": phase}
            extra.update(size=size, tier="small", launches=0, torch_ops=2)
            if impl == "triton-host":  # fwd: 1 kernel; fwd+bwd: 2 kernels and a torch op
                kernels, torch_ops = (1, 0) if phase == "fwd" else (2, 1)
                extra.update(launches=kernels, torch_ops=torch_ops)
            rows.append(_bench(f"host {name} {phase} {size}", extra, median, 1 << 10))
    return rows


def test_report_renders_the_host_section(tmp_path):
    data = _results("cpu x86_64, 2 threads")
    data["benchmarks"] += _host_rows(data["environment"])
    (tmp_path / "cpu-2026-01-01.json").write_text(json.dumps(data))
    (tmp_path / "traffic-cpu-2026-01-02.json").write_text(json.dumps(_traffic()))
    out = report.main(
        [str(tmp_path / "cpu-2026-01-01.json"), "--out-dir", str(tmp_path),
         "--traffic", str(tmp_path / "traffic-cpu-2026-01-02.json")]
    )  # fmt: skip
    text = out.read_text()
    assert "### Host code before a launch (CPU, kernels stubbed)" in text
    assert (
        "The Python host code of the Triton path, measured on this CPU with the kernels "
        "stubbed; a GPU run adds the launches themselves." in text
    )
    assert "| op | pass | size | host µs | launches | torch path µs | eager µs |" in text
    # The MODEL's fastvae fwd: 1 µs of bytes + a Triton launch (3 µs) on the H100 SXM, 0.70 +
    # 3 µs on the H200; fwd+bwd: 3 µs + 2 Triton launches and a torch op = 13 µs on the H100.
    assert (
        "| `log_mean_exp` | fwd | K=64,B=262144 | 20.0 | 1+0 | 40.0 | 30.0 | 5.00× / 5.41× |"
        in text
    )
    assert "| `log_mean_exp` | fwd+bwd | K=64,B=262144 | 52.0 | 2+1 | 90.0 | 80.0 | 4.00× /" in text
    assert "| `reparameterize` | fwd | B=8,D=4,K=10 | 35.0 | 1+0 | 60.0 | 15.0 | – / – |" in text
    # The op tables and targets see bench_gaussian / bench_iwae's rows only.
    assert "| fwd | K=64,B=262144 | large | 0.100 | 0.300 | 0.200 | 3.00× | 2.00× |" in text
    assert "`reparameterize` never slower" not in text and "met: `log_mean_exp` never" in text
    result = report.load(tmp_path / "cpu-2026-01-01.json")
    assert {c.name for c in report.op_cases(result)} == {"log_mean_exp"}
    # Without a traffic file: no MODEL column.
    md = report.render([result], tmp_path, [])
    assert "| `reparameterize` | fwd | B=8,D=4,K=10 | 35.0 | 1+0 | 60.0 | 15.0 |\n" in md


# -- traffic.py on tiny cases, and its section of the report ----------------------------------

traffic = importlib.import_module("traffic")


@pytest.mark.skipif(not interpreting(), reason="fastvae is counted in Triton's interpreter")
def test_traffic_counts_tiny_cases_of_every_kind(tmp_path):
    cases = traffic.gaussian_cases([TINY], ops=["reparameterize_kl"])
    cases += traffic.iwae_cases(
        {
            "log_mean_exp": [("small", TINY_IWAE["log_mean_exp"])],
            "importance_sample+prior": [("small", TINY_IWAE["importance_sample"])],
        }
    )
    cases += traffic.train_cases({"vae": TINY_TRAIN["vae"]})
    out = tmp_path / "traffic-cpu-2026-01-01.json"
    traffic.main(["--no-compile", "--recompile", "--out", str(out)], cases=cases)
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__
    found = {(c["kind"], c["name"]): c for c in data["cases"]}
    assert len(found) == 4 and all(
        c["skipped"] == {"compile": "--no-compile"} for c in found.values()
    )

    kl = found["op", "reparameterize_kl"]  # B = 4, D = 8: z (128 bytes) and the KL (16)
    assert kl["minimum"]["fwd"] == {"read": 2 * 128, "write": 128 + 16}
    assert kl["minimum"]["bwd"] == {"read": 128 + 16 + 2 * 128, "write": 2 * 128}
    fastvae, eager = kl["impls"]["fastvae"], kl["impls"]["eager"]
    assert fastvae["fwd"]["by_kind"]["triton"] >= 1 and fastvae["fwd"]["in_ops"] >= 1
    assert fastvae["fwd"]["write"] >= 128 + 16  # z and the KL, and the seed if drawn
    assert eager["fwd"]["by_kind"] == {"torch": eager["fwd"]["launches"]}
    assert eager["fwd"]["launches"] > fastvae["fwd"]["launches"]

    prior = found["op", "importance_sample+prior"]  # the prior's (D,) gradients are written
    assert prior["minimum"]["bwd"]["write"] == 2 * 4 * 8 * 4 + 2 * 8 * 4

    vae = found["train", "vae"]  # B = 4, X = 6, D = 3: the latent part of one step
    encoder_out, decoder_out, x = 4 * 6 * 4, 4 * 6 * 4, 4 * 6 * 4
    assert vae["minimum"]["fwd"] == {"read": encoder_out + decoder_out + x, "write": 4 * 3 * 4 + 4}
    assert vae["impls"]["fastvae"]["bwd"]["in_ops"] >= 1  # the kernels' backward

    md = report.main(["--traffic", str(out), "--out-dir", str(tmp_path)]).read_text()
    assert "## Memory traffic and launches" in md and "**MODEL**" in md
    assert "`reparameterize_kl`" in md and "| vae | B=4,X=6,D=3" in md
    assert "compile not counted at B=4,D=8: --no-compile" in md


def _phase(read, write, by_kind, in_ops=None, read_accessed=None):
    launches = sum(by_kind.values())
    return {
        "launches": launches, "by_kind": by_kind, "read": read, "write": write,
        "in_ops": launches if in_ops is None else in_ops,
        "read_accessed": read if read_accessed is None else read_accessed,
        "write_accessed": write, "names": {}, "in_ops_names": {},
    }  # fmt: skip


def _inductor(nbytes, kernels, extern=0):
    by_kind = {"inductor": kernels, "extern": extern}
    return {"launches": kernels + extern, "by_kind": by_kind, "bytes": nbytes, "names": {}}


MB = 3_015_000  # a microsecond at the model's H100 SXM bandwidth, 90% of 3.35 TB/s


def _traffic() -> dict:
    """A traffic file in miniature: log_mean_exp fwd / bwd, and a VAE step's latent part."""
    op = {
        "kind": "op", "name": "log_mean_exp", "size": "K=64,B=262144", "tier": "large",
        "phases": ["fwd", "bwd"], "skipped": {}, "reused": {},
        "minimum": {"fwd": {"read": 2 * MB // 3, "write": MB // 3},
                    "bwd": {"read": MB, "write": 2 * MB // 3}},
        "impls": {
            "fastvae": {"fwd": _phase(2 * MB // 3, MB // 3, {"triton": 1}),
                        "bwd": _phase(MB, MB, {"triton": 1, "torch": 1}, read_accessed=2 * MB)},
            "eager": {"fwd": _phase(2 * MB, MB, {"torch": 3}),
                      "bwd": _phase(2 * MB, 2 * MB, {"torch": 4})},
            "compile": {"fwd": _inductor(2 * MB, 1, 1), "bwd": _inductor(3 * MB, 2)},
        },
    }  # fmt: skip
    train = {
        "kind": "train", "name": "vae", "size": "B=64,X=784,D=64", "tier": "",
        "phases": ["fwd", "bwd"], "reused": {},
        "skipped": {"compile": "torch.compile failed: no"},
        "minimum": {"fwd": {"read": MB, "write": MB}, "bwd": {"read": MB, "write": MB}},
        "impls": {
            "fastvae": {"fwd": _phase(MB, MB, {"triton": 2, "torch": 2}, in_ops=2),
                        "bwd": _phase(MB, MB, {"triton": 2, "torch": 1}, in_ops=2)},
            "eager": {"fwd": _phase(3 * MB, MB, {"torch": 20}),
                      "bwd": _phase(3 * MB, MB, {"torch": 20})},
        },
    }  # fmt: skip
    env = {"device": "cpu x86_64, Triton interpreter", "torch": "2.x", "triton": "3.x",
           "commit": "a" * 40, "dirty": False, "datetime": "2026-01-02T00:00:00+00:00",
           "max_elements": 1 << 20}  # fmt: skip
    return {"traffic": 1, "environment": env, "cases": [op, train]}


def test_report_renders_the_traffic_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "traffic-cpu-2026-01-02.json").write_text(json.dumps(_traffic()))
    (results / "nvidia-h100-2026-01-01.json").write_text(
        json.dumps(_results("NVIDIA H100 80GB HBM3"))
    )
    assert report.latest_traffic(results).name == "traffic-cpu-2026-01-02.json"
    assert [p.name for p in report.latest_per_device(results)] == ["nvidia-h100-2026-01-01.json"]
    out = report.main(
        [str(results / "nvidia-h100-2026-01-01.json"), "--out-dir", str(tmp_path),
         "--traffic", str(results / "traffic-cpu-2026-01-02.json")]
    )  # fmt: skip
    text = out.read_text()
    assert "## Memory traffic and launches (2026-01-02)" in text
    assert "**MODEL**" in text and "not a GPU measurement" in text
    assert "- H100 SXM: 3.35 TB/s × 90% achievable = 3.02 TB/s" in text
    # fwd: fastvae 1 µs of bytes + a Triton launch (3 µs); eager 3 µs + 3 torch ops (12 µs);
    # compile 2 µs + a kernel (3 µs) + an extern call (4 µs). Measured: the H100 result's.
    fwd = "| fwd | K=64,B=262144 | 1+0 | 3 | 1+1 | 2.9 MiB | 8.6 MiB | 5.8 MiB | 2.9 MiB | 1.00× "
    assert fwd + "| 1.00× (1.00×) | 0.33× | 0.33× | 4.00 / 15.0 / 9.00 |" in text
    assert "| 100 / 300 / 200 |" in text  # measured on the H100, µs
    # fwd+bwd: stores (1/3 + 1) / (1/3 + 2/3) = 1.33× the minimum, loads (2/3 + 2) / (2/3 + 1)
    assert (
        "| fwd+bwd | K=64,B=262144 | 2+1 | 7 | 3+1 |" in text
        and "| 1.33× | 1.60× (1.00×) |" in text
    )
    assert "**missed**: `log_mean_exp`: fastvae stores ≤ 1.1× the minimum bytes: 1/2" in text
    assert "(`traffic/log_mean_exp/stores`)" in text
    assert "- met: one VAE training step's latent part" in text and ": 4 launches (" in text
    assert "| vae | B=64,X=784,D=64 | 4+3 (4 in ops) | 40 | – |" in text
    assert "- compile not counted at B=64,X=784,D=64: torch.compile failed: no" in text
