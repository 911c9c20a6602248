"""On a CUDA GPU, every dispatch method equals the naive every-expert reference: outputs and
gradients (input, expert weights, router weights), fp32 and bf16; grouped_mm really runs there."""
import pytest
import torch

from sparselm.moe.dispatch import DISPATCH_METHODS
from sparselm.moe.experts import grouped_mm_available
from sparselm.moe.layer import MoEConfig, MoELayer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("no_tf32")]

DEVICE = "cuda"
DIM, HIDDEN, EXPERTS, TOP_K = 64, 128, 8, 2  # multiples of 16: bf16 grouped_mm alignment
FAST_METHODS = [m for m in DISPATCH_METHODS if m != "naive"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Largest error allowed, relative to the largest magnitude of the reference tensor. fp32 (TF32 off):
# only the summation order differs. bf16: the naive path rounds its [E, T, 2F] products and its
# einsum differently from per-expert slices, each about 2^-8 relative.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
ROUTERS = {
    "topk": {"router": "top_k"},
    "topk_capacity": {"router": "top_k", "capacity_factor": 1.0},  # drops assignments
    "topk_idle_expert": {"router": "top_k"},  # one expert gets no rows (bias below)
    "expert_choice": {"router": "expert_choice", "capacity_factor": 1.0},
}


def _layer(router: str, dtype: torch.dtype, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=DIM, expert_hidden=HIDDEN, num_experts=EXPERTS, top_k=TOP_K, **ROUTERS[router])
    layer = MoELayer(cfg).to(DEVICE, dtype)
    if router == "topk_idle_expert":
        # The bias only steers the choice (gates use the plain probs): expert 7 is never chosen.
        layer.router.selection_bias[EXPERTS - 1] = -10.0
    return layer


def _inputs(tokens: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(tokens, DIM, generator=gen, device=DEVICE).to(dtype)
    weight = torch.randn(tokens, DIM, generator=gen, device=DEVICE)  # a loss that weights every output
    return x, weight


def _run(layer: MoELayer, x: torch.Tensor, weight: torch.Tensor, method: str):
    """Output, input gradient and parameter gradients of sum(weight * layer(x)) with `method`."""
    layer.zero_grad(set_to_none=True)
    layer.dispatch_method = method
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.float() * weight).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return out.detach(), grads


def _assert_near(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual is not None and expected is not None, what
    assert actual.device.type == DEVICE and actual.dtype == expected.dtype, what
    assert torch.isfinite(actual).all(), what
    actual, expected = actual.double(), expected.double()
    tol = REL_TOL[dtype] * max(float(expected.abs().max()), 1e-6)
    err = float((actual - expected).abs().max())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (tolerance relative to max |ref|)"


def _compare(router: str, dtype: torch.dtype, method: str, tokens: int) -> MoELayer:
    layer = _layer(router, dtype)
    x, weight = _inputs(tokens, dtype)
    out_ref, grads_ref = _run(layer, x, weight, "naive")
    out, grads = _run(layer, x, weight, method)
    _assert_near(out, out_ref, dtype, f"{method} output")
    assert set(grads) == set(grads_ref) and "router.weight" in grads
    for name in grads_ref:
        _assert_near(grads[name], grads_ref[name], dtype, f"{method} grad of {name}")
    assert grads["router.weight"].abs().sum() > 0  # the gates carry gradient into the router
    return layer


@pytest.mark.parametrize("method", FAST_METHODS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("router", ROUTERS)
def test_dispatch_matches_naive_on_cuda(router, dtype, method):
    layer = _compare(router, dtype, method, tokens=256)
    if router == "topk_capacity":
        assert layer.metrics()["dropped_fraction"] > 0  # the dropping path was exercised
    if router == "topk_idle_expert":
        assert layer.metrics()["tokens_per_expert"][-1] == 0
        for p in (layer.experts.gate_up_E2FD, layer.experts.down_EDF):
            assert torch.all(p.grad[-1] == 0)  # an expert without rows gets exact zero gradients


@pytest.mark.parametrize("method", FAST_METHODS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("router", ["topk", "topk_capacity"])
def test_odd_token_count_matches_naive_on_cuda(router, dtype, method):
    _compare(router, dtype, method, tokens=250)  # uneven groups, T not a multiple of 16


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("router", ["topk", "topk_capacity", "expert_choice"])
def test_no_grad_path_matches_training_path_on_cuda(router, dtype):
    """Without grad mode the layer takes `dispatch_inference` (grouped_mm or the per-expert
    loop on CUDA); it must give the autograd path's output."""
    layer = _layer(router, dtype)
    x, _ = _inputs(250, dtype)
    layer.dispatch_method = "naive"
    with torch.no_grad():
        ref = layer(x)  # "naive" is never taken by the no-grad fast path
    layer.dispatch_method = "auto"
    assert layer._takes_inference_path(x) is False  # grad mode is on here
    with torch.no_grad():
        assert layer._takes_inference_path(x)
        out = layer(x)
    _assert_near(out, ref, dtype, "no-grad output")


def test_grouped_mm_runs_on_cuda_bf16(monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this PyTorch has no torch._grouped_mm")
    assert grouped_mm_available(DEVICE, torch.bfloat16)  # H100/H200 run it forward and backward
    layer = _layer("topk", torch.bfloat16)
    x, weight = _inputs(256, torch.bfloat16)
    out_ref, grads_ref = _run(layer, x, weight, "naive")
    _run(layer, x, weight, "auto")  # "auto" caches its availability probe (a grouped_mm call) before counting

    calls = []
    real = torch._grouped_mm

    def counting_grouped_mm(*args, **kwargs):
        calls.append((args[0].device.type, args[0].dtype))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting_grouped_mm)
    for method, expected_calls in [("sorted", 0), ("grouped_mm", 2), ("auto", 2)]:  # one call per projection
        calls.clear()
        out, grads = _run(layer, x, weight, method)
        assert calls == [(DEVICE, torch.bfloat16)] * expected_calls, method
        _assert_near(out, out_ref, torch.bfloat16, f"{method} output")
        for name in grads_ref:
            _assert_near(grads[name], grads_ref[name], torch.bfloat16, f"{method} grad of {name}")
    calls.clear()
    with torch.no_grad():
        layer.dispatch_method = "auto"
        out = layer(x)  # the no-grad path: one grouped_mm per projection for few rows
    assert calls == [(DEVICE, torch.bfloat16)] * 2
    _assert_near(out, out_ref, torch.bfloat16, "no-grad output")


@pytest.mark.parametrize("balance", ["aux_loss", "bias"])
def test_training_step_never_waits_for_the_gpu(balance):
    """Dropless top-k in bf16 on the default dispatch (grouped_mm on CUDA): routing, the router
    losses, the statistics, the backward and the balancing bias update run without one
    device-to-host copy or synchronisation, so the host can queue the next step while the GPU
    works. bf16 only: in fp32 (PyTorch 2.11, H200) `torch._grouped_mm` itself reads the group
    offsets back to the host."""
    dtype = torch.bfloat16
    if not grouped_mm_available(DEVICE, dtype):
        pytest.skip("torch._grouped_mm does not run here")
    torch.manual_seed(0)
    coefs = ({"balance_loss_coef": 1e-2, "z_loss_coef": 1e-3} if balance == "aux_loss"
             else {"balance_loss_coef": 0.0, "bias_update_rate": 1e-3})
    cfg = MoEConfig(hidden_size=DIM, expert_hidden=HIDDEN, num_experts=EXPERTS, top_k=TOP_K, **coefs)
    layer = MoELayer(cfg).to(DEVICE, dtype).train()
    x, weight = _inputs(256, dtype)

    def train_step():
        layer.zero_grad(set_to_none=True)
        out = layer(x.clone().requires_grad_(True))
        loss = (out.float() * weight).sum()
        if layer.aux_loss is not None:
            loss = loss + layer.aux_loss
        loss.backward()
        layer.update_balance_bias()

    train_step()  # first call: the grouped_mm probe, cuBLAS set-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    metrics = layer.metrics()  # read back only here
    assert sum(metrics["tokens_per_expert"]) == 2 * 256 * TOP_K
    assert metrics["dropped_fraction"] == 0.0 and metrics["router_entropy"] > 0
    assert layer.experts.gate_up_E2FD.grad is not None and layer.router.weight.grad is not None
