"""Properties of the CUDA kernels that the shared backend matrix (test_backends.py) does not reach:
the code paths chosen by alignment and shape (16-byte vector accesses, scalar fallback, tails,
per-channel layouts with inner = 1 or odd inner), the bound on the number of mixed_op_sum inputs,
bit-identical gradients across runs for every reduction, and int64 indexing past 2^31 elements.

Needs a GPU and the extension built with its CUDA kernels; skipped otherwise.
"""

import pytest
import torch

import qdarts_kernels as qk
from qdarts_kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or "cuda" not in qk.available_backends(),
        reason="needs a CUDA device and qdarts_kernels._C built with its CUDA kernels",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mixed_args(x: torch.Tensor, bits, axis, gen):
    k = len(bits)
    probs = torch.softmax(torch.randn(k, generator=gen), 0)
    rows = 1 if axis is None else x.shape[axis]
    base = x.float().abs().mean().clamp_min(1e-3)
    scales = base * (0.02 + torch.rand(k, rows, generator=gen))
    return probs, (scales.reshape(k) if axis is None else scales)


def _mfq_case(x_cpu, bits, grid, axis, x_cuda=None):
    """Forward bit-exact and every gradient close to the reference; x_cuda may be a view that
    puts the data at an unaligned address."""
    gen = torch.Generator().manual_seed(x_cpu.numel())
    probs, scales = _mixed_args(x_cpu, bits, axis, gen)
    g = torch.randn(x_cpu.shape, generator=gen).to(x_cpu.dtype)
    xr, pr, sr = (t.clone().requires_grad_() for t in (x_cpu, probs, scales))
    yr = ref.mixed_fake_quant(xr, pr, sr, bits, grid=grid, axis=axis)
    yr.backward(g)
    xc = (x_cuda if x_cuda is not None else x_cpu.cuda()).detach().requires_grad_()
    pc, sc = probs.cuda().requires_grad_(), scales.cuda().requires_grad_()
    yc = qk.mixed_fake_quant(xc, pc, sc, bits, grid=grid, axis=axis, backend="cuda")
    torch.testing.assert_close(yc.cpu(), yr, rtol=0, atol=0, equal_nan=True)
    yc.backward(g.cuda())
    tol = 1e-6 if x_cpu.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(xc.grad.cpu(), xr.grad, rtol=tol, atol=tol)
    n = max(x_cpu.numel(), 1) ** 0.5
    torch.testing.assert_close(pc.grad.cpu(), pr.grad, rtol=2e-5, atol=2e-5 * n)
    torch.testing.assert_close(sc.grad.cpu(), sr.grad, rtol=2e-5, atol=2e-5 * n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4096, 4103, 300001])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_per_tensor_vector_tail_and_scalar_paths(dtype, n, offset):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * 2).to(dtype)
    storage = torch.empty(n + offset, dtype=dtype, device="cuda")
    storage[offset:] = x.cuda()
    _mfq_case(x, (2, 4, 8), "signed", None, x_cuda=storage[offset:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,axis",
    [((64, 3, 3, 3), 0), ((8, 16, 32, 32), 1), ((6, 5, 7), 1), ((1000, 24), 1), ((4, 3, 8), 2), ((3, 40000), 0)],
    ids=str,
)
def test_per_channel_layouts(dtype, shape, axis):
    gen = torch.Generator().manual_seed(len(shape) * 7 + axis)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    _mfq_case(x, (2, 4, 8, 16), "midrise", axis)
    _mfq_case(x, (3,), "unsigned", axis)


@pytest.mark.parametrize("k", [1, 4, 5, 16, 17, 32, 33, 35, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_op_sum_input_counts(k, dtype):
    gen = torch.Generator().manual_seed(k)
    outs = [torch.randn(3, 1001, generator=gen).to(dtype) for _ in range(k)]
    w = torch.softmax(torch.randn(k, generator=gen), 0)
    g = torch.randn(3, 1001, generator=gen).to(dtype)
    orf = [o.clone().requires_grad_() for o in outs]
    wr = w.clone().requires_grad_()
    yr = ref.mixed_op_sum(orf, wr)
    yr.backward(g)
    oc = [o.cuda().requires_grad_() for o in outs]
    wc = w.cuda().requires_grad_()
    yc = qk.mixed_op_sum(oc, wc, backend="cuda")
    torch.testing.assert_close(yc.cpu(), yr, rtol=0, atol=0)
    yc.backward(g.cuda())
    for a, b in zip(oc, orf):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=0, atol=0)
    torch.testing.assert_close(wc.grad.cpu(), wr.grad, rtol=2e-5, atol=2e-5 * 3003**0.5)


def test_mixed_op_sum_takes_at_most_64_inputs_and_the_automatic_choice_any():
    outs = [torch.full((4,), float(k), device="cuda") for k in range(65)]
    weights = torch.full((65,), 1 / 65, device="cuda")
    # refused in Python, before the extension: a C++ refusal crashed the process on one machine
    with pytest.raises(ValueError, match="outputs must hold at most 64 tensors on backend 'cuda'"):
        qk.mixed_op_sum(outs, weights, backend="cuda")
    y = qk.mixed_op_sum(outs, weights)
    torch.testing.assert_close(y.cpu(), ref.mixed_op_sum([o.cpu() for o in outs], weights.cpu()), rtol=0, atol=0)
    torch.testing.assert_close(qk.mixed_op_sum(outs[:64], weights[:64], backend="cuda").cpu(),
                               ref.mixed_op_sum([o.cpu() for o in outs[:64]], weights[:64].cpu()), rtol=0, atol=0)


@pytest.mark.parametrize("axis", [None, 1])
def test_reductions_are_bit_identical_across_runs(axis):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 96, 33, 33, generator=gen).cuda()
    probs, scales = _mixed_args(x.cpu(), (2, 4, 8), axis, gen)
    g = torch.randn(x.shape, generator=gen).cuda()
    outs = [torch.randn(2_000_003, generator=gen).cuda() for _ in range(8)]
    w = torch.softmax(torch.randn(8, generator=gen), 0).cuda()
    go = torch.randn(2_000_003, generator=gen).cuda()
    runs = []
    for _ in range(3):
        p, s = probs.cuda().requires_grad_(), scales.cuda().requires_grad_()
        qk.mixed_fake_quant(x, p, s, (2, 4, 8), axis=axis, backend="cuda").backward(g)
        wc = w.clone().requires_grad_()
        qk.mixed_op_sum(outs, wc, backend="cuda").backward(go)
        runs.append((p.grad, s.grad, wc.grad))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


def test_int64_indexing_past_2_pow_31_elements():
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * n * 2 + (1 << 30):
        pytest.skip("needs about 18 GB of free GPU memory")
    x = torch.empty(n, dtype=torch.float16, device="cuda")
    x[:] = 0.75
    x[-4099:] = torch.linspace(-3, 3, 4099, device="cuda", dtype=torch.float16)
    probs = torch.tensor([0.25, 0.75], device="cuda", requires_grad=True)
    scales = torch.tensor([0.5, 0.125], device="cuda", requires_grad=True)
    y = qk.mixed_fake_quant(x, probs, scales, (2, 4), backend="cuda")
    tail = ref.mixed_fake_quant(x[-4099:].cpu(), probs.detach().cpu(), scales.detach().cpu(), (2, 4))
    torch.testing.assert_close(y[-4099:].cpu(), tail, rtol=0, atol=0)
    head = ref.mixed_fake_quant(x[:8].cpu(), probs.detach().cpu(), scales.detach().cpu(), (2, 4))
    torch.testing.assert_close(y[:8].cpu(), head, rtol=0, atol=0)
    del y
    g = torch.ones_like(x)
    (dprobs,) = torch.autograd.grad(qk.mixed_fake_quant(x, probs, scales, (2, 4), backend="cuda"), (probs,), g)
    # every element but the tail is 0.75: Q_0 = 0.5 * clamp(round(1.5), -2, 1) = 0.5, Q_1 = 0.125 * 6 = 0.75
    tail = x[-4099:].cpu()
    tail_sums = [ref.fake_quant(tail, s.reshape(1), b).float().sum() for s, b in zip(scales.detach().cpu(), (2, 4))]
    expected = torch.tensor([0.5, 0.75]) * (n - 4099) + torch.stack(tail_sums)
    torch.testing.assert_close(dprobs.cpu(), expected, rtol=1e-5, atol=0)
