"""On a CUDA GPU the lean loop runs its steps as CUDA graphs: same logits and greedy tokens as
the same loop run eagerly, for dense models and for 2:4 semi-structured (cuSPARSELt) weights."""
import pytest
import torch

from sparselm.bench.lean_decode import LeanDecoder
from tests.conftest import random_llama

from .test_semi_structured import _two_four_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("no_tf32")]


def _compare(model, prompt, steps, rtol, atol, exact_tokens):
    """Graphed vs eager logits after the prompt and for single steps; greedy generation through
    the graphs equals stepping the same graphs one token at a time (and, in fp32, the eager
    loop's tokens: in 16-bit types a near-tie may flip between the two and change every token
    after it)."""
    max_len = prompt.shape[1] + 2 * steps + 8
    eager = LeanDecoder(model, max_len=max_len, batch_size=prompt.shape[0], static_step=False)
    graphed = LeanDecoder(model, max_len=max_len, batch_size=prompt.shape[0])
    assert graphed.static_step and graphed.cuda_graphs and not eager.static_step
    for _ in range(2):  # the second round replays the captured graphs after reset()
        for dec in (eager, graphed):
            dec.reset()
        ref, got = eager.step(prompt), graphed.step(prompt)  # prefill
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol)
        token = ref.argmax(-1, keepdim=True)
        for _ in range(3):  # single steps
            ref, got = eager.step(token), graphed.step(token)
            torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol)
            token = ref.argmax(-1, keepdim=True)
        assert graphed._decode_graph is not None and prompt.shape[1] in graphed._prefill
        start = graphed.pos
        out = graphed.generate(token, steps)
        assert graphed.pos == start + steps and out.shape == (prompt.shape[0], steps)
        if exact_tokens:
            assert torch.equal(eager.generate(token, steps), out)
        graphed.pos = start  # the same steps again, one graph replay and argmax at a time
        stepped, t = [], token
        for _ in range(steps):
            t = graphed.step(t).argmax(-1, keepdim=True)
            stepped.append(t)
        assert torch.equal(torch.cat(stepped, dim=1), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_steps_equal_eager_steps(dtype):
    model = random_llama(seed=1, num_key_value_heads=2).to("cuda", dtype).eval()
    prompt = torch.randint(0, 256, (2, 13), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    _compare(model, prompt, steps=12, rtol=tol, atol=tol, exact_tokens=dtype == torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_steps_with_two_four_weights(dtype):
    from sparselm.pack.semi_structured import to_semi_structured

    model = _two_four_llama(dtype=dtype)
    report = to_semi_structured(model)
    assert len(report.converted) == 14, report.table()
    prompt = torch.randint(0, 512, (1, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    _compare(model, prompt, steps=12, rtol=3e-2, atol=3e-2, exact_tokens=False)
