"""Expert parallelism on 2 CPU processes (gloo) equals the single-process layer."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparselm.errors import SparselmError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SETTINGS = {"dropless": dict(), "capacity_shared": dict(capacity_factor=0.7, shared_experts=1),
            "expert_choice": dict(router="expert_choice", capacity_factor=1.0)}


def _worker(rank, world, port, result_dir):
    from sparselm.moe.layer import MoEConfig, MoELayer
    from sparselm.moe.parallel import check_against_full_layer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, settings in SETTINGS.items():
            torch.manual_seed(0)  # same full layer on both ranks
            cfg = MoEConfig(hidden_size=16, expert_hidden=24, num_experts=4, top_k=2, **settings)
            results[name] = check_against_full_layer(MoELayer(cfg, dtype=torch.float64).double(), tokens=40)
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_expert_parallel_matches_single_process():
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(_worker, args=(2, _free_port(), result_dir), nprocs=2,
                                 join=False, start_method="spawn")
        for _ in range(120):  # 60 s timeout
            if ctx.join(timeout=0.5):
                break
        else:
            for p in ctx.processes:
                p.kill()
            pytest.fail("expert-parallel workers timed out")
        for rank in range(2):
            results = torch.load(os.path.join(result_dir, f"rank{rank}.pt"), weights_only=True)
            assert set(results) == set(SETTINGS)
            for setting, errors in results.items():
                assert errors["world_size"] == 2
                for name, err in errors.items():
                    if name != "world_size":
                        assert err < 1e-10, (setting, rank, name, err)


def test_experts_must_divide_across_ranks(monkeypatch):
    from sparselm.moe.layer import MoEConfig, MoELayer
    from sparselm.moe.parallel import ExpertParallelMoE

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(SparselmError, match="multiple of the world size"):
        ExpertParallelMoE(MoELayer(MoEConfig(hidden_size=8, expert_hidden=8, num_experts=4, top_k=2)))
