"""Bad input to linear_logprobs, token_kl and linear_kl: every message names the argument and
says what to do (token_logprobs' own cases are in test_errors.py)."""

import pytest
import torch
from conftest import DEVICE

import fastalign as fa


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _ids(*shape, high=10):
    return torch.randint(0, high, shape, device=DEVICE)


LINEAR_LOGPROBS = [
    ("integer hidden", (torch.ones(4, 8, dtype=torch.long, device=DEVICE), _t(10, 8), _ids(4)),
     {}, TypeError, r"hidden must be float16, bfloat16, float32, got torch.int64"),
    ("weight not 2-D", (_t(4, 8), _t(10, 8, 1), _ids(4)), {},
     ValueError, r"weight must have shape \[V, D\] with D = hidden.shape\[-1\] = 8 .* got \(10, 8, 1\)"),
    ("weight width", (_t(4, 8), _t(10, 7), _ids(4)), {},
     ValueError, r"weight must have shape \[V, D\] with D = hidden.shape\[-1\] = 8"),
    ("transposed weight", (_t(4, 8), _t(8, 10), _ids(4)), {},
     ValueError, r"weight must have shape \[V, D\].*as nn.Linear stores it.*got \(8, 10\)"),
    ("bias shape", (_t(4, 8), _t(10, 8), _ids(4)), {"bias": _t(9)},
     ValueError, r"bias must have shape \[V\] = \(10,\), got \(9,\)"),
    ("integer bias", (_t(4, 8), _t(10, 8), _ids(4)), {"bias": _ids(10)},
     TypeError, r"bias must be float16, bfloat16, float32, got torch.int64"),
    ("targets shape", (_t(2, 3, 8), _t(10, 8), _ids(2, 4)), {},
     ValueError, r"targets has shape \(2, 4\) but must equal hidden.shape\[:-1\] = \(2, 3\)"),
    ("float targets", (_t(4, 8), _t(10, 8), _t(4)), {},
     TypeError, r"targets must be an integer tensor of token ids"),
    ("temperature", (_t(4, 8), _t(10, 8), _ids(4)), {"temperature": 0.0},
     ValueError, r"temperature must be a finite number in \[1.18e-38, 8.51e\+37\] \(it and its "
     r"reciprocal scale float32 values\), got (0.0|inf)"),
    ("softcap", (_t(4, 8), _t(10, 8), _ids(4)), {"softcap": -1.0},
     ValueError, r"softcap must be None or a finite number in \[1.18e-38, 8.51e\+37\].*, got -1.0"),
    ("empty hidden dimension", (_t(4, 0), _t(10, 0), _ids(4)), {},
     ValueError, r"hidden must have shape \[..., D\] with a non-empty hidden dimension D, got "
     r"shape \(4, 0\)"),
    ("process_group", (_t(4, 8), _t(10, 8), _ids(4)), {"process_group": "tp"},
     TypeError, r"process_group must be a torch.distributed ProcessGroup \(e.g. dist.group.WORLD"),
]

if DEVICE.type == "cpu":  # CUDA skips this check unless FASTALIGN_CHECK_TARGETS=1 (NaN rows)
    LINEAR_LOGPROBS.append(
        ("target past V", (_t(4, 8), _t(10, 8), torch.tensor([1, 2, 10, 3], device=DEVICE)), {},
         ValueError, r"targets holds 1 id\(s\) outside \[0, V=10\)"))

TOKEN_KL = [
    ("ref shape", (_t(2, 3, 10), _t(2, 3, 11)), {},
     ValueError, r"ref_logits has shape \(2, 3, 11\) but must equal logits.shape = \(2, 3, 10\)"),
    ("integer ref", (_t(2, 10), torch.ones(2, 10, dtype=torch.long, device=DEVICE)), {},
     TypeError, r"ref_logits must be float16, bfloat16, float32"),
    ("mask dtype", (_t(2, 10), _t(2, 10)), {"mask": torch.ones(2, device=DEVICE)},
     TypeError, r"mask must be a bool tensor \(True = compute this position\), got torch.float32"),
    ("mask shape", (_t(2, 10), _t(2, 10)), {"mask": torch.ones(3, dtype=torch.bool, device=DEVICE)},
     ValueError, r"mask has shape \(3,\) but must equal logits.shape\[:-1\] = \(2,\)"),
    ("temperature", (_t(2, 10), _t(2, 10)), {"temperature": float("inf")},
     ValueError, r"temperature must be a finite number in \[1.18e-38, 8.51e\+37\] \(it and its "
     r"reciprocal scale float32 values\), got (0.0|inf)"),
]

LINEAR_KL = [
    ("vocabulary mismatch", (_t(4, 8), _t(10, 8), _t(4, 6), _t(11, 6)), {},
     ValueError, r"ref_weight has 11 vocabulary rows but weight has 10; both models must share"),
    ("ref rows", (_t(4, 8), _t(10, 8), _t(5, 6), _t(10, 6)), {},
     ValueError, r"ref_hidden has leading shape \(5,\) but must equal hidden.shape\[:-1\] = \(4,\)"),
    ("ref width", (_t(4, 8), _t(10, 8), _t(4, 6), _t(10, 5)), {},
     ValueError, r"ref_weight must have shape \[V, D\] with D = ref_hidden.shape\[-1\] = 6"),
    ("ref bias", (_t(4, 8), _t(10, 8), _t(4, 6), _t(10, 6)), {"ref_bias": _t(3)},
     ValueError, r"ref_bias must have shape \[V\] = \(10,\), got \(3,\)"),
    ("mask shape", (_t(4, 8), _t(10, 8), _t(4, 6), _t(10, 6)),
     {"mask": torch.ones(2, 2, dtype=torch.bool, device=DEVICE)},
     ValueError, r"mask has shape \(2, 2\) but must equal hidden.shape\[:-1\] = \(4,\)"),
]

CASES = ([(fa.linear_logprobs, *c) for c in LINEAR_LOGPROBS] + [(fa.token_kl, *c) for c in TOKEN_KL]
         + [(fa.linear_kl, *c) for c in LINEAR_KL])


@pytest.mark.parametrize("op,what,args,kwargs,error,message", CASES,
                         ids=[f"{c[0].__name__}-{c[1]}" for c in CASES])
def test_bad_input_is_rejected_with_a_clear_message(op, what, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        op(*args, **kwargs)
