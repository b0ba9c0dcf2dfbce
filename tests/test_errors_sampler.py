"""Bad input to the sampler options (top_k, min_p, top_p) and per-row temperatures of
token_logprobs and linear_logprobs, and the combinations they refuse. Every message names the
argument and says what to do."""

import pytest
import torch
from conftest import DEVICE
from helpers import fake_deepspeed

import fastalign as fa


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _ids(*shape, high=10):
    return torch.randint(0, high, shape, device=DEVICE)


def _token(**kwargs):
    return fa.token_logprobs(_t(2, 3, 10), kwargs.pop("targets", _ids(2, 3)), **kwargs)


def _linear(**kwargs):
    return fa.linear_logprobs(_t(2, 3, 8), _t(10, 8), kwargs.pop("targets", _ids(2, 3)),
                              **kwargs)


TOP_P = (r"top_p=0.9 is not supported: exact top-p \(nucleus\) filtering needs each row's "
         r"probabilities sorted \(the cumulative mass up to each token\), which is not "
         r"expressible in at most two extra passes over the vocabulary; use min_p and/or top_k "
         r"instead \(top_p=None or 1.0 means no filtering\)")
ROWS = r"\(2, 3\) or \[N\] = \(6,\)"
BAD = [
    # (description, kwargs, exception, message pattern); each runs on both ops
    ("top_k zero", dict(top_k=0), ValueError, r"top_k must be None or an int >= 1 \(keep each "
     r"row's top_k most likely tokens, ties with the k-th kept\), got 0"),
    ("top_k float", dict(top_k=2.5), ValueError, r"top_k must be None or an int >= 1 .* got 2.5"),
    ("top_k bool", dict(top_k=True), ValueError, r"top_k must be None or an int >= 1 .* got True"),
    ("min_p zero", dict(min_p=0.0), ValueError,
     r"min_p must be None or a finite number in \(0, 1\] \(keep the tokens with "
     r"p >= min_p \* max p\), got 0.0"),
    ("min_p above one", dict(min_p=1.5), ValueError, r"min_p must be None .* got 1.5"),
    ("min_p nan", dict(min_p=float("nan")), ValueError, r"min_p must be None .* got nan"),
    ("top_p", dict(top_p=0.9), ValueError, TOP_P),
    ("top_p string", dict(top_p="0.9"), ValueError, r"top_p='0.9' is not supported"),
    ("temperature shape", dict(temperature=_t(3, 2).abs()), ValueError,
     r"temperature has shape \(3, 2\) but a tensor of temperatures must have one per row: "
     r"shape {source}.shape\[:-1\] = " + ROWS + r" \(pass a Python float for one temperature\)"),
    ("temperature int", dict(temperature=torch.ones(2, 3, dtype=torch.long, device=DEVICE)),
     TypeError, r"temperature must be a number or a floating-point tensor of one temperature "
     r"per row, got a torch.int64 tensor; use temperature.float\(\)"),
    ("temperature zero", dict(temperature=torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]],
                                                       device=DEVICE)),
     ValueError, r"temperature holds 1 value\(s\) outside \[1.18e-38, 8.51e\+37\] \(each "
     r"temperature and its reciprocal scale float32 values; temperatures are positive\); the "
     r"first is 0.0 at position \(0, 1\)"),
    ("temperature negative", dict(temperature=-torch.ones(6, device=DEVICE)), ValueError,
     r"temperature holds 6 value\(s\) outside .* the first is -1.0 at position \(0,\)"),
    ("temperature nan", dict(temperature=torch.full((6,), float("nan"), device=DEVICE)),
     ValueError, r"temperature holds 6 value\(s\) outside"),
    ("top_k with topk_targets", dict(targets=None, topk_targets=_ids(2, 3, 4), top_k=3),
     ValueError, r"top_k/min_p is not supported with topk_targets \(K ids per row\); pass one "
     r"target per row in targets"),
    ("row temperature with topk_targets",
     dict(targets=None, topk_targets=_ids(2, 3, 4), temperature=torch.ones(6, device=DEVICE)),
     ValueError, r"a per-row temperature tensor is not supported with topk_targets"),
]


@pytest.mark.parametrize("op,source", [(_token, "logits"), (_linear, "hidden")],
                         ids=["token_logprobs", "linear_logprobs"])
@pytest.mark.parametrize("what,kwargs,error,message", BAD, ids=[case[0] for case in BAD])
def test_bad_sampler_options(backend, op, source, what, kwargs, error, message):
    with pytest.raises(error, match=message.format(source=source)):
        op(**kwargs)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="a CPU tensor beside CUDA logits")
def test_temperature_on_another_device(monkeypatch):
    logits = torch.randn(2, 10, device="meta")
    with pytest.raises(ValueError, match=r"logits is on meta but temperature is on cpu; move "
                                         r"both to the same device"):
        fa.token_logprobs(logits, torch.zeros(2, dtype=torch.long, device="meta"),
                          temperature=torch.ones(2))


@pytest.mark.parametrize("options", [dict(min_p=0.1), dict(temperature=torch.ones(6))],
                         ids=["min_p", "row_temperature"])
def test_refused_beside_row_stats_and_sharded_heads(backend, monkeypatch, options):
    name = "top_k/min_p" if "min_p" in options else "a per-row temperature tensor"
    options = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    with pytest.raises(ValueError, match=f"{name} is not supported with return_row_stats=True; "
                                         "leave it False"):
        _linear(return_row_stats=True, **options)
    sharded = (rf"{name} is not supported on a sharded head \(process_group, DTensor or ZeRO-3 "
               r"weight\): the support's k-th value would need every rank's vocabulary; gather "
               r"the head or drop the option")
    with pytest.raises(ValueError, match=sharded):
        _linear(process_group=object(), **options)
    zero3 = fake_deepspeed(monkeypatch)
    weight = zero3.partition(torch.nn.Parameter(_t(10, 8)))
    with pytest.raises(ValueError, match=sharded):
        fa.linear_logprobs(_t(2, 3, 8), weight, _ids(2, 3), **options)
