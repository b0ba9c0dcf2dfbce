"""Bad input to token_divergence and linear_divergence: every message names the argument and
says what to do (their option ranges are in test_errors_options.py)."""

import pytest
import torch
from conftest import DEVICE

import fastalign as fa


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


TOKEN = [
    ("teacher shape", (_t(2, 3, 10), _t(2, 3, 11)), {},
     ValueError, r"teacher_logits has shape \(2, 3, 11\) but must equal logits.shape = "
                 r"\(2, 3, 10\)"),
    ("integer teacher", (_t(2, 10), torch.ones(2, 10, dtype=torch.long, device=DEVICE)), {},
     TypeError, r"teacher_logits must be float16, bfloat16, float32, got torch.int64"),
    ("float64 logits", (_t(2, 10, dtype=torch.float64), _t(2, 10)), {},
     TypeError, r"logits must be float16, bfloat16, float32, got torch.float64"),
    ("mask dtype", (_t(2, 10), _t(2, 10)), {"mask": torch.ones(2, device=DEVICE)},
     TypeError, r"mask must be a bool tensor \(True = compute this position\), got torch.float32"),
    ("mask shape", (_t(2, 10), _t(2, 10)), {"mask": torch.ones(3, dtype=torch.bool, device=DEVICE)},
     ValueError, r"mask has shape \(3,\) but must equal logits.shape\[:-1\] = \(2,\)"),
    ("return_entropy", (_t(2, 10), _t(2, 10)), {"return_entropy": 1},
     TypeError, r"return_entropy must be True or False, got 1"),
]

LINEAR = [
    ("vocabulary mismatch", (_t(4, 8), _t(10, 8), _t(4, 6), _t(11, 6)), {},
     ValueError, r"teacher_weight has 11 vocabulary rows but weight has 10; both models must "
                 r"share one vocabulary"),
    ("teacher rows", (_t(4, 8), _t(10, 8), _t(5, 6), _t(10, 6)), {},
     ValueError, r"teacher_hidden has leading shape \(5,\) but must equal hidden.shape\[:-1\] = "
                 r"\(4,\)"),
    ("teacher width", (_t(4, 8), _t(10, 8), _t(4, 6), _t(10, 5)), {},
     ValueError, r"teacher_weight must have shape \[V, D\] with D = teacher_hidden.shape\[-1\] = 6"),
    ("teacher bias", (_t(4, 8), _t(10, 8), _t(4, 6), _t(10, 6)), {"teacher_bias": _t(3)},
     ValueError, r"teacher_bias must have shape \[V\] = \(10,\), got \(3,\)"),
    ("student bias", (_t(4, 8), _t(10, 8), _t(4, 6), _t(10, 6)), {"bias": _t(11)},
     ValueError, r"bias must have shape \[V\] = \(10,\), got \(11,\)"),
    ("integer teacher hidden", (_t(4, 8), _t(10, 8), torch.ones(4, 6, dtype=torch.long,
                                                             device=DEVICE), _t(10, 6)), {},
     TypeError, r"teacher_hidden must be float16, bfloat16, float32, got torch.int64"),
    ("mask shape", (_t(4, 8), _t(10, 8), _t(4, 6), _t(10, 6)),
     {"mask": torch.ones(2, 2, dtype=torch.bool, device=DEVICE)},
     ValueError, r"mask has shape \(2, 2\) but must equal hidden.shape\[:-1\] = \(4,\)"),
    ("process_group", (_t(4, 8), _t(10, 8), _t(4, 6), _t(10, 6)), {"process_group": "tp"},
     TypeError, r"process_group must be a torch.distributed ProcessGroup \(e.g. dist.group.WORLD"),
]

CASES = ([(fa.token_divergence, *c) for c in TOKEN]
         + [(fa.linear_divergence, *c) for c in LINEAR])


@pytest.mark.parametrize("op,what,args,kwargs,error,message", CASES,
                         ids=[f"{c[0].__name__}-{c[1]}" for c in CASES])
def test_bad_input_is_rejected_with_a_clear_message(op, what, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        op(*args, **kwargs)
