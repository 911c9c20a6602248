"""GPU 2:4: the 2:4 check by hand on CPU; the conversion itself only with CUDA."""
import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.pack.semi_structured import is_two_four, to_semi_structured, unsupported_reason
from sparselm.prune.masks import nm_mask

from .helpers import pruned_llama


def test_two_four_check_by_hand():
    ok = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    bad = torch.tensor([[1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_two_four(ok) and not is_two_four(bad)
    assert not is_two_four(torch.zeros(2, 6))  # in_features must be a multiple of 4


def test_cpu_weights_are_reported_unsupported():
    assert unsupported_reason(torch.zeros(64, 64)) == "not on a CUDA device"


def _two_four_llama(hidden=256, intermediate=512, dtype=torch.float16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).cuda().eval()
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data *= nm_mask(module.weight.data.abs().float(), 2, 4)
    return model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_says_so():
    with pytest.raises(SparselmError, match="need a CUDA GPU"):
        to_semi_structured(pruned_llama(pattern="2:4"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_four_layers_run_sparse_on_gpu():
    model = _two_four_llama()
    ids = torch.randint(0, 512, (1, 64), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
    report = to_semi_structured(model)
    assert len(report.converted) == 14 and not report.kept_dense, report.table()  # 7 linears x 2 blocks
    with torch.no_grad():
        after = model(ids).logits
        # row-major outputs (attention kernels need a contiguous last dim), prefill-sized inputs too
        h = torch.randn(2, 256, model.config.hidden_size, device="cuda", dtype=torch.float16)
        for proj in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.gate_proj):
            out = proj(h)
            assert out.shape == (2, 256, proj.out_features) and out.is_contiguous()
    torch.testing.assert_close(after.float(), before.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unsupported_layers_stay_dense_with_a_reason():
    model = _two_four_llama(dtype=torch.bfloat16)
    layer = model.model.layers[0]
    layer.mlp.up_proj.weight.data[0, :4] = 1.0  # 4 non-zeros in one group: not 2:4 any more
    layer.mlp.down_proj = torch.nn.Linear(512, 200, bias=False, dtype=torch.bfloat16, device="cuda")  # odd shape
    layer.self_attn.q_proj.weight.data = layer.self_attn.q_proj.weight.data.double()  # unsupported dtype
    report = to_semi_structured(model)
    assert "not 2:4" in report.kept_dense["model.layers.0.mlp.up_proj"]
    assert "not a multiple" in report.kept_dense["model.layers.0.mlp.down_proj"]
    assert "not supported" in report.kept_dense["model.layers.0.self_attn.q_proj"]
    assert "model.layers.1.mlp.up_proj" in report.converted and "model.layers.0.mlp.gate_proj" in report.converted
    converted = model.model.layers[1].mlp.up_proj.weight
    assert type(converted).__name__.startswith("SparseSemiStructuredTensor")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_generation_bench_runs_two_four_on_gpu(dtype):
    from sparselm.bench.generation import compare_generation

    model = _two_four_llama(dtype=dtype)
    summary = compare_generation(model.cpu(), prompt_len=16, new_tokens=4, repeats=1, progress=False,
                                 device="cuda")
    rows = {r["variant"]: r for r in summary["results"]}
    assert set(rows) == {"dense", "2:4"}, summary["skipped"]
    assert rows["2:4"]["pack_choices"]["2:4"] == 14  # 7 linears in each of the 2 blocks
    # the kept halves and their metadata: the decoder linears' bytes drop by about 16 bits -> 9 per weight
    dense_lin, sparse_lin = rows["dense"]["linear_weight_bytes"], rows["2:4"]["linear_weight_bytes"]
    assert sparse_lin < 0.8 * dense_lin
    assert rows["2:4"]["flops_per_token"] < rows["dense"]["flops_per_token"]
    assert rows["dense"]["gpu_peak_allocated_mb"] > 0 and rows["2:4"]["decode_tokens_per_s"] > 0
    assert summary["device"].startswith("cuda")
