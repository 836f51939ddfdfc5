"""Every Triton kernel the public ops and modules launch compiles for the H100 (sm_90), without a GPU.

The interpreter (how the Triton tests run on CPU) executes a kernel's Python body and so accepts
code that the compiler refuses: a global that is not ``tl.constexpr``, an op missing for a dtype, a
shape that does not lower. Here the ops run under the interpreter with every launch recorded, then
each distinct specialisation (kernel, argument types, constexpr values, launch options) is compiled
by Triton's own compiler for ``GPUTarget("cuda", 90, 32)`` down to a cubin (Triton ships ptxas), with
the GPU branches of the kernels (``_INTERPRETED`` false), as on the GPU machine.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import qdarts_kernels as qk

triton = pytest.importorskip("triton")  # the [test] extra installs it; without it the file skips
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ != "__main__":
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("compiles kernels recorded under the Triton interpreter (CPU runs); the GPU runs the compiled "
                    "ones", allow_module_level=True)
    if "triton" not in qk.available_backends():
        pytest.skip("the triton backend is not available", allow_module_level=True)
    from triton.runtime.interpreter import InterpretedFunction

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                  torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")


def _argument_type(value):
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, tuple):  # a tuple argument: the tuple of its elements' types
        return tuple(_argument_type(v) for v in value)
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _specialisation(fn, args, kwargs):
    """(signature, constexprs, options) of one launch, as the JIT would specialise it (without the
    divisibility hints, which change the code generated but not what compiles)."""
    options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for param in triton.runtime.jit.JITFunction(fn).params:
        value = bound.arguments[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        else:
            signature[param.name] = _argument_type(value)
    return signature, constexprs, options


@pytest.fixture
def recorded_launches(monkeypatch):
    launches = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        signature, constexprs, options = _specialisation(self.fn, args, dict(kwargs))
        key = (self.fn, tuple(signature.items()), tuple(sorted(constexprs.items(), key=lambda kv: kv[0])),
               tuple(sorted(options.items())))
        launches.setdefault(key, (self.fn, signature, constexprs, options))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return launches


def _exercise_every_kernel():
    """Forward and backward of each public op on the triton backend: every grid, per tensor and per
    channel, K = 1..4, every dtype, each gradient alone and all together."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x0 = torch.randn(3, 5, 7, generator=gen).to(dtype)
        for grid in ("signed", "unsigned", "midrise", "relu"):
            for k, bits in enumerate(((4,), (2, 8), (2, 4, 8), (2, 3, 4, 8)), start=1):
                for axis in (None, 1):
                    channels = 1 if axis is None else x0.shape[axis]
                    for needs in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
                        x = x0.clone().requires_grad_(needs[0])
                        probs = torch.softmax(torch.randn(k, generator=gen), 0).requires_grad_(needs[1])
                        scales = (torch.rand(k, channels, generator=gen) * 0.2 + 0.05).squeeze(-1)
                        scales.requires_grad_(needs[2])
                        y = qk.mixed_fake_quant(x, probs, scales, bits, grid=grid, axis=axis, backend="triton")
                        y.float().sum().backward()
                        xs = [x0.clone().requires_grad_(needs[0]), x0[:2].clone().requires_grad_(needs[0])]
                        ys = qk.mixed_fake_quant_grouped(xs, [probs, probs], [scales, scales], bits, grid=grid, axis=axis,
                                                         backend="triton")
                        sum(y.float().sum() for y in ys).backward()
        for k in (1, 2, 5, 8, 35):  # 35: the supernet's largest node sum
            outputs = torch.randn(k, 4, 9, generator=gen).to(dtype).requires_grad_()
            weights = torch.softmax(torch.randn(k, generator=gen), 0).requires_grad_()
            qk.mixed_op_sum(outputs, weights, backend="triton").float().sum().backward()
        _exercise_batch_norm(dtype, gen)
        _exercise_depthwise_conv(dtype, gen)


def _exercise_batch_norm(dtype, gen):
    """The batch-norm kernels, with and without running statistics, one and several tiles per
    reduction program (the latter from a smaller program budget)."""
    from qdarts_kernels.triton import batch_norm

    budget = batch_norm._REDUCE_PROGRAMS
    try:
        for batch_norm._REDUCE_PROGRAMS in (budget, 2):
            batch_norm.plan.cache_clear()
            x = torch.randn(3, 2, 5, 7, generator=gen).to(dtype)
            for running in ((torch.zeros(2), torch.ones(2)), (None, None)):
                y, invstd = batch_norm.batch_norm_train_forward(x, *running, 0.1, 1e-5)
                batch_norm.batch_norm_train_backward(torch.ones_like(y), y, invstd)
    finally:
        batch_norm._REDUCE_PROGRAMS = budget
        batch_norm.plan.cache_clear()


def _exercise_depthwise_conv(dtype, gen):
    """The depthwise weight-gradient kernel on DARTS' separable and dilated convs (3x3 and 5x5,
    stride 1 and 2)."""
    from qdarts_kernels.triton import depthwise_conv

    x = torch.randn(2, 3, 9, 9, generator=gen).to(dtype)
    for k, stride, padding, dilation in ((3, 1, 1, 1), (5, 2, 2, 1), (3, 1, 2, 2), (5, 2, 4, 2)):
        ho = (9 + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        grad = torch.randn(2, 3, ho, ho, generator=gen).to(dtype)
        depthwise_conv.depthwise_conv2d_weight_grad(grad, x, (k, k), (stride, stride), (padding, padding),
                                                    (dilation, dilation))


def _to_json(value):
    if isinstance(value, tl.dtype):
        return {"dtype": str(value)}
    if isinstance(value, tuple):
        return {"tuple": [_to_json(v) for v in value]}
    return value


def _from_json(value):
    if isinstance(value, dict):
        return tl.dtype(value["dtype"]) if "dtype" in value else tuple(_from_json(v) for v in value["tuple"])
    return value


def compile_for_sm90(specialisations):
    """Compile each ``{"module", "kernel", "signature", "constexprs", "options"}`` for sm_90; the
    failures as strings. Run in a process where no kernel was interpreted: the interpreter patches
    ``triton.language`` while it runs (and does not always undo it), and it must import the kernels
    as the GPU machine does, as JITFunctions with their GPU branches."""
    import importlib

    failures = []
    for spec in specialisations:
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        signature = {k: _from_json(v) for k, v in spec["signature"].items()}
        constexprs = {k: _from_json(v) for k, v in spec["constexprs"].items()}
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32), options=spec["options"])
        except Exception as e:  # every failing specialisation listed, not only the first
            failures.append(f"{spec['kernel']} {constexprs}: {type(e).__name__}: {e}"[:1500])
    return failures


def test_every_recorded_kernel_compiles_for_sm90(recorded_launches):
    _exercise_every_kernel()
    specs = [{"module": fn.__module__, "kernel": fn.__name__, "signature": {k: _to_json(v) for k, v in sig.items()},
              "constexprs": {k: _to_json(v) for k, v in ce.items()}, "options": opts}
             for fn, sig, ce, opts in recorded_launches.values()]
    # the forward, backward and reduction kernels of all ops, the batch norm's and the depthwise
    # weight gradient's were launched
    assert len({s["kernel"] for s in specs}) >= 11, specs
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(specs), capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout)
    assert not failures, f"{len(failures)} of {len(specs)} specialisations fail:\n" + "\n".join(failures)


if __name__ == "__main__":  # the compiling process of the test above
    print(json.dumps(compile_for_sm90(json.loads(sys.stdin.read()))))
