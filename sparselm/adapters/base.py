"""Adapters for llama, mistral, qwen2, gpt2 and opt, and a generic fallback.

gpt2 stores its projections as `Conv1D` with weight [in, out] (the transpose of
`nn.Linear`); `linear_weight` / `set_linear_weight` give every engine the [out, in] view.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparselm.errors import SparselmError

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a transposed view for Conv1D)."""
    if isinstance(module, Conv1D):
        return module.weight.data.t()
    return module.weight.data


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a [out, in] weight back into `module` in place (dtype and layout preserved)."""
    target = module.weight.data
    if isinstance(module, Conv1D):
        target.copy_(weight.t().to(target.dtype))
    else:
        target.copy_(weight.to(target.dtype))


def in_features(module: nn.Module) -> int:
    return linear_weight(module).shape[1]


class ModelAdapter:
    """Where things are in one family. Subclasses set the attribute paths."""

    family = "generic"
    blocks_path: str | None = None          # e.g. "model.layers"
    attn_name = "self_attn"
    attn_proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    mlp_name = "mlp"
    mlp_proj = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    embedding_path = "model.embed_tokens"
    final_norm_path = "model.norm"

    # --- finding things ---------------------------------------------------------------
    def blocks_prefix(self, model: nn.Module) -> str:
        return self.blocks_path

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_prefix(model))

    def attention(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.attn_name)

    def mlp(self, block: nn.Module) -> nn.Module:
        return block if not self.mlp_name else block.get_submodule(self.mlp_name)

    def attention_projections(self, block: nn.Module) -> dict[str, nn.Module]:
        attn = self.attention(block)
        return {k: attn.get_submodule(v) for k, v in self.attn_proj.items()}

    def mlp_projections(self, block: nn.Module) -> dict[str, nn.Module]:
        mlp = self.mlp(block)
        return {k: mlp.get_submodule(v) for k, v in self.mlp_proj.items()}

    def linear_layers(self, block: nn.Module) -> dict[str, nn.Module]:
        """All prunable linear layers of a block, by name relative to the block, in forward order."""
        return {name: mod for name, mod in block.named_modules() if isinstance(mod, LINEAR_TYPES)}

    def embedding(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embedding_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.get_output_embeddings()

    def lm_head_tied(self, model: nn.Module) -> bool:
        """Whether the LM head's weight is the input embedding's (tie_word_embeddings)."""
        return linear_weight(self.lm_head(model)).data_ptr() == self.embedding(model).weight.data_ptr()

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    # --- attention geometry ------------------------------------------------------------
    def num_heads(self, model: nn.Module) -> int:
        cfg = model.config
        return getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")

    def num_kv_heads(self, model: nn.Module) -> int:
        return getattr(model.config, "num_key_value_heads", None) or self.num_heads(model)

    def head_dim(self, model: nn.Module) -> int:
        cfg = model.config
        hd = getattr(cfg, "head_dim", None)
        return hd or (getattr(cfg, "hidden_size", None) or cfg.n_embd) // self.num_heads(model)


class LlamaAdapter(ModelAdapter):
    family = "llama"
    blocks_path = "model.layers"


class MistralAdapter(LlamaAdapter):
    family = "mistral"


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    blocks_path = "transformer.h"
    attn_name = "attn"
    attn_proj = {"qkv": "c_attn", "o": "c_proj"}  # q, k, v fused in one Conv1D
    mlp_proj = {"up": "c_fc", "down": "c_proj"}
    embedding_path = "transformer.wte"
    final_norm_path = "transformer.ln_f"


class OPTAdapter(ModelAdapter):
    family = "opt"
    blocks_path = "model.decoder.layers"
    attn_proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
    mlp_name = ""  # fc1 / fc2 sit directly on the decoder layer
    mlp_proj = {"up": "fc1", "down": "fc2"}
    embedding_path = "model.decoder.embed_tokens"
    final_norm_path = "model.decoder.final_layer_norm"


class GenericAdapter(ModelAdapter):
    """Fallback: the decoder blocks are the longest ModuleList of same-typed modules holding linears."""

    family = "generic"

    def blocks_prefix(self, model: nn.Module) -> str:
        best, best_len = None, 0
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) > best_len and len({type(m) for m in mod}) == 1 \
                    and any(isinstance(m, LINEAR_TYPES) for m in mod[0].modules()):
                best, best_len = name, len(mod)
        if best is None:
            raise SparselmError(
                f"cannot find decoder blocks in {type(model).__name__}; supported families: "
                f"{', '.join(SUPPORTED_FAMILIES)} (others work when their blocks are an nn.ModuleList)")
        return best

    def attention_projections(self, block):
        raise SparselmError(f"the generic adapter does not know where the attention projections of "
                            f"{type(block).__name__} are; supported families: {', '.join(SUPPORTED_FAMILIES)}")

    def mlp_projections(self, block):
        raise SparselmError(f"the generic adapter does not know where the MLP projections of "
                            f"{type(block).__name__} are; supported families: {', '.join(SUPPORTED_FAMILIES)}")

    def embedding(self, model):
        return model.get_input_embeddings()

    def final_norm(self, model):
        raise SparselmError(f"the generic adapter does not know the final norm of {type(model).__name__}")


_ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llama": LlamaAdapter, "mistral": MistralAdapter, "qwen2": Qwen2Adapter, "gpt2": GPT2Adapter, "opt": OPTAdapter,
}
SUPPORTED_FAMILIES = tuple(_ADAPTERS)


def register_adapter(model_type: str, adapter: type[ModelAdapter]) -> None:
    """Teach sparselm a new family (by `config.model_type`)."""
    _ADAPTERS[model_type] = adapter


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`'s family, or the generic fallback (which checks it can find blocks)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is not None:
        return cls()
    generic = GenericAdapter()
    generic.blocks_prefix(model)  # raises a clear error when there are no blocks to find
    return generic
