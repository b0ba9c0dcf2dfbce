"""The random draws of the op fuzzer (tests/test_fuzz_ops.py): a ``Case`` (its seed, the choices
drawn, the flaws an invalid case must be refused for) and the inputs of a case: leading shapes,
values with special entries, memory layouts, targets, temperatures and soft caps, and the
flaws every op must refuse."""

import math
import random

import torch
from conftest import DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TINY_T, HUGE_T = torch.finfo(torch.float32).tiny, 0.999 / torch.finfo(torch.float32).tiny
INVALID_SCALES = [0.0, -1.0, float("nan"), float("inf"), 1e-39, 1e38, True]


class Case:
    def __init__(self, seed: int):
        self.seed = seed
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.info = {}
        self.expect = []  # (exception type, message regex) of each flaw an invalid case has

    def pick(self, name, options, weights=None):
        value = self.rng.choices(options, weights)[0]
        self.info[name] = value
        return value

    def invalid(self, error, pattern, what):
        """Records a flaw: the call must raise for it (or for another flaw it has)."""
        self.expect.append((error, pattern))
        self.info["invalid"] = self.info.get("invalid", ()) + (what,)

    def randn(self, *shape, dtype=torch.float64):
        return torch.randn(*shape, generator=self.gen, dtype=dtype)

    def __str__(self):
        return f"seed={self.seed} " + " ".join(f"{k}={v}" for k, v in self.info.items())


# ------------------------------------------------------------------------------- inputs

def leading_shape(case, small):
    ndim = case.pick("ndim", [0, 1, 2, 3], [1, 4, 4, 2])
    sizes = [0, 1, 2, 3, 5] if small else [0, 1, 2, 3, 5, 8, 13]
    weights = [1, 3, 4, 4, 3] if small else [1, 3, 4, 4, 3, 2, 2]
    shape = tuple(case.rng.choices(sizes, weights)[0] for _ in range(ndim))
    case.info["shape"] = shape
    return shape


SPECIALS = ("-inf", "+inf", "nan", "huge", "-huge", "-inf row", "-inf column")


