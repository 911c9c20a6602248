"""GPU 2:4: the 2:4 check by hand on CPU; the conversion itself only with CUDA."""
import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.pack.semi_structured import is_two_four, to_semi_structured, unsupported_reason

from .helpers import pruned_llama


def test_two_four_check_by_hand():
    ok = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    bad = torch.tensor([[1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_two_four(ok) and not is_two_four(bad)
    assert not is_two_four(torch.zeros(2, 6))  # in_features must be a multiple of 4


def test_cpu_weights_are_reported_unsupported():
    assert unsupported_reason(torch.zeros(64, 64)) == "not on a CUDA device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_says_so():
    with pytest.raises(SparselmError, match="need a CUDA GPU"):
        to_semi_structured(pruned_llama(pattern="2:4"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_four_layers_run_sparse_on_gpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512)
    model = LlamaForCausalLM(cfg).half().cuda().eval()
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data.reshape(module.weight.shape[0], -1, 4)
            keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, -1).indices, True)
            module.weight.data = (w * keep).reshape_as(module.weight)
    ids = torch.randint(0, 512, (1, 64), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
    report = to_semi_structured(model)
    assert report.converted, report.table()
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after.float(), before.float(), rtol=2e-2, atol=2e-2)
