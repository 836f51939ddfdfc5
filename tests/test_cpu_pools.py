"""The C++ CPU pools (csrc/cpu/pooling.cpp): PyTorch's values and gradients bit for bit (max pool:
ties, NaN and -inf included; average pool: with and without count_include_pad), and their use by
InputKeepingMaxPool2d and InputFreeAvgPool2d on CPU."""

import pytest
import torch
import torch.nn.functional as F

import qdarts_kernels as qk
from qdarts_kernels.nn import InputFreeAvgPool2d, InputKeepingMaxPool2d

if "cpu" not in qk.available_backends():
    pytest.skip("qdarts_kernels._C (the C++ CPU kernels) is not built", allow_module_level=True)

ops = torch.ops.qdarts_C

# (N, C, H, W), kernel, stride, padding, dilation: the supernet's pools (3x3, stride 1 and 2, pad 1),
# odd and tiny planes, asymmetric and dilated windows. Plane by plane (fewer than 16 planes, or larger
# planes than the blocks take):
PLANE_GEOMETRIES = [
    ((2, 3, 7, 9), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 3, 8, 8), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 2, 1, 1), (1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 1, 5, 4), (2, 2), (2, 2), (0, 0), (1, 1)),
    ((2, 2, 11, 6), (3, 2), (1, 2), (1, 1), (2, 1)),
    ((1, 4, 9, 13), (3, 3), (1, 1), (1, 1), (2, 2)),
    ((2, 3, 10, 7), (5, 5), (1, 1), (2, 2), (1, 1)),
    ((2, 4, 32, 32), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 3, 15, 13), (3, 3), (2, 2), (1, 1), (1, 1)),  # strided, above kDenseStridedPlanePositions: the phases
    ((1, 16, 33, 32), (3, 3), (2, 2), (1, 1), (1, 1)),  # 16 planes, too large for a block: the phases
    # planes stacked (kStackedPlanePositions): one partial stack, strided; two stacks; seven
    ((3, 5, 4, 5), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 15, 10, 12), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((7, 5, 17, 16), (3, 3), (1, 1), (1, 1), (1, 1)),
]
# By plane blocks (pooling.cpp: by_plane_blocks, 64 planes each): two blocks and a partial one, many
# tiny planes, dilated, the fewest planes (16) with the largest stride-1 plane (144 positions), the
# largest strided one (1023), asymmetric windows
BLOCK_GEOMETRIES = [
    ((29, 5, 4, 5), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((37, 11, 2, 3), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((13, 7, 3, 4), (3, 3), (1, 1), (1, 1), (2, 2)),
    ((4, 4, 12, 12), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 9, 31, 33), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((5, 4, 9, 7), (3, 2), (1, 2), (1, 1), (2, 1)),
    ((6, 3, 9, 10), (5, 5), (3, 2), (2, 2), (1, 1)),
]
GEOMETRIES = PLANE_GEOMETRIES + BLOCK_GEOMETRIES


def _inputs(shape, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: most windows hold their max twice or more
        return torch.randint(-2, 3, shape, generator=gen).float()
    return torch.randn(shape, generator=gen)


def _pytorch(x, g, kernel, stride, padding, dilation):
    y, indices = F.max_pool2d(x, kernel, stride, padding, dilation, return_indices=True)
    dx = torch.ops.aten.max_pool2d_with_indices_backward(g, x, kernel, stride, padding, dilation, False, indices)
    return y, dx


def _same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape,kernel,stride,padding,dilation", GEOMETRIES)
def test_values_and_gradient_equal_pytorch_s_bit_for_bit(shape, kernel, stride, padding, dilation, ties):
    x = _inputs(shape, 0, ties)
    args = (list(kernel), list(stride), list(padding), list(dilation))
    y = ops.max_pool2d_forward(x, *args)
    g = _inputs(y.shape, 1)
    y_ref, dx_ref = _pytorch(x, g, *args)
    assert _same_bits(y, y_ref)
    assert _same_bits(ops.max_pool2d_backward(g, x, *args), dx_ref)


@pytest.mark.parametrize("images", [2, 6])  # 6 planes: plane by plane; 18: a plane block
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_nan_and_infinities_follow_pytorch_s_rules(stride, images):
    x = _inputs((images, 3, 9, 10), 2)
    x[0, 0, 2, 3] = float("nan")
    x[0, 1, 4, 4:6] = float("nan")  # two NaNs in a window: PyTorch takes the later
    x[1, 0] = float("-inf")  # every window -inf: the first in-bounds tap
    x[1, 1, :3, :3] = float("-inf")
    x[1, 2, 5, 5] = float("inf")
    args = ([3, 3], list(stride), [1, 1], [1, 1])
    y = ops.max_pool2d_forward(x, *args)
    g = _inputs(y.shape, 3)
    y_ref, dx_ref = _pytorch(x, g, *args)
    assert _same_bits(y, y_ref) and _same_bits(ops.max_pool2d_backward(g, x, *args), dx_ref)


@pytest.mark.parametrize("images", [2, 6])  # plane by plane; a plane block
@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
def test_windows_without_a_tap_in_bounds_give_minus_inf_and_no_gradient(stride, images):
    """With dilation a window's taps can all fall outside the input (here rows -1 and 2 of a 2-row
    input): PyTorch's forward gives -inf there (its backward writes out of bounds, so it is not the
    reference), ours -inf and no gradient; the other windows' gradients are unaffected."""
    x = _inputs((images, 3, 2, 7), 9)
    args = ([2, 3], list(stride), [1, 1], [3, 1])
    y = ops.max_pool2d_forward(x, *args)
    assert _same_bits(y, F.max_pool2d(x, *args)) and torch.isneginf(y).all()
    assert torch.equal(ops.max_pool2d_backward(torch.randn(y.shape), x, *args), torch.zeros_like(x))
    # rows -1 and 2 of a 3-row input: the windows of output row 0 read input row 2 only
    x = _inputs((images, 3, 3, 7), 10)
    y = ops.max_pool2d_forward(x, *args)
    g = _inputs(y.shape, 11)
    y_ref, dx_ref = _pytorch(x, g, *args)
    assert _same_bits(y, y_ref) and _same_bits(ops.max_pool2d_backward(g, x, *args), dx_ref)


def test_empty_planes_are_refused_not_read():
    """An input without rows or columns (only the batch may be empty, as in PyTorch)."""
    for shape in [(1, 1, 0, 4), (1, 1, 4, 0), (1, 0, 4, 4)]:
        x = torch.randn(shape)
        for call in (lambda: ops.max_pool2d_forward(x, [2, 2], [2, 2], [1, 1], [1, 1]),
                     lambda: ops.max_pool2d_backward(torch.randn(1, 1, 1, 3), x, [2, 2], [2, 2], [1, 1], [1, 1]),
                     lambda: ops.avg_pool2d_forward(x, [2, 2], [2, 2], [1, 1], False),
                     lambda: ops.avg_pool2d_backward(torch.randn(1, 1, 1, 3), list(shape), [2, 2], [2, 2], [1, 1],
                                                     False)):
            with pytest.raises(RuntimeError, match="must have non-zero channels, height and width"):
                call()
        with pytest.raises(RuntimeError):
            InputKeepingMaxPool2d(2, 2, 1)(x.requires_grad_())
    empty_batch = torch.randn(0, 2, 5, 5)
    assert ops.max_pool2d_forward(empty_batch, [3, 3], [1, 1], [1, 1], [1, 1]).shape == (0, 2, 5, 5)


def test_max_pool_bad_input_is_refused_with_the_argument_named():
    x = torch.randn(2, 3, 8, 8)
    k, one, zero = [3, 3], [1, 1], [0, 0]
    cases = [
        (lambda: ops.max_pool2d_forward(x.double(), k, one, one, one), "x must be a float32"),
        (lambda: ops.max_pool2d_forward(x[0], k, one, one, one), "x must be 4-D"),
        (lambda: ops.max_pool2d_forward(x, [0, 3], one, one, one), "kernel_size must be >= 1"),
        (lambda: ops.max_pool2d_forward(x, k, [1], one, one), "stride must have 2 values"),
        (lambda: ops.max_pool2d_forward(x, k, one, [2, 2], one), "padding must be at most half"),
        (lambda: ops.max_pool2d_forward(x, [9, 9], one, zero, one), "larger than"),
        (lambda: ops.max_pool2d_backward(torch.randn(2, 3, 7, 8), x, k, one, one, one), "grad must have"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("stride", [1, 2])
def test_input_keeping_max_pool_takes_the_kernels_and_equals_nn_max_pool(monkeypatch, stride):
    calls = []
    for name in ("max_pool2d_forward", "max_pool2d_backward"):
        real = getattr(torch.ops.qdarts_C, name)
        monkeypatch.setattr(torch.ops.qdarts_C, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    x = _inputs((4, 5, 12, 11), 4, ties=True).requires_grad_()
    g = _inputs(F.max_pool2d(x, 3, stride, 1).shape, 5)
    ours = InputKeepingMaxPool2d(3, stride, 1)(x)
    (dx,) = torch.autograd.grad(ours, x, g)
    ref = torch.nn.MaxPool2d(3, stride, 1)(x)
    (dx_ref,) = torch.autograd.grad(ref, x, g)
    assert calls == ["max_pool2d_forward", "max_pool2d_backward"]
    assert _same_bits(ours.detach(), ref.detach()) and _same_bits(dx, dx_ref)
    with torch.no_grad():  # nothing to differentiate: the C++ forward alone
        assert _same_bits(InputKeepingMaxPool2d(3, stride, 1)(x), ref.detach())
    assert calls[2:] == ["max_pool2d_forward"]


# (N, C, H, W), kernel, stride, padding (average pools have no dilation)
AVG_GEOMETRIES = [g[:4] for g in GEOMETRIES if g[4] == (1, 1)] + [((3, 2, 9, 9), (2, 2), (2, 2), (1, 0))]


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape,kernel,stride,padding", AVG_GEOMETRIES)
def test_avg_pool_values_and_gradient_equal_pytorch_s_bit_for_bit(shape, kernel, stride, padding, ties,
                                                                  count_include_pad):
    x = _inputs(shape, 6, ties) * 3
    args = (list(kernel), list(stride), list(padding), count_include_pad)
    y = ops.avg_pool2d_forward(x, *args)
    g = _inputs(y.shape, 7)
    xr = x.clone().requires_grad_()
    y_ref = F.avg_pool2d(xr, kernel, stride, padding, count_include_pad=count_include_pad)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, g)
    assert _same_bits(y, y_ref.detach())
    assert _same_bits(ops.avg_pool2d_backward(g, list(shape), *args), dx_ref)


def test_avg_pool_bad_input_is_refused_with_the_argument_named():
    x = torch.randn(2, 3, 8, 8)
    k, one = [3, 3], [1, 1]
    cases = [
        (lambda: ops.avg_pool2d_forward(x.half(), k, one, one, False), "x must be a float32"),
        (lambda: ops.avg_pool2d_forward(x, k, one, [2, 2], False), "padding must be at most half"),
        (lambda: ops.avg_pool2d_backward(torch.randn(2, 3, 8, 8), [2, 3, 8], k, one, one, False), "input_size must be 4-D"),
        (lambda: ops.avg_pool2d_backward(torch.randn(2, 3, 7, 8), [2, 3, 8, 8], k, one, one, False), "grad must have"),
        (lambda: ops.avg_pool2d_backward(torch.randn(2, 3, 8, 8).double(), [2, 3, 8, 8], k, one, one, False),
         "grad must be a float32"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("stride", [1, 2])
def test_input_free_avg_pool_takes_the_kernels_keeps_nothing_and_equals_nn_avg_pool(monkeypatch, stride):
    calls = []
    for name in ("avg_pool2d_forward", "avg_pool2d_backward"):
        real = getattr(torch.ops.qdarts_C, name)
        monkeypatch.setattr(torch.ops.qdarts_C, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    x = _inputs((4, 5, 12, 11), 8).requires_grad_()
    g = _inputs(F.avg_pool2d(x, 3, stride, 1).shape, 9)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        ours = InputFreeAvgPool2d(3, stride, 1, count_include_pad=False)(x)
    (dx,) = torch.autograd.grad(ours, x, g)
    ref = torch.nn.AvgPool2d(3, stride, 1, count_include_pad=False)(x)
    (dx_ref,) = torch.autograd.grad(ref, x, g)
    assert calls == ["avg_pool2d_forward", "avg_pool2d_backward"] and kept == []
    assert _same_bits(ours.detach(), ref.detach()) and _same_bits(dx, dx_ref)
    with qk.eager_reference():  # the plain-PyTorch baseline stays PyTorch's
        InputFreeAvgPool2d(3, stride, 1)(x)
    assert len(calls) == 2


def test_input_free_avg_pool_with_a_divisor_override_is_nn_avg_pool_s():
    """divisor_override, which the C++ kernels do not take: PyTorch's kernels, its values and gradients."""
    x = _inputs((2, 3, 6, 5), 16).requires_grad_()
    results = []
    for m in (InputFreeAvgPool2d(3, 1, 1, divisor_override=2), torch.nn.AvgPool2d(3, 1, 1, divisor_override=2)):
        y = m(x)
        (dx,) = torch.autograd.grad(y, x, _inputs(y.shape, 17))
        results.append((y.detach(), dx))
    assert _same_bits(results[0][0], results[1][0]) and _same_bits(results[0][1], results[1][1])


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_second_derivative_is_pytorch_s(pool):
    """Under create_graph=True the backward is PyTorch's differentiable one: the C++ backward has no
    derivative of its own, and autograd would take it for zero."""
    ours = InputKeepingMaxPool2d(3, 1, 1) if pool == "max" else InputFreeAvgPool2d(3, 1, 1)
    plain = torch.nn.MaxPool2d(3, 1, 1) if pool == "max" else torch.nn.AvgPool2d(3, 1, 1)
    x0 = _inputs((2, 3, 6, 7), 13)
    second = []
    for m in (ours, plain):
        x = x0.clone().requires_grad_()
        (dx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.square().sum(), x)
        second.append((dx.detach(), ddx))
    assert second[1][1].abs().sum() > 0
    assert _same_bits(second[0][0], second[1][0]) and _same_bits(second[0][1], second[1][1])


@pytest.mark.parametrize("size", [(8, 8), (7, 8), (9, 9)])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_ceil_mode_takes_the_kernels_where_it_adds_no_window(monkeypatch, pool, size):
    """ceil_mode=True with a 2x2 stride-2 pool (the PC-DARTS bypass of a reduction cell) gives floor
    mode's windows on an even plane: the C++ kernels, PyTorch's bits; an odd size adds a window:
    PyTorch's own kernels."""
    calls = []
    for name in (f"{pool}_pool2d_forward", f"{pool}_pool2d_backward"):
        real = getattr(torch.ops.qdarts_C, name)
        monkeypatch.setattr(torch.ops.qdarts_C, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    ours = (InputKeepingMaxPool2d if pool == "max" else InputFreeAvgPool2d)(2, 2, ceil_mode=True)
    plain = (torch.nn.MaxPool2d if pool == "max" else torch.nn.AvgPool2d)(2, 2, ceil_mode=True)
    x = _inputs((3, 4, *size), 14).requires_grad_()
    results = []
    for m in (ours, plain):
        y = m(x)
        (dx,) = torch.autograd.grad(y, x, _inputs(y.shape, 15))
        results.append((y.detach(), dx))
    assert _same_bits(results[0][0], results[1][0]) and _same_bits(results[0][1], results[1][1])
    assert len(calls) == (2 if size == (8, 8) else 0)


def test_ceil_adds_no_window_follows_pytorch_s_output_size_rule():
    """_ceil_adds_no_window(size, ...) is true exactly where ceil_mode=True gives floor mode's output size,
    by PyTorch's rule: a last window the ceiling adds is dropped when it starts at or past the end of the
    input and its left padding (n=5, k=3, s=3, p=1: it starts on the right padding; the kernels apply)."""
    from qdarts_kernels.nn.pooling import _ceil_adds_no_window

    checked = 0
    for n in range(1, 10):
        for k in range(1, 5):
            for s in range(1, 5):
                for p in range(k // 2 + 1):
                    for d in (1, 2):
                        x = torch.zeros(1, 1, n)
                        try:
                            ceil = F.max_pool1d(x, k, s, p, d, ceil_mode=True).shape[-1]
                            floor = F.max_pool1d(x, k, s, p, d).shape[-1]
                        except RuntimeError:  # no output (a window larger than the padded input)
                            continue
                        assert _ceil_adds_no_window((n,), (k,), (s,), (p,), (d,)) == (ceil == floor), (n, k, s, p, d)
                        checked += 1
    assert checked > 300
    assert _ceil_adds_no_window((5,), (3,), (3,), (1,), (1,))
