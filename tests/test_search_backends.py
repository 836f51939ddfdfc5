"""A whole search step on each backend against the same step on the reference backend.

The op tests compare the backends op by op; here the supernet as ``qdarts search`` builds it (grouped
weights, shared activation scales, chained convs, mixed-op sums): the same seed and batches on backend
reference and on each fused backend, one forward and backward of the search loss with every
parameter learning (the loss, every gradient, the batch norms' running statistics), then one whole
``Searcher.step`` (arch step, then weights and gamma: every parameter and buffer after it).

The fused kernels add in other orders than the reference, so the two agree to rounding. A gradient
is compared against its tensor's largest magnitude, floored at a thousandth of the largest in its
group (weights, alpha, beta, gamma): some are sums that cancel to rounding noise. The few-channel
kernels (the C++ and Triton batch norms, pools, depthwise and 1x1 convolutions) are off here
(``QDARTS_FEW_CHANNEL_KERNELS=0``; their own tests compare them with PyTorch's, module by module):
a quantized network's convolutions output few distinct values, so its batch norms' outputs hold
values 1 ulp apart that are equal in exact arithmetic, and where the C++ batch norm (fp64 sums,
``(x - mean) * invstd``) rounds two of them to a tie that PyTorch's formula keeps 1 ulp apart in a
max-pool window, that window's gradient goes to another pixel: a few percent of every gradient
upstream, as a 1-ulp change of that one value makes on the reference alone (a 1-cell supernet with
bits (2, 4) here, a 3-cell one on 9x9 inputs in a search of it).
"""

import pytest
import torch

from conftest import require_backend
from qdarts.data import Dataset
from qdarts.search import SearchConfig, Searcher

CONFIGS = {
    "paper-248": dict(bits=(2, 4, 8), quantizer="paper"),
    "lsq-24": dict(bits=(2, 4), quantizer="lsq"),
    "lsq-248": dict(bits=(2, 4, 8), quantizer="lsq"),
    "lsq-24-gamma-per-conv": dict(bits=(2, 4), quantizer="lsq", share_gamma=False),
}
_GPU = torch.cuda.is_available()
# (setting, backend, device): every setting on each backend, but for Triton's interpreter (on CPU, 17 s a
# case) one setting per quantizer
CASES = [(setting, backend, device) for setting in CONFIGS
         for backend, device in [("cpu", "cpu"), ("triton", "cuda" if _GPU else "cpu"), ("cuda", "cuda")]
         if _GPU or backend != "triton" or setting in ("paper-248", "lsq-24-gamma-per-conv")]
GRADIENT_RTOL = 1e-4  # of the tensor's largest |gradient|, floored at GROUP_FLOOR of its group's
GROUP_FLOOR = 1e-3
STEP_RTOL = 1e-5  # weights, gamma and buffers after a step: of the largest |value| in their group
# alpha and beta after a step: of arch_lr. Adam's first step moves each by about arch_lr g / (|g| + eps),
# so a gradient near zero, which rounding moves by much of itself, moves it by up to 2 arch_lr (a sign);
# seeds 0-15 of every setting on the cpu backend stayed within this
ARCH_STEP_ATOL = 1e-2
SEED = 7


def _searcher(backend: str, device: str, settings: dict, tmp_path, seed: int = SEED) -> Searcher:
    gen = torch.Generator().manual_seed(seed)
    n = 32
    x = torch.randn(2 * n, 1, 8, 8, generator=gen)
    y = torch.randint(0, 4, (2 * n,), generator=gen)
    data = Dataset("synthetic", x[:n], y[:n], x[n:], y[n:], 4)
    config = SearchConfig(data="synthetic", epochs=1, warmup_epochs=0, batch_size=8, channels=4, layers=1,
                          steps=2, partial_channels=2, cost_weight=0.1, seed=seed, backend=backend, device=device,
                          **settings)
    return Searcher(config, str(tmp_path / backend), progress=False, dataset=data)


def _groups(s: Searcher):
    """{parameter name: its group's name} (weights, gamma, alpha, beta)."""
    ids = {id(p): group for group, params in s.groups.items() for p in params}
    return {name: ids[id(p)] for name, p in s.net.named_parameters() if id(p) in ids}


