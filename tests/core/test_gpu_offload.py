"""With a GPU, blocks are processed on it one at a time while the model stays in CPU memory."""
import copy

import pytest
import torch

from sparselm.prune import SparseGPT, Wanda, sparsify

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("config", [Wanda(0.5), SparseGPT(pattern="2:4")], ids=["wanda", "sparsegpt24"])
def test_streamed_blocks_match_cpu(tiny_pair, tiny_calib, config):
    torch.backends.cuda.matmul.allow_tf32 = False  # the Hessian math must stay float32
    cpu_model, gpu_model = copy.deepcopy(tiny_pair[0]), copy.deepcopy(tiny_pair[0])
    sparsify(cpu_model, config, tiny_calib, progress=False)
    torch.cuda.reset_peak_memory_stats()
    report = sparsify(gpu_model, config, tiny_calib, device="cuda", progress=False)
    assert next(gpu_model.parameters()).device.type == "cpu"  # the model came back to CPU memory
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    agree = [(a != 0).eq(b != 0).float().mean().item()
             for a, b in zip(cpu_model.state_dict().values(), gpu_model.state_dict().values())]
    assert min(agree) > 0.98  # same masks up to float ties
    assert torch.cuda.max_memory_allocated() > 0  # the blocks really ran on the GPU
