"""Conditional sparsity: mixture-of-experts layers, routing, dispatch, conversion, training.

Legend used across the package: T tokens, D model dim, E experts, F expert hidden,
K experts per token, A kept (token, expert) assignments, C expert capacity.

Importing this package registers `SparseMoeConfig` / `SparseMoeForCausalLM` (model_type
"sparselm_moe") with the transformers Auto classes.
"""
from sparselm.moe.buffers import release_buffers
from sparselm.moe.dispatch import dispatch, dispatch_naive, dispatch_sorted
from sparselm.moe.experts import SharedSwiGLU, SwiGLUExperts
from sparselm.moe.expert_pruning import expert_scores, prune_experts
from sparselm.moe.io import load_moe, save_moe
from sparselm.moe.layer import (MoEConfig, MoELayer, model_routing_metrics, moe_layers, reset_routing_stats,
                                total_aux_loss, update_balance_biases)
from sparselm.moe.losses import load_balancing_loss, router_z_loss
from sparselm.moe.modeling import SparseMoeConfig, SparseMoeForCausalLM
from sparselm.moe.partition import partition
from sparselm.moe.router import ExpertChoiceRouter, TopKRouter
from sparselm.moe.routing import Routing, expert_capacity, expert_choice_routing, top_k_routing
from sparselm.moe.upcycle import upcycle

__all__ = [
    "MoEConfig", "MoELayer", "SwiGLUExperts", "SharedSwiGLU", "TopKRouter", "ExpertChoiceRouter", "Routing",
    "top_k_routing", "expert_choice_routing", "expert_capacity", "load_balancing_loss", "router_z_loss",
    "dispatch", "dispatch_sorted", "dispatch_naive", "moe_layers", "total_aux_loss", "update_balance_biases",
    "reset_routing_stats", "model_routing_metrics", "SparseMoeConfig", "SparseMoeForCausalLM", "upcycle",
    "partition", "expert_scores", "prune_experts", "save_moe", "load_moe", "release_buffers",
]
