"""The fused CPU loops' machinery (fastvae.ops._cpu_loops): when a loop runs, what it falls back
to, and that a compiler's trace fuses the reference instead. Their numerics are tested with each
op's others, as the torch-loops path (test_bernoulli.py, test_discretized_logistic.py)."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_close
from conftest import run_cpu_loops

import fastvae
from fastvae import reference
from fastvae.ops import _cpu_loops, bernoulli, discretized_logistic, gaussian, logmeanexp

LOOPS = [
    discretized_logistic._FORWARD_LOOP,
    discretized_logistic._GRADS_LOOP,
    discretized_logistic._OFF_GRID_LOOP,
]


@pytest.fixture
def loops_on(monkeypatch):
    """The loops on as by default (conftest turns them off), with their own thresholds."""
    monkeypatch.setattr(_cpu_loops, "ENABLED", True)
    monkeypatch.setattr(_cpu_loops, "failure", None)


@pytest.fixture
def operand_layouts(monkeypatch):
    """A list that gets the shape of each call that ran a loop."""
    calls = []
    layout = _cpu_loops._operands

    def counted(shape, tensors):
        calls.append(shape)
        return layout(shape, tensors)

    monkeypatch.setattr(_cpu_loops, "_operands", counted)
    return calls


def _pixels_and_params(B, D):
    pixels = torch.randint(0, 256, (B, D), dtype=torch.uint8)
    mean = torch.rand(B, D, requires_grad=True)
    log_scale = (torch.randn(B, D) - 3.0).requires_grad_()
    return pixels, mean, log_scale


def _value_and_grads(pixels, mean, log_scale):
    out = fastvae.discretized_logistic_log_prob(pixels, mean, log_scale)
    grads = torch.autograd.grad(out, (mean, log_scale), torch.randn_like(out))
    return out, grads


def _call_with_gradients(op: str, n: int) -> None:
    """One forward and backward of `op` on inputs of n (broadcast) elements."""
    if op == "dlogistic":
        _value_and_grads(*_pixels_and_params(1, n))
    elif op == "bernoulli":
        logits = torch.randn(1, n, requires_grad=True)
        fastvae.bernoulli_log_prob(torch.rand(1, n) < 0.5, logits).sum().backward()
    elif op == "gaussian":
        mu, logvar = torch.randn(2, 1, n, requires_grad=True)
        fastvae.gaussian_log_prob(torch.randn(1, n), mu, logvar).sum().backward()
    else:
        x = torch.randn(2, n // 2, requires_grad=True)
        fastvae.log_mean_exp(x, 0).sum().backward()


THRESHOLDS = {
    "dlogistic": discretized_logistic.LOOP_ELEMENTS,
    "bernoulli": bernoulli.LOOP_ELEMENTS,
    "gaussian": gaussian.LOG_PROB_LOOP_ELEMENTS,
    "log_mean_exp": logmeanexp.LOOP_ELEMENTS,
}


@pytest.fixture
def loop_results(monkeypatch):
    """A list that gets, for each CpuLoop call, whether the loop ran (a result, not None)."""
    ran = []
    call = _cpu_loops.CpuLoop.__call__

    def recorded(loop, *args):
        result = call(loop, *args)
        ran.append(result is not None)
        return result

    monkeypatch.setattr(_cpu_loops.CpuLoop, "__call__", recorded)
    return ran


@pytest.mark.parametrize("op", list(THRESHOLDS))
def test_loops_run_from_their_threshold_by_default(loops_on, loop_results, op):
    for n, runs in ((THRESHOLDS[op] - 2, False), (THRESHOLDS[op], True)):
        loop_results.clear()
        _call_with_gradients(op, n)
        assert sum(loop_results) == (2 if runs else 0), (op, n, loop_results)


def test_loops_agree_with_the_reference(loops_on, operand_layouts):
    pixels, mean, log_scale = _pixels_and_params(8, 300)
    out = fastvae.discretized_logistic_log_prob(pixels, mean, log_scale)
    grads = torch.autograd.grad(out.sum(), (mean, log_scale))
    assert len(operand_layouts) == 2
    mean, log_scale = mean.detach(), log_scale.detach()
    expected = reference.discretized_logistic_log_prob_forward(pixels, mean, log_scale, 256)
    assert_close("log P", out, expected, rtol=1e-5)
    g = torch.ones_like(expected)
    expected_grads = reference.discretized_logistic_log_prob_backward(
        g, pixels, mean, log_scale, 256
    )
    for name, ours, theirs in zip(("mean", "log_scale"), grads, expected_grads):
        assert_close(f"d/d {name}", ours, theirs, rtol=1e-4, atol=1e-6)


def test_no_loop_for_float64_or_below_the_threshold(loops_on, operand_layouts, monkeypatch):
    pixels, mean, log_scale = _pixels_and_params(4, 512)
    _value_and_grads(pixels, mean.double(), log_scale.double())
    assert operand_layouts == []
    run_cpu_loops(monkeypatch, LOOPS)
    _value_and_grads(pixels[:0], mean[:0], log_scale[:0])  # no elements: nothing to loop over
    assert operand_layouts == []


def test_a_compile_failure_falls_back_to_the_reference_with_a_warning(loops_on, monkeypatch):
    def no_compiler(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    loop = _cpu_loops.CpuLoop(discretized_logistic._loop_forward, 0)
    pixels, mean, log_scale = _pixels_and_params(2, 5)
    shape = pixels.shape
    with pytest.warns(RuntimeWarning, match="no C.. compiler found"):
        assert loop(shape, [pixels, mean, log_scale], 256) is None
    assert "no C++ compiler found" in _cpu_loops.failure
    assert not LOOPS[0].applies(shape, [pixels, mean, log_scale])


def test_a_signature_past_dynamos_recompile_limit_keeps_the_reference(loops_on, monkeypatch):
    class FailOnRecompileLimitHit(Exception):  # Dynamo's, matched by name
        pass

    attempts = []

    def at_the_limit(fn, **kwargs):
        def compiled(*args):
            attempts.append(args)
            raise FailOnRecompileLimitHit("recompile_limit reached")

        return compiled

    monkeypatch.setattr(torch, "compile", at_the_limit)
    loop = _cpu_loops.CpuLoop(discretized_logistic._loop_forward, 0)
    inputs = list(_pixels_and_params(2, 5))
    for _ in range(2):
        assert loop(inputs[0].shape, inputs, 256) is None
    assert len(attempts) == 1  # the second call did not try again
    assert _cpu_loops.failure is None  # nor did the other signatures lose their loop


def test_a_traced_call_fuses_the_reference_not_a_loop(loops_on, operand_layouts, monkeypatch):
    run_cpu_loops(monkeypatch, LOOPS)
    inputs = _pixels_and_params(4, 64)
    compiled = torch.compile(
        lambda x, m, s: fastvae.discretized_logistic_log_prob(x, m, s), fullgraph=True
    )
    out = compiled(*inputs)
    assert operand_layouts == []
    eager = fastvae.discretized_logistic_log_prob(*inputs)
    assert len(operand_layouts) == 1
    assert_close("compiled log P", out, eager, rtol=1e-5)


def test_a_broadcast_x_is_read_in_place_by_the_loop(loops_on, monkeypatch):
    """x (B, D) against K samples: the loop's operand is x's own memory, shape (1, B, D)."""
    run_cpu_loops(monkeypatch, [bernoulli._FORWARD_LOOP])
    x = torch.rand(3, 7) < 0.5
    seen = []
    layout = _cpu_loops._operands

    def spy(shape, tensors):
        operands = layout(shape, tensors)
        seen.append(operands)
        return operands

    monkeypatch.setattr(_cpu_loops, "_operands", spy)
    fastvae.bernoulli_log_prob(x, torch.randn(5, 3, 7))
    x_operand, logits_operand = seen[0]
    assert x_operand.shape == (1, 3, 7) and x_operand.data_ptr() == x.data_ptr()
    assert logits_operand.shape == (5, 3, 7)


def test_the_contiguous_shortcut_gives_row_layouts_grid():
    """_operands' shortcut for contiguous operands (no row_layout) against row_layout's grid."""
    K, B, D = 3, 4, 5
    x, logits, per_row = torch.rand(B, D), torch.rand(K, B, D), torch.rand(K, B, 1)
    full = torch.rand(B, D)
    cases = [
        ((K, B, D), [x, logits]),
        ((K, B, D), [x, logits, per_row]),
        ((B, D), [full, full, torch.rand(B, 1)]),
        ((K, B, D), [logits, logits, None]),
        ((1, 1), [torch.rand(1, 1)]),
        ((K, B, 1), [torch.rand(K, B, 1), torch.rand(B, 1)]),
        ((2, K, B, D), [x, torch.rand(2, K, B, D)]),
    ]
    for shape, tensors in cases:
        shape = torch.Size(shape)
        fast = _cpu_loops._contiguous_operands(shape, tensors)
        assert fast is not None, shape
        for ours, theirs in zip(fast, _cpu_loops._strided_operands(shape, tensors)):
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert ours.shape == theirs.shape and torch.equal(ours, theirs), shape
    # a (D,) operand among (B, D) ones, and a strided one, take row_layout's way
    assert _cpu_loops._contiguous_operands(torch.Size((K, B, D)), [x, logits, full[0]]) is None
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert _cpu_loops._contiguous_operands(torch.Size((K, B, D)), [strided, logits]) is None


def _loops_against_reference(op, *inputs):
    """op's output with the loops on, at every size, and with them off."""
    ours = op(*inputs)
    with pytest.MonkeyPatch.context() as off:
        off.setattr(_cpu_loops, "ENABLED", False)
        theirs = op(*inputs)
    return ours, theirs


