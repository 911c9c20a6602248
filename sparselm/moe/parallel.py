"""Expert parallelism: experts sharded across ranks, tokens exchanged with all-to-all.

Each of W ranks holds E/W experts (rank r owns experts r*E/W .. (r+1)*E/W - 1) and a
replica of the router (and shared expert); each rank routes its own tokens (data
parallel). One forward (GShard, Lepikhin et al. 2020, sec. 3.2):
  1. route locally; sort the (token, slot) assignments by expert, which also groups them
     by destination rank;
  2. all-to-all the per-expert counts, then the token rows (uneven splits);
  3. run the local experts on what arrived, grouped by local expert;
  4. all-to-all the outputs back; gate-weight and index_add them into their tokens.
Both exchanges go through `torch.distributed.nn.functional.all_to_all_single`, whose
backward is the reverse exchange, so gradients flow to the experts on other ranks.
Uses `all_to_all_single` (not the list form, which fails on gloo with unequal sizes):
gloo on CPU, NCCL on GPU. Replicated parameters (router, shared expert) still need the
usual data-parallel gradient all-reduce (DDP); expert gradients must not be all-reduced.

Launch with `torchrun --nproc-per-node 2 -m sparselm.moe.parallel` to run the
consistency check below on a real process group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from sparselm.errors import SparselmError
from sparselm.moe.experts import SwiGLUExperts
from sparselm.moe.layer import MoELayer
from sparselm.moe.routing import Routing


class ExpertParallelMoE(MoELayer):
    """An MoELayer whose experts live on several ranks; same outputs as the full layer."""

    def __init__(self, full: MoELayer, group=None):
        super().__init__(full.config, dtype=full.experts.gate_up_E2FD.dtype)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        num_experts = full.config.num_experts
        if num_experts % self.world_size:
            raise SparselmError(f"{num_experts} experts do not divide across {self.world_size} ranks; "
                                "use a number of experts that is a multiple of the world size")
        self.local_experts = num_experts // self.world_size
        first = self.rank * self.local_experts
        self.experts = SwiGLUExperts(self.local_experts, full.config.hidden_size, full.config.expert_hidden,
                                     dtype=full.experts.gate_up_E2FD.dtype)
        with torch.no_grad():
            self.experts.gate_up_E2FD.copy_(full.experts.gate_up_E2FD[first:first + self.local_experts])
            self.experts.down_EDF.copy_(full.experts.down_EDF[first:first + self.local_experts])
        self.router.load_state_dict(full.router.state_dict())
        if full.shared is not None:
            self.shared.load_state_dict(full.shared.state_dict())

    def _dispatch(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        world, local = self.world_size, self.local_experts
        order = torch.argsort(routing.expert_index, stable=True)  # [A] grouped by expert = by rank
        token_A = routing.token_index[order]
        send_counts_E = torch.bincount(routing.expert_index, minlength=world * local)  # [E]
        recv_counts_WL = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts_WL, send_counts_E, group=self.group)  # [W*L]: per source, my experts
        send_splits = send_counts_E.view(world, local).sum(1).tolist()  # rows to each rank
        recv_splits = recv_counts_WL.view(world, local).sum(1).tolist()  # rows from each rank

        x_send_AD = x_TD[token_A]  # [A, D]
        x_recv_RD = all_to_all_single(x_send_AD.new_empty(sum(recv_splits), x_TD.shape[1]), x_send_AD,
                                      recv_splits, send_splits, group=self.group)  # [R, D] by (source, expert)
        # Arrived rows are grouped by source rank, then by local expert: regroup by expert.
        local_expert_R = torch.arange(local, device=x_TD.device).repeat(world).repeat_interleave(recv_counts_WL)
        perm_R = torch.argsort(local_expert_R, stable=True)
        counts_local = recv_counts_WL.view(world, local).sum(0).tolist()
        y_sorted_RD = self.experts.forward_grouped(x_recv_RD[perm_R], counts_local)  # [R, D]
        inverse_R = torch.empty_like(perm_R)
        inverse_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
        y_recv_RD = y_sorted_RD[inverse_R]  # back to (source, expert) order
        y_back_AD = all_to_all_single(y_recv_RD.new_empty(x_send_AD.shape), y_recv_RD,
                                      send_splits, recv_splits, group=self.group)  # [A, D]
        gates_A = routing.gates[order].to(y_back_AD.dtype)
        return torch.zeros_like(x_TD).index_add(0, token_A, y_back_AD * gates_A[:, None])


def check_against_full_layer(full: MoELayer, tokens: int = 64, group=None) -> dict:
    """Run the expert-parallel layer on this rank's tokens and compare with the full layer
    run locally on the same tokens: outputs, input gradients, expert gradients (summed
    over ranks) and router gradients (summed over ranks). Returns the max abs errors."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ep = ExpertParallelMoE(full, group)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank has its own tokens
    x = torch.randn(tokens, full.config.hidden_size, generator=gen, dtype=full.experts.gate_up_E2FD.dtype)
    grad_out = torch.randn(x.shape, generator=gen, dtype=x.dtype)

    x_ep = x.clone().requires_grad_(True)
    out_ep = ep(x_ep)
    out_ep.backward(grad_out)
    full.zero_grad(set_to_none=True)
    x_ref = x.clone().requires_grad_(True)
    out_ref = full(x_ref)
    out_ref.backward(grad_out)

    errors = {"output": float((out_ep - out_ref).detach().abs().max()),
              "input_grad": float((x_ep.grad - x_ref.grad).abs().max())}
    # Expert gradients: the full layer on each rank saw only that rank's tokens; sum over ranks.
    first = rank * ep.local_experts
    for name in ("gate_up_E2FD", "down_EDF"):
        ref = getattr(full.experts, name).grad.clone()
        dist.all_reduce(ref, group=group)
        got = getattr(ep.experts, name).grad
        errors[name] = float((got - ref[first:first + ep.local_experts]).abs().max())
    router_ep, router_ref = ep.router.weight.grad.clone(), full.router.weight.grad.clone()
    dist.all_reduce(router_ep, group=group)
    dist.all_reduce(router_ref, group=group)
    errors["router_grad"] = float((router_ep - router_ref).abs().max())
    errors["world_size"] = world
    return errors


def main() -> int:
    """torchrun entry: consistency check of expert parallelism on the launched group."""
    from sparselm.moe.layer import MoEConfig

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    torch.manual_seed(0)  # identical full layer on every rank
    full = MoELayer(MoEConfig(hidden_size=32, expert_hidden=48, num_experts=4 * dist.get_world_size(), top_k=2),
                    dtype=torch.float64)
    errors = check_against_full_layer(full)
    if dist.get_rank() == 0:
        print({k: v for k, v in errors.items()})
    dist.destroy_process_group()
    return 0 if max(v for k, v in errors.items() if k != "world_size") < 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
