"""The extension builds with the instruction set of this CPU, and a failed build warns once."""
import warnings

import pytest
import torch

from sparselm.kernels import extension


def test_builds_for_this_cpu(sparse_kernels):
    if sparse_kernels is None:
        pytest.skip("no C++ toolchain here; the fallback is covered by the other tests")
    # avx512, avx2 (8-lane paths) or portable: the widest this CPU has
    assert sparse_kernels.compiled_simd() == extension.cpu_instruction_set()
    assert "extension" in extension.extension_status()


def test_dense_gemv_baseline_matches_torch(sparse_kernels):
    from sparselm.kernels import dense_gemv

    w = torch.randn(300, 513) / 513 ** 0.5
    x = torch.randn(1, 513)
    torch.testing.assert_close(dense_gemv(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    saved = dict(extension._state)
    monkeypatch.setattr(extension, "_state", {"tried": False, "module": None, "reason": None})

    def broken_load(**kwargs):
        raise RuntimeError("Error building extension 'sparselm_kernels': compiler exploded")

    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.delenv("SPARSELM_DISABLE_EXTENSION", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension.load_extension() is None
        assert extension.load_extension() is None
    messages = [str(w.message) for w in caught if "sparse kernels are unavailable" in str(w.message)]
    assert len(messages) == 1 and "compiler exploded" in messages[0] and "fallback" in messages[0]
    assert "fallback" in extension.extension_status()
    extension._state.update(saved)
