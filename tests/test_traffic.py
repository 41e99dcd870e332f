"""The counters of benchmarks/traffic.py on cases with a known answer: Triton kernels run by the
interpreter (loads, stores, masks, launches) and aten ops under the TorchDispatchMode."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from fastvae._backend import interpreting

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
traffic = importlib.import_module("traffic")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

# The Triton counters read the interpreter; tests/conftest.py chooses it when there is no GPU.
needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="Triton kernels are counted in the interpreter only"
)


@triton.jit
def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


@triton.jit
def head_kernel(src, dst, n, n_read, BLOCK: tl.constexpr):
    """dst = src where offs < n_read, else 0: loads n_read elements, stores n."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src + offs, mask=offs < n_read, other=0.0)
    tl.store(dst + offs, x, mask=offs < n)


@triton.jit
def twice_and_broadcast_kernel(src, scale, dst, n, BLOCK: tl.constexpr):
    """dst = 2 src * scale[0]: src loaded twice, scale's one element by every lane."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(scale + offs * 0, mask=mask)
    tl.store(dst + offs, (tl.load(src + offs, mask=mask) + tl.load(src + offs, mask=mask)) * s,
             mask=mask)  # fmt: skip


def only(recorder: traffic.Recorder) -> traffic.Launch:
    assert len(recorder.launches) == 1, recorder.launches
    return recorder.launches[0]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_copy_kernel_moves_twice_its_bytes_in_one_launch(dtype):
    n = 1000  # 4 programs of 256, the last one masked
    src, dst = torch.randn(n).to(dtype), torch.empty(n, dtype=dtype)
    with traffic.counting() as recorder:
        copy_kernel[(4,)](src, dst, n, BLOCK=256)
    launch = only(recorder)
    nbytes = n * src.element_size()
    assert (launch.kind, launch.name) == ("triton", "copy_kernel")
    assert (launch.read, launch.write) == (nbytes, nbytes)
    assert (launch.read_accessed, launch.write_accessed) == (nbytes, nbytes)
    assert torch.equal(dst, src)


@needs_interpreter
def test_masked_lanes_are_not_counted():
    src, dst = torch.randn(100), torch.empty(100)
    with traffic.counting() as recorder:
        head_kernel[(1,)](src, dst, 100, 30, BLOCK=128)
    launch = only(recorder)
    assert (launch.read, launch.read_accessed) == (30 * 4, 30 * 4)
    assert (launch.write, launch.write_accessed) == (100 * 4, 100 * 4)


@needs_interpreter
def test_repeated_and_broadcast_loads_count_once_as_distinct_bytes():
    n = 300
    src, scale, dst = torch.randn(n), torch.tensor([3.0]), torch.empty(n)
    with traffic.counting() as recorder:
        twice_and_broadcast_kernel[(2,)](src, scale, dst, n, BLOCK=256)
    launch = only(recorder)
    assert launch.read_accessed == 2 * n * 4 + n * 4  # src twice, scale[0] by every lane
    assert launch.read == n * 4 + 4  # distinct: src once, scale's one element
    assert launch.write == launch.write_accessed == n * 4
    torch.testing.assert_close(dst, 6 * src)


@needs_interpreter
def test_each_launch_counts_its_own_distinct_bytes():
    src, dst = torch.randn(64), torch.empty(64)
    with traffic.counting() as recorder:
        for _ in range(3):
            copy_kernel[(1,)](src, dst, 64, BLOCK=64)
    assert [launch.read for launch in recorder.launches] == [256] * 3
    assert recorder.summary()["read"] == 3 * 256 and recorder.summary()["launches"] == 3


def test_eager_add_is_one_launch_of_three_times_its_bytes():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    with traffic.counting() as recorder:
        a + b
    launch = only(recorder)
    assert (launch.kind, launch.name) == ("torch", "aten.add.Tensor")
    assert (launch.read, launch.write) == (2 * a.nbytes, a.nbytes)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a.t(),
        lambda a: a.view(-1),
        lambda a: a[1:, ::2],
        lambda a: a.unsqueeze(0).expand(3, 8, 16),
        lambda a: a.chunk(2, dim=-1),
        lambda a: a.detach(),
        lambda a: torch.empty_like(a),
    ],
    ids=["t", "view", "slice", "expand", "chunk", "detach", "empty_like"],
)
def test_views_and_allocations_launch_nothing(view):
    a = torch.randn(8, 16)
    with traffic.counting() as recorder:
        view(a)
    assert recorder.launches == []


def test_torch_op_bytes():
    a, row = torch.randn(8, 16), torch.randn(1, 16)

    def counted(fn) -> tuple[int, int, int]:
        with traffic.counting() as recorder:
            fn()
        return len(recorder.launches), recorder.summary()["read"], recorder.summary()["write"]

    n = a.nbytes
    assert counted(lambda: a + row.expand(8, 16)) == (1, n + row.nbytes, n)  # broadcast: once
    assert counted(lambda: a.clone().add_(a)) == (2, 3 * n, 2 * n)  # clone, then read-write
    assert counted(lambda: torch.zeros_like(a)) == (1, 0, n)  # the template is not read
    assert counted(lambda: a.clone().zero_()) == (2, n, 2 * n)  # zero_ writes only
    assert counted(lambda: a.sum()) == (1, n, 4)
    assert counted(lambda: torch.add(a, a, out=torch.empty_like(a))) == (1, 2 * n, n)
    assert counted(lambda: a.to(torch.float64)) == (1, n, 2 * n)


def test_backward_ops_are_counted_and_uncounted_pauses():
    a = torch.randn(8, 16, requires_grad=True)
    with traffic.counting() as recorder:
        with traffic.uncounted():
            b = a * 2  # not counted (its backward runs outside the block: counted)
        loss = (b * b).sum()
        mark = len(recorder.launches)
        loss.backward()
    assert [launch.name for launch in recorder.launches[:mark]] == [
        "aten.mul.Tensor",
        "aten.sum.default",
    ]
    assert len(recorder.launches) > mark  # the backward's ops (ones_like, expand's mul, ...)


def test_missing_interpreter_hooks_fail_loudly(monkeypatch):
    from triton.runtime import interpreter

    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_masked_store")
    with pytest.raises(RuntimeError, match="create_masked_store"), traffic.counting():
        pass


@needs_interpreter
def test_fastvae_kernel_stores_its_outputs_once():
    """reparameterize_kl's forward kernels (fastvae's Triton path) store z and the KL once."""
    mu, logvar = torch.randn(8, 4), torch.randn(8, 4)
    with traffic.counting() as recorder, traffic.fastvae.use_backend("triton"):
        z, kl = traffic.fastvae.reparameterize_kl(mu, logvar)
    kernels = [launch for launch in recorder.launches if launch.kind == "triton"]
    assert kernels and all(launch.in_ops for launch in recorder.launches)
    assert sum(launch.write_accessed for launch in kernels) == z.nbytes + kl.nbytes
    assert sum(launch.read for launch in kernels) >= mu.nbytes + logvar.nbytes


@needs_interpreter
def test_log_prob_of_k_samples_reads_and_writes_the_posterior_once():
    """gaussian_log_prob of K samples against one (B, D) posterior on the Triton path: one
    kernel each way, mu and logvar loaded once a tile for every sample, and their gradients
    summed over the samples in the kernel (stored at (B, D), no torch sum afterwards)."""
    K, B, D = 5, 6, 7
    x = torch.randn(K, B, D, requires_grad=True)
    mu, logvar = (torch.randn(B, D, requires_grad=True) for _ in range(2))
    incoming = torch.randn(K, B)  # not ones
    with traffic.counting() as recorder, traffic.fastvae.use_backend("triton"):
        out = traffic.fastvae.gaussian_log_prob(x, mu, logvar)
        out.backward(incoming)
    assert [launch.kind for launch in recorder.launches] == ["triton", "triton"]
    forward, backward = recorder.launches
    posterior = mu.nbytes + logvar.nbytes
    assert forward.read_accessed == x.nbytes + posterior
    assert forward.write_accessed == out.nbytes
    assert backward.read_accessed == x.nbytes + posterior + out.nbytes
    assert backward.write_accessed == x.nbytes + posterior


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_inductor_counts_a_compiled_add():
    a, b = torch.randn(64, 32), torch.randn(64, 32)
    torch._dynamo.reset()
    with traffic.inductor_counting() as snapshot:
        torch.compile(lambda x, y: x + y, dynamic=False)(a, b)
        counts = snapshot()
    assert counts["launches"] == counts["by_kind"]["inductor"] == 1
    assert counts["bytes"] == 3 * a.nbytes


@torch.library.custom_op("fastvae_test_traffic::twice_plus_one", mutates_args=())
def twice_plus_one(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def test_a_custom_op_counts_the_ops_inside_it():
    a = torch.randn(10)
    with traffic.counting() as recorder:
        twice_plus_one(a)
    assert [launch.name for launch in recorder.launches] == ["aten.mul.Tensor", "aten.add.Tensor"]
