"""A Llama-architecture causal LM whose MLPs are sparselm MoE layers, in the HF ecosystem.

`SparseMoeConfig` (model_type "sparselm_moe") is a `LlamaConfig` plus the MoE fields;
`SparseMoeForCausalLM` is `LlamaForCausalLM` with each chosen decoder layer's `mlp`
replaced by an `MoELayer`: attention, norms, embeddings and the decoder loop are the
unchanged transformers code. Importing this module registers both with the transformers
Auto classes, so after `import sparselm.moe`, `AutoModelForCausalLM.from_pretrained(dir)`
loads a saved MoE model (safetensors, HF layout).

In training mode, when labels are given, the router losses of all MoE layers are added to
the returned loss. `generate` refuses models with non-causal (expert-choice) routing.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sparselm.moe.experts import SharedSwiGLU, SwiGLUExperts
from sparselm.moe.layer import MoEConfig, MoELayer, refuse_noncausal_generation, total_aux_loss
from sparselm.moe.router import ExpertChoiceRouter, TopKRouter

MODEL_TYPE = "sparselm_moe"


class SparseMoeConfig(LlamaConfig):
    """LlamaConfig + MoE fields. `moe_layers`: indices of decoder layers that are MoE
    (None: all). The other fields mirror `MoEConfig` (see sparselm/moe/layer.py)."""

    model_type = MODEL_TYPE

    def __init__(self, num_experts: int = 8, num_experts_per_tok: int = 2, moe_intermediate_size: int | None = None,
                 router_type: str = "top_k", norm_topk_prob: bool = True, unit_gates: bool = False,
                 capacity_factor: float | None = None, num_shared_experts: int = 0,
                 router_aux_loss_coef: float = 0.01, router_z_loss_coef: float = 0.001,
                 bias_update_rate: float = 0.0, routed_scaling_factor: float = 1.0,
                 moe_layers: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or self.intermediate_size
        self.router_type = router_type
        self.norm_topk_prob = norm_topk_prob
        self.unit_gates = unit_gates
        self.capacity_factor = capacity_factor
        self.num_shared_experts = num_shared_experts
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.bias_update_rate = bias_update_rate
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_layers = moe_layers

    def moe_config(self) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden_size, expert_hidden=self.moe_intermediate_size,
                         num_experts=self.num_experts, top_k=self.num_experts_per_tok, router=self.router_type,
                         renormalize=self.norm_topk_prob, unit_gates=self.unit_gates,
                         capacity_factor=self.capacity_factor, shared_experts=self.num_shared_experts,
                         balance_loss_coef=self.router_aux_loss_coef, z_loss_coef=self.router_z_loss_coef,
                         bias_update_rate=self.bias_update_rate, gate_scale=self.routed_scaling_factor)

    def is_moe_layer(self, index: int) -> bool:
        return self.moe_layers is None or index in self.moe_layers


class SparseMoeForCausalLM(LlamaForCausalLM):
    config_class = SparseMoeConfig

    def __init__(self, config: SparseMoeConfig):
        super().__init__(config)
        moe_config = config.moe_config()
        for i, layer in enumerate(self.model.layers):
            if config.is_moe_layer(i):
                layer.mlp = MoELayer(moe_config, dtype=layer.self_attn.q_proj.weight.dtype)
                self._init_weights_of(layer.mlp)

    def _init_weights(self, module):
        super()._init_weights(module)
        self._init_weights_of(module)

    def _init_weights_of(self, module) -> None:
        from transformers import initialization as init

        std = self.config.initializer_range
        if isinstance(module, SwiGLUExperts):
            init.normal_(module.gate_up_E2FD, mean=0.0, std=std)
            init.normal_(module.down_EDF, mean=0.0, std=std)
        elif isinstance(module, (TopKRouter, ExpertChoiceRouter)):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, TopKRouter):
                init.zeros_(module.selection_bias)
        elif isinstance(module, SharedSwiGLU):
            init.normal_(module.gate_up.weight, mean=0.0, std=std)
            init.normal_(module.down.weight, mean=0.0, std=std)
        elif isinstance(module, MoELayer):
            for child in module.modules():
                if child is not module:
                    self._init_weights_of(child)

    def forward(self, *args, labels=None, **kwargs):
        out = super().forward(*args, labels=labels, **kwargs)
        if labels is not None and self.training and out.loss is not None:
            aux = total_aux_loss(self)
            if aux is not None:
                out.loss = out.loss + aux.to(out.loss.dtype)
        return out

    def generate(self, *args, **kwargs):
        refuse_noncausal_generation(self)
        return super().generate(*args, **kwargs)


def moe_config_from_dense(dense_config: LlamaConfig, **moe_fields) -> SparseMoeConfig:
    """A SparseMoeConfig with the dense model's architecture plus `moe_fields`."""
    fields = dense_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    fields.update(moe_fields)
    return SparseMoeConfig(**fields)


def _register() -> None:
    try:
        AutoConfig.register(MODEL_TYPE, SparseMoeConfig)
    except ValueError:  # already registered (module reloaded)
        pass
    try:
        AutoModelForCausalLM.register(SparseMoeConfig, SparseMoeForCausalLM)
    except ValueError:
        pass


_register()
