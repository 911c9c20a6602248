"""The sequential engine feeds each block the outputs of the already-processed blocks."""
import torch

from sparselm.adapters import get_adapter
from sparselm.engine import capture_block_inputs, run_blockwise
from tests.conftest import random_llama


def test_captured_inputs_reproduce_the_model():
    model = random_llama()
    ids = torch.randint(0, 256, (3, 16))
    inputs = capture_block_inputs(model, ids, batch_size=2)
    assert [i.args[0].shape[0] for i in inputs] == [2, 1]
    blocks = get_adapter(model).blocks(model)
    hidden = [i.args[0] for i in inputs]
    for block in blocks:
        hidden = [block(h, **i.kwargs) for h, i in zip(hidden, inputs)]
        hidden = [h[0] if isinstance(h, tuple) else h for h in hidden]
    final = torch.cat([model.model.norm(h) for h in hidden])
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(final, ref, rtol=1e-5, atol=1e-5)


def test_blocks_see_outputs_of_pruned_earlier_blocks():
    model = random_llama(num_hidden_layers=3)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        dense_hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # per layer inputs
    seen = {}

    def process(ctx):
        seen[ctx.index] = torch.cat([i.args[0] for i in ctx.inputs])
        if ctx.index == 0:  # "prune" block 0 completely: its MLP output becomes zero
            for p in get_adapter(model).mlp(ctx.block).parameters():
                p.data.zero_()

    run_blockwise(model, ids, process, batch_size=4, progress=False)
    torch.testing.assert_close(seen[0], dense_hidden[0])
    assert not torch.allclose(seen[1], dense_hidden[1])  # block 1 saw the pruned block 0's output
    with torch.no_grad():
        pruned_hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(seen[1], pruned_hidden[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[2], pruned_hidden[2], rtol=1e-5, atol=1e-5)
