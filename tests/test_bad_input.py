"""Bad input to the public ops and to the ops under them: a clear error naming the argument, never a
crash and never a silent wrong result. Complements the bad-input cases of tests/test_ops.py.

Anything that could take the process down (the compiled kernels, Triton reading out of bounds) runs
in a child process; a case whose child dies of a signal fails with the signal's name.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import qdarts_kernels as qk
from conftest import backend_cases, require_backend
from qdarts_kernels import reference as ref

X = torch.randn(4, 3)
P2 = torch.tensor([0.5, 0.5])
S2 = torch.tensor([0.1, 0.2])
S1 = torch.tensor([0.1])
NOT_TENSORS = {"None": None, "list": [0.5, 0.5], "numpy": np.array([0.5, 0.5], dtype=np.float32), "float": 0.5}


def _mfq(**kwargs):
    args = dict(x=X, probs=P2, scales=S2, bits=(2, 4), grid="signed", axis=None, backend=None)
    args.update(kwargs)
    return qk.mixed_fake_quant(args.pop("x"), args.pop("probs"), args.pop("scales"), args.pop("bits"), **args)


def _fq(**kwargs):
    args = dict(x=X, scale=S1, bits=4, grid="signed", axis=None, backend=None)
    args.update(kwargs)
    return qk.fake_quant(args.pop("x"), args.pop("scale"), args.pop("bits"), **args)


def _mos(**kwargs):
    args = dict(outputs=[X, X], weights=P2, backend=None)
    args.update(kwargs)
    return qk.mixed_op_sum(args.pop("outputs"), args.pop("weights"), **args)


OPS = {"mixed_fake_quant": _mfq, "fake_quant": _fq, "mixed_op_sum": _mos}


def _describe(v):
    """An argument in a test id: arrays by type and device, never by their (random) values, so that
    every process collecting the tests (pytest-xdist) gets the same ids."""
    if isinstance(v, torch.Tensor):
        return "Tensor" if v.device.type == "cpu" else f"Tensor({v.device.type})"
    if isinstance(v, np.ndarray):
        return type(v).__name__
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_describe(e) for e in v) + "]"
    return repr(v)


def _case_id(value):
    """Test ids: the op's name and the arguments that differ from the valid call, not the message."""
    if isinstance(value, dict):
        return ",".join(f"{k}={_describe(v)}" for k, v in value.items())
    return value if value in OPS else "-"


# --------------------------------------------------------------------------------------------------
# wrong types for every argument
# --------------------------------------------------------------------------------------------------

#: (op, argument, message naming the argument) for arguments that must be tensors
TENSOR_ARGS = [
    ("mixed_fake_quant", "x", "x must be a torch.Tensor"),
    ("mixed_fake_quant", "probs", "probs must be a torch.Tensor"),
    ("mixed_fake_quant", "scales", "scales must be a torch.Tensor"),
    ("fake_quant", "x", "x must be a torch.Tensor"),
    ("fake_quant", "scale", "scale must be a torch.Tensor"),
    ("mixed_op_sum", "weights", "weights must be a torch.Tensor"),
    ("mixed_op_sum", "outputs", "outputs must be a list of tensors or one stacked tensor"),
]


@pytest.mark.parametrize("op,arg,match", TENSOR_ARGS, ids=[f"{op}-{arg}" for op, arg, _ in TENSOR_ARGS])
@pytest.mark.parametrize("value", list(NOT_TENSORS), ids=str)
def test_tensor_argument_of_wrong_type(op, arg, match, value):
    if arg == "outputs" and value == "list":
        match = r"outputs\[0\] must be a torch.Tensor"  # a list of floats: its first element is named
    with pytest.raises(TypeError, match=match):
        OPS[op](**{arg: NOT_TENSORS[value]})


@pytest.mark.parametrize("value", [None, [np.float32(1.0)], np.ones(2), 1.0], ids=["None", "list", "numpy", "float"])
def test_output_of_wrong_type_in_list(value):
    with pytest.raises(TypeError, match=r"outputs\[1\] must be a torch.Tensor"):
        _mos(outputs=[X, value])


#: Tensors the kernels cannot index by strides, by how they are made from a dense one
NOT_DENSE = {
    "sparse_coo": lambda t: t.to_sparse(),
    "sparse_csr": lambda t: t.reshape(t.shape[0], -1).to_sparse_csr(),
    "nested": lambda t: torch.nested.nested_tensor(list(t.reshape(t.shape[0], -1))),
}


