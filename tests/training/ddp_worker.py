"""One rank of the 2-process DDP test (run as a script with RANK/WORLD_SIZE/MASTER_* set),
or the single-process reference when WORLD_SIZE is 1. Writes its masks and losses."""
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from sparselm.training import SparseTrainingConfig, distributed
from sparselm.training.sparse_training_loop import train_sparse

STEPS = 8


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_environment()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 96, (4000,), generator=torch.Generator().manual_seed(1))
    sparse = SparseTrainingConfig(sparsity=0.8, method="rigl", total_steps=STEPS, update_interval=2, end_fraction=1.0)
    result = train_sparse(model, ids, ids[:500], sparse, steps=STEPS, batch_size=8, seq_len=16, lr=1e-2,
                          eval_every=STEPS, progress=False)
    torch.save({"masks": result.masks, "losses": result.losses}, out_path)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