def values(case, shape, dtype, name="", scales=(1e-3, 1.0, 4.0, 30.0, 1e3),
           offsets=(0.0, 0.0, 0.0, 100.0, -1e4, 1e6, -1e20, 3e38), specials=0.4,
           kinds=SPECIALS):
    """float64 values of ``shape`` that ``dtype`` holds, with specials sprinkled in."""
    big = torch.finfo(dtype).max
    scale = case.pick(f"{name}scale", list(scales))
    offset = case.pick(f"{name}offset", [o for o in offsets if abs(o) < big / 2])
    x = (case.randn(*shape) * scale + offset).clamp(-big / 2, big / 2)
    if x.numel() and case.rng.random() < specials:
        special = case.pick(f"{name}special", list(kinds))
        flat, rows = x.view(-1), x.view(-1, shape[-1])
        where = torch.randint(0, x.numel(), (max(1, x.numel() // 50),), generator=case.gen)
        value = {"-inf": -math.inf, "+inf": math.inf, "nan": math.nan, "huge": big / 2,
                 "-huge": -big / 2}.get(special)
        if special == "-inf row":
            rows[case.rng.randrange(rows.shape[0])] = -math.inf
        elif special == "-inf column":
            rows[:, case.rng.randrange(rows.shape[1])] = -math.inf
        else:
            flat[where] = value
    return x.to(dtype).double().to(DEVICE)  # exactly what the dtype holds


def layout(case, shape, vocab, small):
    """(storage shape, view function): the view of a storage tensor that has ``shape + (V,)``."""
    kinds = ["contiguous", "slice", "transpose", "expand", "vocab_stride", "overlap"]
    kind = case.pick("layout", kinds, [4, 2, 1, 1, 1, 1])
    full = (*shape, vocab)
    if kind == "slice" and shape:
        dim = case.rng.randrange(len(shape))
        storage = list(full)
        storage[dim] += 1
        return tuple(storage), lambda x: x.narrow(dim, 0, shape[dim])
    if kind == "transpose" and len(shape) >= 2:
        storage = list(full)
        storage[0], storage[1] = storage[1], storage[0]
        return tuple(storage), lambda x: x.transpose(0, 1)
    if kind == "expand" and shape and max(shape) > 1:
        dim = max(range(len(shape)), key=lambda d: shape[d])
        storage = list(full)
        storage[dim] = 1
        return tuple(storage), lambda x: x.expand(full)
    if kind == "vocab_stride":
        return (*shape, 2 * vocab), lambda x: x[..., ::2]
    if kind == "overlap" and len(shape) == 1 and shape[0] > 1:
        step = max(1, vocab // 2)
        storage = ((shape[0] - 1) * step + vocab,)
        return storage, lambda x: x.as_strided(full, (step, 1))
    case.info["layout"] = "contiguous"
    return full, lambda x: x


def targets_for(case, shape, vocab):
    targets = torch.randint(0, vocab, shape, generator=case.gen).to(DEVICE)
    ignore_index = case.pick("ignore_index", [-100, -100, -1, 0, vocab])
    share = case.pick("ignored", [0.0, 0.3, 1.0], [3, 2, 1])
    ignored = (torch.rand(shape, generator=case.gen) < share).to(DEVICE)
    targets = targets.masked_fill(ignored, ignore_index)
    if targets.numel() and case.rng.random() < 0.05:
        targets.view(-1)[0] = vocab + 3
        if vocab + 3 != ignore_index and DEVICE.type == "cpu":
            case.invalid(ValueError, r"targets holds 1 id\(s\) outside \[0, V=", "target id")
    if case.rng.random() < 0.03:
        case.invalid(TypeError, r"targets must be an integer tensor", "float targets")
        return targets.float(), ignore_index
    return targets.to(case.pick("target_dtype", [torch.int64, torch.int32], [4, 1])), ignore_index


def temperature_and_softcap(case, exact_logits, with_softcap=True):
    """Options at their edges. A tiny T amplifies every rounding of a computed logit (a
    matmul's, a softcap's) by up to 8.5e37, past any tolerance, and makes gradients of ~1 / T
    that fp16 cannot hold and sums of them (expanded rows) overflow: it is drawn only for exact
    logits (raw ones, without a softcap), whose callers exclude those cases; not for the KL,
    whose gradient is ~1 / T^2."""
    choices = [1.0, 1.0, 0.7, 3.0, HUGE_T, "invalid"] + ([TINY_T, 1e-3] if exact_logits else [])
    temperature = case.pick("temperature", choices)
    if temperature == "invalid":
        temperature = case.pick("temperature", INVALID_SCALES)
        case.invalid(ValueError, r"temperature must be a finite number in \[1.18e-38", "T")
    softcap = None
    if with_softcap:
        softcap = case.pick("softcap", [None, None, 30.0, 1.0, 1e-3, 1e4, "invalid"])
        if softcap == "invalid":
            softcap = case.pick("softcap", INVALID_SCALES)
            case.invalid(ValueError, r"softcap must be None or a finite number in", "softcap")
        elif softcap is not None and temperature in (TINY_T, 1e-3):
            softcap = None
            case.info["softcap"] = None
    return temperature, softcap


def common_flaws(case, args, kwargs, tensor_name):
    """Flaws every op must refuse: integer inputs, an unknown option type."""
    roll = case.rng.random()
    if roll < 0.03:
        args[0] = args[0].detach().long()
        case.invalid(TypeError, rf"{tensor_name} must be float16, bfloat16, float32", "int input")
    elif roll < 0.05 and "ignore_index" in kwargs:
        kwargs["ignore_index"] = float(kwargs["ignore_index"])
        case.invalid(TypeError, r"ignore_index must be an int", "float ignore_index")


# ---------------------------------------------------------------------------- the ops