@pytest.mark.filterwarnings("ignore:.*(Sparse CSR tensor support|nested tensors).*:UserWarning")
@pytest.mark.parametrize("layout", list(NOT_DENSE))
@pytest.mark.parametrize("op,arg", [("mixed_fake_quant", "x"), ("mixed_fake_quant", "probs"),
                                    ("mixed_fake_quant", "scales"), ("fake_quant", "x"), ("fake_quant", "scale"),
                                    ("mixed_op_sum", "weights"), ("mixed_op_sum", "outputs"),
                                    ("mixed_op_sum", "outputs[1]"), ("grouped", "probs")])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_sparse_or_nested_tensor_is_refused_by_name(op, arg, layout, backend):
    """Not an error from deep in a kernel or in the reference's arithmetic (`unsupported memory format
    option`, `Cannot access data pointer`, a dispatcher's NotImplementedError): one naming the argument."""
    require_backend(backend, "cpu")
    make = NOT_DENSE[layout]
    if op == "grouped":  # the grouped op's probabilities as one [N, K] tensor
        call = functools.partial(qk.mixed_fake_quant_grouped, [X, X], make(torch.stack([P2, P2])), [S2, S2], (2, 4))
    elif arg == "outputs":  # the outputs as one stacked tensor
        call = functools.partial(_mos, outputs=make(torch.stack([X, X])))
    elif arg == "outputs[1]":
        call = functools.partial(_mos, outputs=[X, make(X)])
    else:
        call = functools.partial(OPS[op], **{arg: make({"x": X, "probs": P2, "scales": S2, "scale": S1,
                                                         "weights": P2}[arg])})
    name = re.escape(arg)
    with pytest.raises(TypeError, match=rf"^{name} must be a dense tensor \(torch.strided layout\), got "):
        call(backend=backend)


@pytest.mark.parametrize(
    "op,kwargs,match",
    [
        # bits: None, list of floats, numpy floats, python float, bool, str, negative, too large
        ("mixed_fake_quant", dict(bits=None), "bits must be an int or a sequence of ints"),
        ("mixed_fake_quant", dict(bits=[2.0, 4.0]), "bits must hold ints"),
        ("mixed_fake_quant", dict(bits=np.array([2.5, 4.0])), "bits must hold ints"),
        ("mixed_fake_quant", dict(bits=4.0, probs=torch.ones(1), scales=S1), "bits must be an int or a sequence"),
        ("mixed_fake_quant", dict(bits=True, probs=torch.ones(1), scales=S1), "bits must be an int or a sequence"),
        ("mixed_fake_quant", dict(bits=(True, 4)), "bits must hold ints"),
        ("mixed_fake_quant", dict(bits="24"), "bits must hold ints"),
        ("mixed_fake_quant", dict(bits=(-2, 4)), r"bits must be in \[1, 16\]"),
        ("mixed_fake_quant", dict(bits=(2, 2**40)), r"bits must be in \[1, 16\]"),
        ("mixed_fake_quant", dict(bits=torch.tensor([2, 4])), "bits must hold ints"),
        ("fake_quant", dict(bits=None), "bits must be one int"),
        ("fake_quant", dict(bits=[4]), "bits must be one int"),
        ("fake_quant", dict(bits=4.0), "bits must be one int"),
        ("fake_quant", dict(bits=True), "bits must be one int"),
        ("fake_quant", dict(bits="4"), "bits must be one int"),
        ("fake_quant", dict(bits=-4), r"bits must be in \[1, 16\]"),
        ("fake_quant", dict(bits=0), r"bits must be in \[1, 16\]"),
        # grid: None, list, numpy, float, the integer code of a grid, wrong case
        ("mixed_fake_quant", dict(grid=None), "grid must be one of"),
        ("mixed_fake_quant", dict(grid=["signed"]), "grid must be one of"),
        ("mixed_fake_quant", dict(grid=np.array(["signed"])), "grid must be one of"),
        ("mixed_fake_quant", dict(grid=0.0), "grid must be one of"),
        ("fake_quant", dict(grid=1), "grid must be one of"),
        ("fake_quant", dict(grid="Signed"), "grid must be one of"),
        # axis: list, numpy, float, bool, out of range either side
        ("mixed_fake_quant", dict(axis=[1], scales=torch.ones(2, 3)), "axis must be an int or None"),
        ("mixed_fake_quant", dict(axis=np.array([1]), scales=torch.ones(2, 3)), "axis must be an int or None"),
        ("mixed_fake_quant", dict(axis=1.0, scales=torch.ones(2, 3)), "axis must be an int or None"),
        ("mixed_fake_quant", dict(axis=True, scales=torch.ones(2, 3)), "axis must be an int or None"),
        ("mixed_fake_quant", dict(axis=-3, scales=torch.ones(2, 4)), "axis -3 is out of range"),
        ("mixed_fake_quant", dict(axis=10**18, scales=torch.ones(2, 4)), "is out of range"),
        ("fake_quant", dict(axis=1.0, scale=torch.ones(3)), "axis must be an int or None"),
        ("fake_quant", dict(axis=2, scale=torch.ones(3)), "axis 2 is out of range"),
        # backend: None is automatic; anything else must name a backend
        ("mixed_fake_quant", dict(backend=["cpu"]), "backend must be one of"),
        ("fake_quant", dict(backend=0), "backend must be one of"),
        ("mixed_op_sum", dict(backend="CPU"), "backend must be one of"),
        ("mixed_op_sum", dict(backend=1.0), "backend must be one of"),
    ],
    ids=_case_id,
)
def test_non_tensor_argument_of_wrong_type_or_value(op, kwargs, match):
    with pytest.raises(ValueError, match=match):
        OPS[op](**kwargs)


