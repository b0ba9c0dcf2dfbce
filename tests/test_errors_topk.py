"""Bad input to the top-k paths: topk_targets of token_logprobs and linear_logprobs, and
fastalign.losses.topk_divergence. Every message names the argument and says what to do."""

import pytest
import torch
from conftest import DEVICE

import fastalign as fa
from fastalign.losses import topk_divergence


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _ids(*shape, high=10):
    return torch.randint(0, high, shape, device=DEVICE)


def _token(*args, **kwargs):
    return fa.token_logprobs(_t(2, 3, 10), *args, **kwargs)


def _linear(*args, **kwargs):
    return fa.linear_logprobs(_t(2, 3, 8), _t(10, 8), *args, **kwargs)


TOPK_SHAPE = (r"topk_targets has shape {got} but must be \[\.\.\., K\] with \[\.\.\.\] = "
              r"{source}.shape\[:-1\] = \(2, 3\) and K >= 1 \(K token ids per row of {source}\); "
              r"one id per row goes in targets")
BAD_TOPK = [
    # (description, args, kwargs, exception, message pattern); each runs on both ops
    ("neither targets", (), {}, TypeError,
     r"pass exactly one of targets \(\[\.\.\.\]: one token id per row\) and topk_targets "
     r"\(\[\.\.\., K\]: K token ids per row\), got neither"),
    ("both targets", (_ids(2, 3),), {"topk_targets": _ids(2, 3, 4)}, TypeError,
     r"pass exactly one of targets .* got both"),
    ("one id per row as topk", (), {"topk_targets": _ids(2, 3)}, ValueError,
     TOPK_SHAPE.format(got=r"\(2, 3\)", source="{source}")),
    ("rows mismatch", (), {"topk_targets": _ids(2, 4, 5)}, ValueError,
     TOPK_SHAPE.format(got=r"\(2, 4, 5\)", source="{source}")),
    ("empty K", (), {"topk_targets": _ids(2, 3, 0)}, ValueError,
     TOPK_SHAPE.format(got=r"\(2, 3, 0\)", source="{source}")),
    ("float topk", (), {"topk_targets": _t(2, 3, 4)}, TypeError,
     r"topk_targets must be an integer tensor of token ids, got torch.float32; "
     r"use topk_targets.long\(\)"),
    ("topk not a tensor", (), {"topk_targets": [[1, 2]]}, TypeError,
     r"topk_targets must be a torch.Tensor of token ids, got list"),
    ("K ids as targets", (_ids(2, 3, 4),), {}, ValueError,
     r"targets has shape \(2, 3, 4\) but must equal {source}.shape\[:-1\] = \(2, 3\) "
     r"\(one target id per row of {source}\); K ids per row go in topk_targets"),
]


@pytest.mark.parametrize("op,source", [(_token, "logits"), (_linear, "hidden")],
                         ids=["token_logprobs", "linear_logprobs"])
@pytest.mark.parametrize("what,args,kwargs,error,message", BAD_TOPK,
                         ids=[case[0] for case in BAD_TOPK])
def test_bad_topk_targets(backend, op, source, what, args, kwargs, error, message):
    with pytest.raises(error, match=message.format(source=source)):
        op(*args, **kwargs)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU range check; CUDA reports NaN")
@pytest.mark.parametrize("op", [_token, _linear], ids=["token_logprobs", "linear_logprobs"])
@pytest.mark.parametrize("bad_id", [10, -1])
def test_topk_ids_outside_vocabulary(backend, op, bad_id):
    ids = _ids(2, 3, 4)
    ids[1, 2, 3] = bad_id
    ids[0, 0, 1] = -100  # ignore_index is fine
    with pytest.raises(ValueError, match=(
            rf"topk_targets holds 1 id\(s\) outside \[0, V=10\) that are not ignore_index=-100; "
            rf"the first is {bad_id} at position \(1, 2, 3\)")):
        op(topk_targets=ids)


def test_row_stats_take_one_target_per_row():
    with pytest.raises(ValueError, match=r"return_row_stats=True takes one target per row "
                                         r"\(targets=\); with topk_targets leave it False"):
        _linear(topk_targets=_ids(2, 3, 4), return_row_stats=True)


BAD_DIVERGENCE = [
    ("shape mismatch", (_t(2, 4), _t(2, 5)), {}, ValueError,
     r"teacher_topk_logps has shape \(2, 5\) but student_topk_logps has \(2, 4\); they must "
     r"match \(log-probs of the teacher's K tokens, \[\.\.\., K\]\)"),
    ("integer student", (_ids(2, 4), _t(2, 4)), {}, TypeError,
     r"student_topk_logps must be a floating-point tensor of log-probs"),
    ("list teacher", (_t(2, 4), [[0.0] * 4] * 2), {}, TypeError,
     r"teacher_topk_logps must be a floating-point tensor of log-probs .*, got list"),
    ("scalar", (_t(1)[0], _t(1)[0]), {}, ValueError,
     r"student_topk_logps must have shape \[\.\.\., K\] with K >= 1, got shape \(\)"),
    ("empty K", (_t(2, 0), _t(2, 0)), {}, ValueError,
     r"student_topk_logps must have shape \[\.\.\., K\] with K >= 1, got shape \(2, 0\)"),
    ("negative beta", (_t(2, 4), _t(2, 4)), {"beta": -0.1}, ValueError,
     r"beta must be a finite number in \[0, 1\] \(0: forward KL, 1: reverse KL, between: "
     r"generalized JSD\), got -0.1"),
    ("beta above 1", (_t(2, 4), _t(2, 4)), {"beta": 1.5}, ValueError, r"beta must be .* got 1.5"),
    ("nan beta", (_t(2, 4), _t(2, 4)), {"beta": float("nan")}, ValueError, r"beta must be"),
    ("tail not a flag", (_t(2, 4), _t(2, 4)), {"tail": 1}, TypeError,
     r"tail must be True or False, got 1"),
    ("mask not bool", (_t(2, 4), _t(2, 4)), {"mask": torch.ones(2, device=DEVICE)}, TypeError,
     r"mask must be a bool tensor"),
    ("mask shape", (_t(2, 4), _t(2, 4)),
     {"mask": torch.ones(2, 4, dtype=torch.bool, device=DEVICE)}, ValueError,
     r"mask has shape \(2, 4\) but must equal student_topk_logps.shape\[:-1\] = \(2,\)"),
]


@pytest.mark.parametrize("what,args,kwargs,error,message", BAD_DIVERGENCE,
                         ids=[case[0] for case in BAD_DIVERGENCE])
def test_bad_topk_divergence_input(what, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        topk_divergence(*args, **kwargs)
