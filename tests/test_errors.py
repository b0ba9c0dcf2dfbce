"""Bad input: every message names the argument and says what to do."""

import pytest
import torch
from conftest import DEVICE

import fastalign as fa


def _logits(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _targets(*shape, high=10):
    return torch.randint(0, high, shape, device=DEVICE)


# Temperature and softcap scale float32 logits: they and their reciprocals must be normal floats.
SCALE = r"a finite number in \[1.18e-38, 8.51e\+37\] \(it and its reciprocal scale float32 values\)"
TEMPERATURE = r"temperature must be " + SCALE
SOFTCAP = r"softcap must be None or " + SCALE

BAD_CALLS = [
    # (description, args, kwargs, exception, message pattern)
    ("integer logits", (torch.ones(4, 10, dtype=torch.long, device=DEVICE), _targets(4)), {},
     TypeError, r"logits must be float16, bfloat16, float32, got torch.int64; cast it first"),
    ("float64 logits", (_logits(4, 10, dtype=torch.float64), _targets(4)), {},
     TypeError, r"logits must be float16, bfloat16, float32"),
    ("logits not a tensor", ([[0.0, 1.0]], _targets(1)), {},
     TypeError, r"logits must be a torch.Tensor, got list"),
    ("empty vocabulary", (_logits(4, 0), _targets(4)), {},
     ValueError, r"non-empty vocabulary dimension V, got shape \(4, 0\)"),
    ("scalar logits", (torch.tensor(1.0, device=DEVICE), _targets()), {},
     ValueError, r"logits must have shape \[..., V\]"),
    ("float targets", (_logits(4, 10), torch.zeros(4, device=DEVICE)), {},
     TypeError, r"targets must be an integer tensor of token ids, got torch.float32; use targets.long\(\)"),
    ("bool targets", (_logits(4, 10), torch.zeros(4, dtype=torch.bool, device=DEVICE)), {},
     TypeError, r"targets must be an integer tensor"),
    ("targets not a tensor", (_logits(4, 10), [1, 2, 3, 4]), {},
     TypeError, r"targets must be a torch.Tensor of token ids, got list"),
    ("shape mismatch", (_logits(2, 5, 10), _targets(2, 4)), {},
     ValueError, r"targets has shape \(2, 4\) but must equal logits.shape\[:-1\] = \(2, 5\)"),
    ("targets with a vocab dim", (_logits(4, 10), _targets(4, 10)), {},
     ValueError, r"targets has shape \(4, 10\) but must equal logits.shape\[:-1\] = \(4,\)"),
    ("zero temperature", (_logits(4, 10), _targets(4)), {"temperature": 0},
     ValueError, TEMPERATURE + ", got 0"),
    ("negative temperature", (_logits(4, 10), _targets(4)), {"temperature": -1.0},
     ValueError, TEMPERATURE + ", got -1.0"),
    ("nan temperature", (_logits(4, 10), _targets(4)), {"temperature": float("nan")},
     ValueError, TEMPERATURE),
    # A tensor is one temperature per row (tests/test_errors_sampler.py), never a 0-d scalar.
    ("tensor temperature", (_logits(4, 10), _targets(4)), {"temperature": torch.tensor(1.0)},
     ValueError, r"temperature has shape \(\) but a tensor of temperatures must have one per row"),
    ("zero softcap", (_logits(4, 10), _targets(4)), {"softcap": 0.0},
     ValueError, SOFTCAP + ", got 0.0"),
    ("float ignore_index", (_logits(4, 10), _targets(4)), {"ignore_index": -100.0},
     TypeError, r"ignore_index must be an int, got -100.0"),
    ("non-bool return_entropy", (_logits(4, 10), _targets(4)), {"return_entropy": 1},
     TypeError, r"return_entropy must be True or False, got 1"),
]


@pytest.mark.parametrize("what,args,kwargs,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_with_a_clear_message(backend, what, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        fa.token_logprobs(*args, **kwargs)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU range check; CUDA reports NaN (layout tests)")
@pytest.mark.parametrize("bad_id", [10, 11, -1, -99])
def test_targets_outside_vocabulary(backend, bad_id):
    targets = _targets(2, 3)
    targets[1, 2] = bad_id
    targets[0, 0] = -100  # ignore_index is fine
    with pytest.raises(ValueError, match=(
            rf"targets holds 1 id\(s\) outside \[0, V=10\) that are not ignore_index=-100; "
            rf"the first is {bad_id} at position \(1, 2\). Mark positions without a target")):
        fa.token_logprobs(_logits(2, 3, 10), targets)


def test_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match=r"logits is on cuda:0 but targets is on cpu; move both"):
        fa.token_logprobs(_logits(4, 10), torch.zeros(4, dtype=torch.long))
