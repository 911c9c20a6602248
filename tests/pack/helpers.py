"""Small random-init models with pruned decoder linears, shared by the pack tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def pruned_llama(sparsity=0.7, pattern=None, tie=False, dtype=torch.float32, seed=0):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:
        for module in list(layer.self_attn.children()) + list(layer.mlp.children()):
            if not isinstance(module, torch.nn.Linear):
                continue
            w = module.weight.data
            if pattern == "2:4":
                groups = w.reshape(w.shape[0], -1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
                w.copy_((groups * keep).reshape_as(w))
            elif sparsity > 0:
                w[w.abs() <= w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values] = 0
    return model.to(dtype)
