"""Backend selection and the FASTALIGN_BACKEND override."""

import pytest
import torch
from conftest import DEVICE

import fastalign as fa


def test_automatic_choice_follows_the_device(monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    # The interpreter is never picked on its own: native C++ when built, else torch.
    expected_cpu = "native" if "native" in fa.available_backends("cpu") else "torch"
    assert fa.select_backend("cpu") == expected_cpu
    monkeypatch.setenv("FASTALIGN_NATIVE", "0")
    assert fa.select_backend("cpu") == "torch"
    if torch.cuda.is_available():
        assert fa.select_backend("cuda") == "triton"


def test_unknown_backend_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"FASTALIGN_BACKEND='cuda' is not a backend; use one of "
                                         r"triton, native, torch or unset it"):
        fa.token_logprobs(torch.randn(2, 5, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE))


def test_forced_native_without_extension_fails_clearly(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "native")
    monkeypatch.setenv("FASTALIGN_NATIVE", "0")
    with pytest.raises(RuntimeError, match=r"FASTALIGN_BACKEND=native cannot run on cpu tensors: "
                                           r"the native extension is turned off \(FASTALIGN_NATIVE=0\)"):
        fa.select_backend("cpu")


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"FASTALIGN_BACKEND=triton cannot run on cpu tensors: "
                                           r"Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1"):
        fa.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


def test_case_and_spaces_are_forgiven(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", " Torch ")
    assert fa.select_backend(DEVICE) == "torch"


def test_backends_agree_exactly_enough(monkeypatch):
    """The same inputs through every available backend give the same numbers."""
    logits = torch.randn(16, 1000, device=DEVICE) * 5
    targets = torch.randint(0, 1000, (16,), device=DEVICE)
    results = []
    for name in fa.available_backends(DEVICE):
        monkeypatch.setenv("FASTALIGN_BACKEND", name)
        results.append(fa.token_logprobs(logits, targets, return_entropy=True, softcap=7.0))
    for logprobs, entropy in results[1:]:
        torch.testing.assert_close(logprobs, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, results[0][1], rtol=1e-5, atol=1e-5)