def test_inputs_expanded_along_a_dim_the_grid_keeps(loops_on, monkeypatch):
    """Every operand broadcast along a dim (a user's expand): the grid keeps the dim's size,
    rows and the sum over D alike."""
    run_cpu_loops(monkeypatch, [*LOOPS, bernoulli._FORWARD_LOOP])
    K, B, D = 4, 8, 64
    pixels = torch.randint(0, 256, (B, D), dtype=torch.uint8)
    cases = {
        "over K": (pixels, torch.rand(B, D).expand(K, B, D), torch.full((D,), -3.0)),
        "over D": (
            torch.full((B, 1), 0.5).expand(B, 256),
            torch.rand(B, 1).expand(B, 256),
            torch.full((1,), -2.0).expand(256),
        ),
    }
    for name, inputs in cases.items():
        ours, theirs = _loops_against_reference(fastvae.discretized_logistic_log_prob, *inputs)
        assert_close(f"log P, expanded {name}", ours, theirs, rtol=1e-5)
    logits = torch.randn(B, D).expand(K, B, D)
    ours, theirs = _loops_against_reference(fastvae.bernoulli_log_prob, pixels > 127, logits)
    assert_close("Bernoulli, logits expanded over K", ours, theirs, rtol=1e-5)


def test_a_backward_with_create_graph_stays_differentiable(loops_on, monkeypatch):
    """A loop's gradient carries no autograd history, so a backward that builds a graph
    (create_graph) runs the reference: the second derivative is there and agrees."""
    run_cpu_loops(monkeypatch, [gaussian._LOG_PROB_LOOP, gaussian._LOG_PROB_GRADS_LOOP])
    x, mu = torch.randn(3, 4, 5), torch.randn(4, 5)
    logvar = torch.randn(4, 5, requires_grad=True)

    def second_derivative():
        out = fastvae.gaussian_log_prob(x, mu, logvar).sum()
        (grad,) = torch.autograd.grad(out, logvar, create_graph=True)
        assert grad.grad_fn is not None
        return torch.autograd.grad(grad.square().sum(), logvar)[0]

    ours = second_derivative()
    monkeypatch.setattr(_cpu_loops, "ENABLED", False)
    assert_close("second derivative", ours, second_derivative(), rtol=1e-5)


def test_requires_grad_does_not_compile_a_loop_again(loops_on, monkeypatch):
    from torch._dynamo.utils import counters

    run_cpu_loops(monkeypatch, [gaussian._LOG_PROB_LOOP])
    x, mu, logvar = torch.randn(3, 4, 5), torch.randn(4, 5), torch.randn(4, 5)
    with torch.no_grad():
        fastvae.gaussian_log_prob(x, mu, logvar)
        graphs = counters["stats"]["unique_graphs"]
        fastvae.gaussian_log_prob(x, mu.requires_grad_(), logvar.requires_grad_())
    assert counters["stats"]["unique_graphs"] == graphs
