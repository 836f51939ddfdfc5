"""A tiny run of every op on the ``cuda`` backend (the grouped quantizer too) and of the Triton
batch norm and depthwise-conv weight gradient, for ``compute-sanitizer --tool memcheck``.

Odd sizes (not multiples of any vector width or block), per-tensor and per-channel scales on
several axes, K = 1..4, fp32 and bf16, forward and every gradient, so that an out-of-bounds access
at a tail or a wrong channel index shows up under the sanitizer. Results are compared with the
reference so that the run also fails on wrong values. Exit status 0 when all is well.
"""

from __future__ import annotations

import sys

import torch

import qdarts_kernels as qk
from qdarts_kernels.nn import OutputKeepingBatchNorm2d
from qdarts_kernels.triton import depthwise_conv


def check(name: str, got, want, dtype: torch.dtype, elementwise: int, numel: int) -> None:
    """The first ``elementwise`` results (output, input gradients) tight; the rest are sums over
    ``numel`` terms whose order differs between implementations: a tolerance that grows with it."""
    tight = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    loose = {"atol": 1e-4 * numel ** 0.5, "rtol": 1e-3}
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.float().cpu(), w.float().cpu(), **(tight if i < elementwise else loose),
                                   msg=lambda m: f"{name}, result {i}: {m}")


def grads(fn, leaves, grad):
    y = fn(*leaves)
    return [y] + list(torch.autograd.grad(y, leaves, grad))


def main() -> int:
    if "cuda" not in qk.available_backends() or not torch.cuda.is_available():
        print(f"the cuda backend is not available here: {qk.available_backends()}", file=sys.stderr)
        return 1
    dev = "cuda"
    torch.manual_seed(0)
    runs = 0
    for dtype in (torch.float32, torch.bfloat16):
        for shape, axis in (((1000003,), None), ((3, 5, 7, 11), None), ((3, 5, 7, 11), 1), ((3, 5, 7, 11), 3),
                            ((17, 1), 0)):
            for bits in ((4,), (2, 4), (2, 4, 8), (1, 3, 5, 16)):
                k = len(bits)
                x = torch.randn(shape, device=dev, dtype=dtype)
                probs = torch.softmax(torch.randn(k, device=dev), 0)
                cols = 1 if axis is None else shape[axis]
                scales = (torch.rand(k, cols, device=dev) * 0.5 + 0.05)
                scales = scales[:, 0].contiguous() if axis is None else scales
                leaves = [t.requires_grad_() for t in (x, probs, scales)]
                grad = torch.randn(shape, device=dev, dtype=dtype)
                got = grads(lambda *a: qk.mixed_fake_quant(*a, bits, axis=axis, backend="cuda"), leaves, grad)
                want = grads(lambda *a: qk.reference.mixed_fake_quant(*a, bits, axis=axis), leaves, grad)
                check(f"mixed_fake_quant {dtype} {shape} axis={axis} bits={bits}", got, want, dtype, 2, x.numel())
                runs += 1
        for axis in (None, 1):  # the grouped op: tensors of odd, different sizes in one launch
            shapes, bits = ((4, 3, 5, 5), (7, 3, 3, 3), (2, 3, 1, 1), (1, 3, 2049, 1)), (2, 4, 8)
            xs = [torch.randn(s, device=dev, dtype=dtype) for s in shapes]
            probs = [torch.softmax(torch.randn(3, device=dev), 0) for _ in shapes]
            scales = [torch.rand(3, device=dev) * 0.5 + 0.05 if axis is None else
                      torch.rand(3, s[axis], device=dev) * 0.5 + 0.05 for s in shapes]
            leaves = [t.requires_grad_() for t in xs + probs + scales]
            n = len(shapes)

            def flat(ys):
                return torch.cat([y.flatten() for y in ys])

            grad = torch.randn(sum(x.numel() for x in xs), device=dev, dtype=dtype)
            got = grads(lambda *a: flat(qk.mixed_fake_quant_grouped(list(a[:n]), list(a[n:2 * n]), list(a[2 * n:]),
                                                                    bits, axis=axis, backend="cuda")), leaves, grad)
            want = grads(lambda *a: flat([qk.reference.mixed_fake_quant(a[i], a[n + i], a[2 * n + i], bits, axis=axis)
                                          for i in range(n)]), leaves, grad)
            check(f"mixed_fake_quant_grouped {dtype} axis={axis}", got, want, dtype, 1 + n, max(x.numel() for x in xs))
            runs += 1
        for k in (1, 3, 8):
            shape = (5, 3, 13, 7)
            outs = [torch.randn(shape, device=dev, dtype=dtype).requires_grad_() for _ in range(k)]
            w = torch.softmax(torch.randn(k, device=dev), 0).requires_grad_()
            grad = torch.randn(shape, device=dev, dtype=dtype)
            got = grads(lambda *a: qk.mixed_op_sum(list(a[:-1]), a[-1], backend="cuda"), outs + [w], grad)
            want = grads(lambda *a: qk.reference.mixed_op_sum(list(a[:-1]), a[-1]), outs + [w], grad)
            check(f"mixed_op_sum {dtype} K={k}", got, want, dtype, 1 + k, outs[0].numel())
            runs += 1
        for shape in ((5, 3, 13, 7), (3, 2, 1, 1), (2, 1, 4099, 3), (300, 2, 9, 9)):  # the Triton batch norm
            x = torch.randn(shape, device=dev, dtype=dtype).requires_grad_()
            grad = torch.randn(shape, device=dev, dtype=dtype)
            ours = OutputKeepingBatchNorm2d(shape[1], affine=False, backend="triton").to(dev)
            plain = torch.nn.BatchNorm2d(shape[1], affine=False).to(dev)
            check(f"batch_norm {dtype} {shape}", grads(ours, [x], grad), grads(plain, [x], grad), dtype, 2, x.numel())
            runs += 1
        for k, stride, padding, dilation in ((3, 1, 1, 1), (5, 2, 2, 1), (3, 2, 2, 2), (5, 1, 4, 2)):  # depthwise dw
            x = torch.randn(3, 5, 13, 11, device=dev, dtype=dtype)
            weight = torch.randn(5, 1, k, k, device=dev)
            args = ((stride, stride), (padding, padding), (dilation, dilation))
            y = torch.nn.functional.conv2d(x.float(), weight, None, *args, 5)
            grad = torch.randn(y.shape, device=dev, dtype=dtype)
            got = depthwise_conv.depthwise_conv2d_weight_grad(grad, x, (k, k), *args)
            want = torch.ops.aten.convolution_backward(grad.float(), x.float(), weight, None, *args, False, [0, 0], 5,
                                                       [False, True, False])[1]
            check(f"depthwise weight grad {dtype} k={k} s={stride} d={dilation}", [got], [want], dtype, 0, y.numel())
            runs += 1
    torch.cuda.synchronize()
    print(f"{runs} runs (cuda backend, Triton batch norm and depthwise weight gradient) checked against the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