def _compare(name_to_group, got: dict, want: dict, rtol: float, floor: float, what: str, atol: float = 0.0):
    group_max = {}
    for name, t in want.items():
        t = t[torch.isfinite(t)] if t.is_floating_point() else t.new_zeros(0)
        g = name_to_group.get(name, "buffers")
        group_max[g] = max(group_max.get(g, 0.0), float(t.abs().max()) if t.numel() else 0.0)
    assert got.keys() == want.keys(), what
    for name, w in want.items():
        finite = torch.isfinite(w)
        # integers, and infinities (an observer's range before its first batch), exactly
        assert torch.equal(got[name][~finite], w[~finite]), f"{what} {name}"
        if not w.is_floating_point() or not finite.any():
            continue
        w, g = w[finite].double(), got[name][finite].double()
        scale = max(float(w.abs().max()), floor * group_max[name_to_group.get(name, "buffers")], 1e-30)
        err = float((g - w).abs().max())
        assert err <= rtol * scale + atol, f"{what} {name}: max difference {err:.3g}, {err / scale:.3g} of {scale:.3g}"


def _forward_backward(s: Searcher):
    """(loss, {name: gradient}, {name: buffer}) of one forward and backward of the search loss, every
    parameter learning."""
    xb, yb = s.train_x[:8].to(s.device), s.train_y[:8].to(s.device)
    _, _, loss = s._train_loss(xb, yb)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in s.net.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().cpu() for n, b in s.net.named_buffers()}
    return loss.item(), grads, buffers


def check_step(setting: str, backend: str, device: str, tmp_path, seed: int = SEED) -> None:
    """The comparison of the test below, for one case and seed."""
    settings = CONFIGS[setting]
    fused, reference = (_searcher(b, device, settings, tmp_path, seed) for b in (backend, "reference"))
    names = _groups(reference)
    for a, b in zip(fused.net.state_dict().values(), reference.net.state_dict().values()):
        assert torch.equal(a, b)  # one seed, one supernet

    loss_f, grads_f, buffers_f = _forward_backward(fused)
    loss_r, grads_r, buffers_r = _forward_backward(reference)
    assert abs(loss_f - loss_r) <= 1e-5 * abs(loss_r)
    assert {names.get(n) for n in grads_r} >= {"weights", "alpha", "beta", "gamma"}
    _compare(names, grads_f, grads_r, GRADIENT_RTOL, GROUP_FLOOR, "gradient")
    _compare(names, buffers_f, buffers_r, STEP_RTOL, 0.0, "buffer")

    stepped = {}
    for b in (backend, "reference"):
        s = _searcher(b, device, settings, tmp_path / "step", seed)
        xb, yb, xv, yv = (t[8:16].to(s.device) for t in (s.train_x, s.train_y, s.val_x, s.val_y))
        s.step(xb, yb, xv, yv, s.config.weight_lr, torch.zeros(4, device=s.device), update_arch=True)
        stepped[b] = {n: t.detach().cpu() for n, t in s.net.state_dict().items()}
    arch = {n for n, g in names.items() if g in ("alpha", "beta")}
    for part, rtol, atol in ((arch, 0.0, ARCH_STEP_ATOL * s.config.arch_lr), (None, STEP_RTOL, 0.0)):
        keep = (lambda n: n in arch) if part is not None else (lambda n: n not in arch)
        _compare(names, {n: t for n, t in stepped[backend].items() if keep(n)},
                 {n: t for n, t in stepped["reference"].items() if keep(n)}, rtol, 1.0, "after a step,", atol)


@pytest.mark.parametrize("setting, backend, device", CASES, ids=["-".join(case) for case in CASES])
def test_a_search_step_on_each_backend_is_the_reference_step(setting, backend, device, tmp_path, monkeypatch):
    require_backend(backend, device)
    monkeypatch.setenv("QDARTS_FEW_CHANNEL_KERNELS", "0")  # see the module docstring
    check_step(setting, backend, device, tmp_path)