def test_numpy_integer_bits_are_ints():
    """Bit-widths from numpy (an np.int64, an integer array) are taken as the ints they are, by every op."""
    assert torch.equal(_fq(bits=np.int64(4)), _fq(bits=4))
    assert torch.equal(_mfq(bits=np.array([2, 4])), _mfq(bits=(2, 4)))
    one = dict(probs=torch.ones(1), scales=S1)
    assert torch.equal(_mfq(bits=np.int32(4), **one), _mfq(bits=4, **one))


# --------------------------------------------------------------------------------------------------
# shapes, dims and devices
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op,kwargs,match",
    [
        # a 0-dim x has no channel axis
        ("mixed_fake_quant", dict(x=torch.tensor(1.0), axis=0, scales=torch.ones(2, 1)), "x with 0 dim"),
        ("mixed_fake_quant", dict(x=torch.tensor(1.0), axis=-1, scales=torch.ones(2, 1)), "x with 0 dim"),
        ("fake_quant", dict(x=torch.tensor(1.0), axis=0, scale=torch.ones(1)), "x with 0 dim"),
        # scales with the wrong number of dims
        ("mixed_fake_quant", dict(scales=torch.ones(2, 1)), r"scales must have shape \[2\] for per-tensor"),
        ("mixed_fake_quant", dict(scales=torch.tensor(0.1), probs=torch.ones(1), bits=4),
         r"scales must have shape \[1\]"),
        ("mixed_fake_quant", dict(scales=torch.ones(2, 3, 1), axis=1), r"scales must have shape \[2, 3\]"),
        ("mixed_fake_quant", dict(scales=torch.ones(3), axis=1), r"scales must have shape \[2, 3\]"),
        ("mixed_fake_quant", dict(scales=torch.ones(3, 2), axis=1), r"scales must have shape \[2, 3\]"),
        ("fake_quant", dict(scale=torch.ones(4), axis=1), r"scales must have shape \[1, 3\]"),
        # probs with the wrong number of dims
        ("mixed_fake_quant", dict(probs=torch.ones(1, 2)), r"probs must have shape \[2\]"),
        ("mixed_fake_quant", dict(probs=torch.tensor(1.0), bits=4, scales=S1), r"probs must have shape \[1\]"),
        # one int for bits is one bit-width: the message shows what bits was read as
        ("mixed_fake_quant", dict(probs=torch.ones(3), bits=8, scales=torch.ones(3)),
         r"probs must have shape \[1\] \(one probability per bit-width of bits=\[8\]\), got \[3\]"),
        # weights with the wrong number of dims; outputs of one tensor that is not stacked
        ("mixed_op_sum", dict(weights=torch.ones(1, 2)), r"weights must have shape \[2\]"),
        ("mixed_op_sum", dict(outputs=[X], weights=torch.tensor(1.0)), r"weights must have shape \[1\]"),
        ("mixed_op_sum", dict(outputs=torch.tensor(1.0), weights=torch.ones(1)), "stacked along dim 0"),
        ("mixed_op_sum", dict(outputs=torch.ones(0, 3), weights=torch.ones(0)), "at least one"),
        # non-float parameters and data
        ("mixed_fake_quant", dict(scales=torch.ones(2, dtype=torch.int64)), "scales must have a floating dtype"),
        ("mixed_fake_quant", dict(x=X.to(torch.complex64)), "x must have a floating dtype"),
        ("fake_quant", dict(scale=torch.ones(1, dtype=torch.int32)), "must have a floating dtype"),
        ("mixed_op_sum", dict(outputs=[X.bool(), X.bool()]), r"outputs\[0\] must have a floating dtype"),
    ],
    ids=_case_id,
)
def test_wrong_shape_or_dtype(op, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        OPS[op](**kwargs)


@pytest.mark.parametrize("scale_shape", [(3, 2), (6, 1)], ids=str)
def test_fake_quant_per_channel_scale_must_be_one_dim(scale_shape):
    with pytest.raises(ValueError, match="scale"):
        qk.fake_quant(torch.randn(4, 6), torch.full(scale_shape, 0.1), 4, axis=1)


META = torch.device("meta")
ALL_ON_META = {"mixed_fake_quant": dict(x=X.to(META), probs=P2.to(META), scales=S2.to(META)),
               "fake_quant": dict(x=X.to(META), scale=S1.to(META)),
               "mixed_op_sum": dict(outputs=[X.to(META)] * 2, weights=P2.to(META))}


@pytest.mark.parametrize(
    "op,kwargs,match",
    [
        ("mixed_fake_quant", dict(scales=S2.to(META)), "scales is on meta but x is on cpu"),
        ("mixed_fake_quant", dict(x=X.to(META)), "probs is on cpu but x is on meta"),
        ("mixed_fake_quant", dict(x=X.to(META), probs=P2.to(META)), "scales is on cpu but x is on meta"),
        ("fake_quant", dict(scale=S1.to(META)), "scales is on meta but x is on cpu"),
        ("fake_quant", dict(x=X.to(META)), "scales is on cpu but x is on meta"),
        ("mixed_op_sum", dict(weights=P2.to(META)), "weights is on meta but outputs are on cpu"),
        ("mixed_op_sum", dict(outputs=[X.to(META), X.to(META)]), "weights is on cpu but outputs are on meta"),
        ("mixed_op_sum", dict(outputs=[X.to(META), X]), r"outputs\[1\] is on cpu but outputs\[0\] is on meta"),
    ],
    ids=_case_id,
)
def test_arguments_on_different_devices(op, kwargs, match):
    with pytest.raises(ValueError, match=match):
        OPS[op](**kwargs)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", list(OPS))
def test_kernel_backend_refuses_meta_tensors(op, backend):
    require_backend(backend, "cpu")
    with pytest.raises(ValueError, match=f"backend '{backend}'"):
        OPS[op](backend=backend, **ALL_ON_META[op])


@pytest.mark.parametrize("op", list(OPS))
def test_meta_tensors_trace_with_the_automatic_backend(op):
    """All arguments on meta (shape propagation, as torch.compile does): the right shape, no error."""
    y = OPS[op](**ALL_ON_META[op])
    assert y.device == META and y.shape == X.shape


# --------------------------------------------------------------------------------------------------
# gradients: dtype of the incoming gradient, requires_grad, in-place changes, double backward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.float64, torch.bfloat16], ids=str)
def test_incoming_gradient_of_another_dtype(backend_device, grad_dtype):
    """autograd casts an incoming gradient to the output's dtype: the gradients equal those of the
    cast gradient, in the inputs' dtypes."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(X.shape, generator=gen).to(grad_dtype)
    results = []
    for grad in (g, g.float()):
        x, p, s = (t.to(device).clone().requires_grad_() for t in (X, P2, S2))
        _mfq(x=x, probs=p, scales=s, backend=backend).backward(grad.to(device))
        outs = [o.to(device).clone().requires_grad_() for o in (X, X * 2)]
        w = P2.to(device).clone().requires_grad_()
        _mos(outputs=outs, weights=w, backend=backend).backward(grad.to(device))
        results.append([x.grad, p.grad, s.grad, outs[0].grad, outs[1].grad, w.grad])
    for a, b in zip(*results):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)


def test_no_grad_and_inference_mode_give_plain_tensors(backend_device):
    backend, device = backend_device
    x, p, s = (t.to(device).clone().requires_grad_() for t in (X, P2, S2))
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            y = _mfq(x=x, probs=p, scales=s, backend=backend)
            z = _mos(outputs=[x, x], weights=p, backend=backend)
        assert not y.requires_grad and not z.requires_grad
        assert torch.equal(y.cpu(), ref.mixed_fake_quant(X, P2, S2, (2, 4)))


def test_fake_quant_after_inference_mode_and_export_still_trains(backend_device, monkeypatch):
    """fake_quant's probabilities ([1.0], cached per dtype and device) made first under inference mode,
    or as a fake tensor by torch.export, are not kept: a later training call must not get them."""
    backend, device = backend_device
    monkeypatch.setattr(qk.ops, "_ONES", {})
    x, s = (t.to(device).clone().requires_grad_() for t in (X, S1))

    class Quantize(torch.nn.Module):
        def forward(self, x, s):
            return qk.fake_quant(x, s, 4, backend=backend)

    with torch.inference_mode():
        _fq(x=x, scale=s, backend=backend)
    exported = torch.export.export(Quantize(), (x.detach(), s.detach()))
    y = _fq(x=x, scale=s, backend=backend)
    y.sum().backward()
    assert x.grad is not None and s.grad is not None
    assert torch.equal(y.detach().cpu(), ref.fake_quant(X, S1, 4))
    assert torch.equal(exported.module()(x.detach(), s.detach()), y.detach())


def test_input_changed_in_place_after_forward_is_refused(backend_device):
    """The backward recomputes from the saved inputs: changing them in place must not give silently
    wrong gradients."""
    backend, device = backend_device
    x = X.to(device).clone().requires_grad_()
    p = P2.to(device).clone().requires_grad_()
    for op in ("mixed_fake_quant", "mixed_op_sum"):
        h = x * 1.0
        y = _mfq(x=h, probs=p, scales=S2.to(device), backend=backend) if op == "mixed_fake_quant" else \
            _mos(outputs=[h, h], weights=p, backend=backend)
        h.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def _second_order(op, backend, device):
    """A gradient of a gradient: d/dp sum(dx) for mixed_fake_quant, d/d outputs[0] sum(dweights)
    for mixed_op_sum; ``backend=None`` differentiates the pure reference."""
    if op == "mixed_fake_quant":
        x, p, s = (t.to(device).clone().requires_grad_() for t in (X, P2, S2))
        f = ref.mixed_fake_quant if backend is None else functools.partial(qk.mixed_fake_quant, backend=backend)
        (dx,) = torch.autograd.grad(f(x, p, s, (2, 4)).sum(), x, create_graph=True)
        dx.sum().backward()
        return p.grad
    outs = [t.to(device).clone().requires_grad_() for t in (X, X * 2)]
    w = P2.to(device).clone().requires_grad_()
    f = ref.mixed_op_sum if backend is None else functools.partial(qk.mixed_op_sum, backend=backend)
    (dw,) = torch.autograd.grad(f(outs, w).sum(), w, create_graph=True)
    dw.sum().backward()
    return outs[0].grad


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
@pytest.mark.parametrize("op", ["mixed_fake_quant", "mixed_op_sum"])
def test_second_order_gradient_is_right_or_refused(backend_device, op, request):
    backend, device = backend_device
    expected = _second_order(op, None, "cpu")
    try:
        actual = _second_order(op, backend, device)
    except RuntimeError as e:
        assert re.search("second|twice|no autograd formula", str(e)), f"unclear error: {e}"
        return
    assert actual is not None, "the second-order gradient is silently missing"
    assert torch.equal(actual.cpu(), expected)


# --------------------------------------------------------------------------------------------------
# in child processes: empty tensors, and the ops under the public functions called directly
# --------------------------------------------------------------------------------------------------

# Every case below is a Python call run in a child process; the children of one module run all of
# them, and a case that kills its child is recorded with the signal while the cases after it run in
# a new child. X, P, S, G are valid arguments (x [4, 3] fp32, probs [2], scales [2], a gradient).
_CHILD_SETUP = """
import json, os, sys
import torch
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import qdarts_kernels as qk

X = torch.randn(4, 3); P = torch.tensor([0.5, 0.5]); S = torch.tensor([0.1, 0.2]); G = torch.randn(4, 3)
BITS = [2, 4]
if "cpu" in qk.available_backends():
    FWD, BWD = torch.ops.qdarts_C.mixed_fake_quant_forward, torch.ops.qdarts_C.mixed_fake_quant_backward
    SUM_FWD, SUM_BWD = torch.ops.qdarts_C.mixed_op_sum_forward, torch.ops.qdarts_C.mixed_op_sum_backward
Q_FWD, Q_BWD = torch.ops.qdarts.mixed_fake_quant, torch.ops.qdarts.mixed_fake_quant_backward
Q_SUM, Q_SUM_BWD = torch.ops.qdarts.mixed_op_sum, torch.ops.qdarts.mixed_op_sum_backward
Q_GROUPED = torch.ops.qdarts.mixed_fake_quant_grouped


def leaf(t, device):
    return t.to(device).requires_grad_()


def empty_x(backend, device, x, k, axis):
    bits = (2, 4, 8, 3)[:k]
    scales = torch.full((k,) if axis is None else (k, x.shape[axis]), 0.1)
    probs = torch.full((k,), 1.0 / k)
    xb, pb, sb = leaf(x, device), leaf(probs, device), leaf(scales, device)
    y = qk.mixed_fake_quant(xb, pb, sb, bits, axis=axis, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.backward(torch.ones_like(y))
    assert xb.grad.shape == x.shape
    assert torch.equal(pb.grad.cpu(), torch.zeros(k)) and torch.equal(sb.grad.cpu(), torch.zeros_like(scales))
    if k == 1:
        assert qk.fake_quant(x.to(device), scales[0].to(device), bits[0], axis=axis, backend=backend).shape == x.shape


def empty_outputs(backend, device, shape, dtype, k, stacked):
    outs = [leaf(torch.empty(shape, dtype=dtype), device) for _ in range(k)]
    w = leaf(torch.full((k,), 0.5), device)
    y = qk.mixed_op_sum(torch.stack(outs) if stacked else outs, w, backend=backend)
    assert y.shape == shape and y.dtype == dtype
    y.backward(torch.ones_like(y))
    assert all(o.grad.shape == shape for o in outs) and torch.equal(w.grad.cpu(), torch.zeros(k))


def empty_everywhere(backend, device):
    for dtype in (torch.float32, torch.bfloat16):
        for k in (1, 3):
            for shape, axis in [((0,), None), ((0, 3), None), ((0, 3), 1), ((3, 0), 0), ((3, 0), 1),
                                ((2, 0, 3), 0), ((2, 0, 3), 1), ((2, 0, 3), 2), ((0, 1), -1)]:
                print("  mixed_fake_quant", shape, "axis", axis, "K", k, dtype, flush=True)
                empty_x(backend, device, torch.empty(shape, dtype=dtype), k, axis)
        for k in (1, 4):
            for shape in [(0,), (3, 0), (0, 5, 2)]:
                for stacked in (False, True):
                    print("  mixed_op_sum", shape, "K", k, "stacked" if stacked else "list", dtype, flush=True)
                    empty_outputs(backend, device, shape, dtype, k, stacked)


for name, call in json.loads(sys.argv[1]):
    print(json.dumps({"case": name, "started": True}), flush=True)
    try:
        eval(call)
        result = {"case": name, "error": None}
    except Exception as e:
        result = {"case": name, "error": type(e).__name__, "runtime_error": isinstance(e, RuntimeError),
                  "message": str(e).splitlines()[0] if str(e) else ""}
    print(json.dumps(result), flush=True)
"""


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _run_cases(cases):
    """Run (name, call) cases in child processes. Returns {name: result}; a case that killed its
    child has result {"crashed": <signal>, "output": <what it printed last>}."""
    results, todo = {}, list(cases)
    env = dict(os.environ, QDARTS_BACKEND="")
    while todo:
        res = subprocess.run([sys.executable, "-c", _CHILD_SETUP, json.dumps(todo)], capture_output=True, text=True,
                             env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = res.stdout.splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        results.update((r["case"], r) for r in records if "started" not in r)
        crashed = next((r["case"] for r in records if "started" in r and r["case"] not in results), None)
        if crashed is None:
            if records or res.returncode == 0:
                break
            raise AssertionError(f"the child failed before its first case:\n{res.stderr[-3000:]}")
        died = _signal_name(res.returncode) if res.returncode < 0 else f"exit {res.returncode}: {res.stderr[-800:]}"
        results[crashed] = {"case": crashed, "crashed": died, "output": lines[-1] if lines else ""}
        todo = [(n, c) for n, c in todo if n not in results]
    return results


def _assert_no_error(result):
    assert "crashed" not in result, f"the process died of {result['crashed']} at {result['output']}"
    assert result["error"] is None, f"{result['error']}: {result['message']}"


def _assert_clear_error(result, match):
    assert "crashed" not in result, f"the process died of {result['crashed']}"
    assert result["error"] is not None, "no error was raised"
    assert result["runtime_error"], f"{result['error']} is not a RuntimeError: {result['message']}"
    assert match in result["message"], result["message"]


#: torch.ops.qdarts_C.* (the compiled ops; FWD, BWD, SUM_FWD, SUM_BWD in the child): (case, call, text
#: the error must contain)
COMPILED_CASES = [
    ("bits empty", "FWD(X, P[:0], S[:0], [], 0, -1)", "bits must hold 1..4"),
    ("bits 5 widths", "FWD(X, torch.ones(5), torch.ones(5), [2]*5, 0, -1)", "bits must hold 1..4"),
    ("bits 0", "FWD(X, P, S, [0, 4], 0, -1)", "bits must be in"),
    ("bits 17", "FWD(X, P, S, [2, 17], 0, -1)", "bits must be in"),
    ("bits negative", "FWD(X, P, S, [-1, 4], 0, -1)", "bits must be in"),
    ("grid 4", "FWD(X, P, S, BITS, 4, -1)", "grid must be"),
    ("grid -1", "FWD(X, P, S, BITS, -1, -1)", "grid must be"),
    ("axis 2 of 2 dims", "FWD(X, P, torch.ones(2, 3), BITS, 0, 2)", "axis must be"),
    ("axis -2", "FWD(X, P, torch.ones(2, 4), BITS, 0, -2)", "axis must be"),
    ("axis of 0-dim x", "FWD(X[0, 0], P, torch.ones(2, 1), BITS, 0, 0)", "axis must be"),
    ("x int", "FWD(X.int(), P, S, BITS, 0, -1)", "x must be float32"),
    ("x float64", "FWD(X.double(), P, S, BITS, 0, -1)", "x must be float32"),
    ("probs float64", "FWD(X, P.double(), S, BITS, 0, -1)", "probs must be float32"),
    ("scales float16", "FWD(X, P, S.half(), BITS, 0, -1)", "scales must be float32"),
    ("probs too short", "FWD(X, P[:1], S, BITS, 0, -1)", "probs must have shape"),
    ("probs 2-d", "FWD(X, P[None], S, BITS, 0, -1)", "probs must have shape"),
    ("scales per channel, axis -1", "FWD(X, P, torch.ones(2, 3), BITS, 0, -1)", "scales must have shape"),
    ("scales per tensor, axis 1", "FWD(X, P, S, BITS, 0, 1)", "scales must have shape"),
    ("scales wrong C", "FWD(X, P, torch.ones(2, 4), BITS, 0, 1)", "scales must have shape"),
    ("scale zero", "FWD(X, P, torch.tensor([0.1, 0.0]), BITS, 0, -1)", "finite and >= 2**-126"),
    ("scale negative", "FWD(X, P, torch.tensor([0.1, -1.0]), BITS, 0, -1)", "finite and >= 2**-126"),
    ("scale nan", "FWD(X, P, torch.tensor([float('nan'), 1.0]), BITS, 0, -1)", "finite and >= 2**-126"),
    ("scale inf per channel", "FWD(X, P, torch.tensor([[1.0, float('inf'), 1.0]] * 2), BITS, 0, 1)", "finite and >= 2**-126"),
    ("probs on meta", "FWD(X, P.to('meta'), S, BITS, 0, -1)", "Meta tensors"),
    ("backward grad shape", "BWD(G[:2], X, P, S, BITS, 0, -1, True, True, True)", "grad has shape"),
    ("backward grad dtype", "BWD(G.half(), X, P, S, BITS, 0, -1, True, True, True)", "grad has dtype"),
    ("backward bits 17", "BWD(G, X, P, S, [2, 17], 0, -1, True, True, True)", "bits must be in"),
    ("backward scale zero", "BWD(G, X, P, torch.tensor([0.0, 1.0]), BITS, 0, -1, False, True, False)", "finite and >= 2**-126"),
    ("sum no outputs", "SUM_FWD([], P[:0])", "outputs must hold at least one"),
    ("sum shapes differ", "SUM_FWD([X, X[:2]], P)", "outputs[1] has shape"),
    ("sum dtypes differ", "SUM_FWD([X, X.half()], P)", "outputs[1] has dtype"),
    ("sum outputs int", "SUM_FWD([X.int(), X.int()], P)", "outputs[0] must be float32"),
    ("sum weights float64", "SUM_FWD([X, X], P.double())", "weights must be float32"),
    ("sum weights too long", "SUM_FWD([X, X], torch.ones(3))", "weights must have shape"),
    ("sum weights 2-d", "SUM_FWD([X, X], P[None])", "weights must have shape"),
    ("sum weights on meta", "SUM_FWD([X, X], P.to('meta'))", "Meta tensors"),
    ("sum backward grad shape", "SUM_BWD(G[:2], [X, X], P, True, True)", "grad has shape"),
    ("sum backward grad dtype", "SUM_BWD(G.bfloat16(), [X, X], P, True, True)", "grad has dtype"),
]

#: torch.ops.qdarts.* (the custom ops that torch.compile traces; the backend is an argument)
CUSTOM_OP_CASES = [
    ("forward probs too short", "Q_FWD(X, P[:1], S, BITS, 0, -1, BACKEND)", "probs"),
    ("backward grad shape", "Q_BWD(G[:2], X, P, S, BITS, 0, -1, BACKEND, True, True, True)", "grad"),
    ("backward grad dtype", "Q_BWD(G.half(), X, P, S, BITS, 0, -1, BACKEND, True, True, True)", "grad"),
    ("sum backward grad shape", "Q_SUM_BWD(G[:2], [X, X], P, BACKEND, True, True)", "grad"),
    ("sum backward grad dtype", "Q_SUM_BWD(G.half(), [X, X], P, BACKEND, True, True)", "grad"),
    # what the Triton kernels would otherwise take: garbage values, or reads out of bounds
    ("bits 0", "Q_FWD(X, P, S, [0, 4], 0, -1, BACKEND)", "bits must hold 1..4 bit-widths in [1, 16]"),
    ("bits 40", "Q_FWD(X, P, S, [2, 40], 0, -1, BACKEND)", "bits must hold"),
    ("bits 5 widths", "Q_BWD(G, X, torch.ones(5), torch.ones(5), [2] * 5, 0, -1, BACKEND, True, True, True)",
     "bits must hold"),
    ("bits empty", "Q_FWD(X, P[:0], S[:0], [], 0, -1, BACKEND)", "bits must hold"),
    ("grid 9", "Q_FWD(X, P, S, BITS, 9, -1, BACKEND)", "grid must be a grid code"),
    ("axis -5", "Q_FWD(X, P, S, BITS, 0, -5, BACKEND)", "axis must be -1"),
    ("axis 2 of a 2-d x", "Q_FWD(X, P, torch.ones(2, 3), BITS, 0, 2, BACKEND)", "axis must be -1"),
    ("grouped bits 0", "Q_GROUPED([X], P[None], [S], [0, 4], 0, [-1], BACKEND, False)", "bits must hold"),
    ("grouped grid 7", "Q_GROUPED([X], P[None], [S], BITS, 7, [-1], BACKEND, False)", "grid must be"),
    ("grouped axes mixed", "Q_GROUPED([X, X], torch.stack([P, P]), [S, torch.ones(2, 3)], BITS, 0, [-1, 1], "
     "BACKEND, False)", "axes must be all -1"),
    ("grouped dtypes mixed", "Q_GROUPED([X, X.double()], torch.stack([P, P]), [S, S], BITS, 0, [-1, -1], BACKEND, "
     "False)", "xs[1] is torch.float64"),
    ("sum weights too short", "Q_SUM([X, X], P[:1], BACKEND)", "weights must have shape [2]"),
    ("sum outputs of two sizes", "Q_SUM([X, X[:1]], P, BACKEND)", "outputs[1] has shape"),
    ("sum outputs of two dtypes", "Q_SUM([X, X.half()], P, BACKEND)", "outputs[1] has dtype"),
    ("sum backward weights too short", "Q_SUM_BWD(G, [X, X], P[:1], BACKEND, True, True)", "weights must have"),
    ("x int", "Q_FWD(X.int(), P, S, BITS, 0, -1, BACKEND)", "x must have dtype float32"),
    ("probs int", "Q_FWD(X, P.int(), S, BITS, 0, -1, BACKEND)", "probs must have a floating dtype"),
    # a meta tensor among CPU ones dispatches to the fake kernels, which must refuse it too
    ("probs on meta", "Q_FWD(X, P.to('meta'), S, BITS, 0, -1, BACKEND)", "probs is on meta but x is on cpu"),
    ("backward scales on meta", "Q_BWD(G, X, P, S.to('meta'), BITS, 0, -1, BACKEND, True, True, True)",
     "scales is on meta"),
    ("grouped scales on meta", "Q_GROUPED([X], P[None], [S.to('meta')], BITS, 0, [-1], BACKEND, False)",
     "scales is on meta"),
    ("sum weights on meta", "Q_SUM([X, X], P.to('meta'), BACKEND)", "weights is on meta"),
    ("sum backward grad on meta", "Q_SUM_BWD(G.to('meta'), [X, X], P, BACKEND, True, True)", "grad must match"),
    # the scale values, which compiled code reaches through these ops only (the Triton kernels take any)
    ("scale zero", "Q_FWD(X, P, torch.tensor([0.1, 0.0]), BITS, 0, -1, BACKEND)", "scales must be > 0"),
    ("scale nan per channel", "Q_FWD(X, P, torch.tensor([[1.0, float('nan'), 1.0]] * 2), BITS, 0, 1, BACKEND)",
     "scales must be finite"),
    ("scale float64 beyond float32", "Q_FWD(X, P, torch.tensor([0.1, 1e39], dtype=torch.float64), BITS, 0, -1, "
     "BACKEND)", "scales must be finite"),
    ("grouped scale negative", "Q_GROUPED([X, X], torch.stack([P, P]), [S, -S], BITS, 0, [-1, -1], BACKEND, False)",
     "scales[1] must be > 0"),
]


@pytest.mark.parametrize("position", [0, 40, 64])
@pytest.mark.parametrize("bad, match", [(float("inf"), "finite"), (float("-inf"), "finite"), (float("nan"), "finite"),
                                        (0.0, "> 0"), (-1.0, "> 0")], ids=str)
def test_a_bad_scale_among_many_channels_is_refused(position, bad, match):
    """Over 64 per-channel scales are read by one min/max reduction: a bad value anywhere is refused,
    the largest as well as the smallest (on the reference backend an infinite scale gives NaN)."""
    scales = torch.full((1, 65), 0.1)
    scales[0, position] = bad
    with pytest.raises(ValueError, match=f"scales must be {match}"):
        qk.mixed_fake_quant(torch.randn(3, 65), torch.ones(1), scales, (4,), axis=1, backend="reference")


def _runnable(backend, device):
    return backend in qk.available_backends() and (device == "cpu" or torch.cuda.is_available())


@pytest.fixture(scope="module")
def child_results():
    """Every child-process case of this module, run once."""
    cases = [(f"empty: {b}-{d}", f"empty_everywhere({b!r}, {d!r})") for b, d in backend_cases() if _runnable(b, d)]
    if "cpu" in qk.available_backends():
        cases += [(f"compiled: {name}", call) for name, call, _ in COMPILED_CASES]
    for backend in ("reference", "cpu", "triton"):
        if _runnable(backend, "cpu"):
            cases += [(f"custom op {backend}: {name}", call.replace("BACKEND", repr(backend)))
                      for name, call, _ in CUSTOM_OP_CASES]
    return _run_cases(cases)


@pytest.mark.parametrize("backend,device", backend_cases(), ids=[f"{b}-{d}" for b, d in backend_cases()])
def test_empty_tensors_everywhere_do_not_crash(child_results, backend, device):
    """Empty x (every place for the zero dim, per tensor and per channel, C = 0 too), K = 1 and
    K > 1, empty mixed_op_sum outputs: right shapes, zero parameter gradients, no crash."""
    require_backend(backend, device)
    _assert_no_error(child_results[f"empty: {backend}-{device}"])


@pytest.mark.parametrize("case,call,match", COMPILED_CASES, ids=[c[0] for c in COMPILED_CASES])
def test_compiled_op_bad_argument(child_results, case, call, match):
    require_backend("cpu", "cpu")
    _assert_clear_error(child_results[f"compiled: {case}"], match)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case,call,match", CUSTOM_OP_CASES, ids=[c[0] for c in CUSTOM_OP_CASES])
def test_custom_op_bad_argument(child_results, backend, case, call, match, request):
    require_backend(backend, "cpu")
    _assert_clear_error(child_results[f"custom op {backend}: {case}"], match)
