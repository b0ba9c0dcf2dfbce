"""linear_logprobs, linear_kl, linear_divergence and FusedPolicyLoss on the sharded lm_heads TRL / Accelerate users
bring (fastalign/ops/_sharded_head.py), against the unsharded op in float32:

* an FSDP2 head (fully_shard: DTensor Shard(0)) under data parallelism, each rank its own rows:
  the head's gradient is the average over ranks of each rank's unsharded gradient;
* a vocabulary-parallel DTensor head (hidden replicated, weight Shard(0) on one 1-D mesh);
* a DeepSpeed ZeRO-3 head, through a fake ``deepspeed`` (tests/helpers.py::FakeZero3);
* every layout that is refused, by its message.

The DTensor checks share one spawned 2-rank gloo group; V = 37 gives uneven shards (19 + 18).
"""

import importlib
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import fake_deepspeed

import fastalign as fa
from fastalign.ops import _sharded_head

WORLD_SIZE = 2
N, D, V = 7, 16, 37
TOL = dict(rtol=1e-5, atol=1e-6)


def _head(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(V, D, generator=gen) * 0.5, torch.randn(V, generator=gen)


def _rows(rank):
    """Each rank's own hidden rows, targets (one ignored), mask, advantages, old log-probs."""
    gen = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(N, D, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[rank + 1] = -100
    mask = torch.rand(N, generator=gen) > 0.3
    return hidden, targets, mask, torch.randn(N, generator=gen), -torch.rand(N, generator=gen)


def _grads(fn, inputs):
    """``fn``'s outputs and the gradients of a fixed weighting of them w.r.t. ``inputs``."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((o.float() * (i + 1.5)).sum() for i, o in enumerate(outputs))
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outputs], list(grads)


def _plain(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _ref_hidden(rank):
    return torch.randn(N, D, generator=torch.Generator().manual_seed(200 + rank))


def _cases(ref_weight, ref_bias):
    """name -> ``fn(rank, hidden, weight, bias)``: the op on that rank's rows (targets, mask,
    advantages from ``_rows(rank)``), the reference head given."""
    def logprobs(rank, h, w, b):
        return fa.linear_logprobs(h, w, _rows(rank)[1], bias=b, return_entropy=True,
                                  temperature=0.9, softcap=5.0)

    def kl(rank, h, w, b):
        return fa.linear_kl(h, w, _ref_hidden(rank), ref_weight, bias=b, ref_bias=ref_bias,
                            mask=_rows(rank)[2], temperature=1.1)

    def jsd(rank, h, w, b):
        return fa.linear_divergence(h, w, _ref_hidden(rank), ref_weight, bias=b,
                                    teacher_bias=ref_bias, mask=_rows(rank)[2], beta=0.3,
                                    softcap=5.0, return_entropy=True)

    def policy(rank, h, w, b):
        _, targets, _, advantages, old = _rows(rank)
        loss, metrics = fa.FusedPolicyLoss()(h[None], w, targets[None], advantages[None],
                                             bias=b, old_logprobs=old[None])
        return loss, metrics["entropy"]
    return {"linear_logprobs": logprobs, "linear_kl": kl, "linear_divergence": jsd,
            "FusedPolicyLoss": policy}


def _close(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert type(a) is torch.Tensor, f"{what} [{i}] is a {type(a).__name__}"
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"{what} [{i}]: {m}")


def _spawn(worker, tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"),), nprocs=WORLD_SIZE, join=True)


def _init(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (WORLD_SIZE,))


# ------------------------------------------------------------------ FSDP2, data parallel

def _data_parallel_checks(rank, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    weight, bias = _head(0)
    ref_weight, ref_bias = _head(1)
    sharded_ref = [distribute_tensor(x, mesh, [Shard(0)]) for x in (ref_weight, ref_bias)]
    plain_cases = _cases(ref_weight, ref_bias)
    for name, fn in _cases(*sharded_ref).items():
        linear = torch.nn.Linear(D, V)
        with torch.no_grad():
            linear.weight.copy_(weight), linear.bias.copy_(bias)
        fully_shard(linear, mesh=mesh)
        assert linear.weight.to_local().shape[0] == (19, 18)[rank]  # uneven shards
        hidden = _rows(rank)[0].requires_grad_()
        outputs, (grad_hidden, grad_weight, grad_bias) = _grads(
            lambda h, w, b: fn(rank, h, w, b), [hidden, linear.weight, linear.bias])
        per_rank = [_grads(lambda h, w, b: plain_cases[name](r, h, w, b),
                           _plain(_rows(r)[0], weight, bias)) for r in range(WORLD_SIZE)]
        expected_outputs, (expected_hidden, _, _) = per_rank[rank]
        _close(outputs, expected_outputs, f"{name} outputs")
        _close([grad_hidden], [expected_hidden], f"{name} hidden grad")
        average = [sum(grads[i] for _, grads in per_rank) / WORLD_SIZE for i in (1, 2)]
        _close([grad_weight.full_tensor(), grad_bias.full_tensor()], average,
               f"{name} head grads (the average over ranks)")
        # Ranks with different rows: the average is not this rank's own gradient.
        assert not torch.allclose(average[0], per_rank[rank][1][1], **TOL)


# ------------------------------------------------------- vocabulary parallel, refused layouts

def _vocab_parallel_checks(rank, mesh):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    lp_module = importlib.import_module("fastalign.ops.linear_logprobs")  # not the function
    weight, bias = _head(0)
    ref_weight, ref_bias = _head(1)
    hidden, targets, mask = _rows(0)[:3]  # every rank the same rows

    def dt(x, placement, grad=True, on=mesh):
        return distribute_tensor(x, on, [placement]).requires_grad_(grad)

    groups = []
    real_op = lp_module._linear_logprobs

    def spy(*args, process_group, **kwargs):
        groups.append(process_group)
        return real_op(*args, process_group=process_group, **kwargs)
    lp_module._linear_logprobs = spy
    plain_cases = _cases(ref_weight, ref_bias)
    sharded_refs = {"linear_logprobs": plain_cases["linear_logprobs"],
                    "linear_kl": lambda _, h, w, b: fa.linear_kl(
                        h, w, dt(_ref_hidden(0), Replicate(), False),
                        dt(ref_weight, Shard(0), False), bias=b,
                        ref_bias=dt(ref_bias, Shard(0), False),
                        mask=distribute_tensor(mask, mesh, [Replicate()]), temperature=1.1),
                    "linear_logprobs, DTensor targets": lambda _, h, w, b: fa.linear_logprobs(
                        h, w, distribute_tensor(targets, mesh, [Replicate()]), bias=b,
                        return_entropy=True, temperature=0.9, softcap=5.0)}
    for name, fn in sharded_refs.items():
        inputs = [dt(hidden, Replicate()), dt(weight, Shard(0)), dt(bias, Shard(0))]
        groups.clear()
        outputs, grads = _grads(lambda h, w, b: fn(0, h, w, b), inputs)
        if name.startswith("linear_logprobs"):
            # It ran on the local shards over the mesh's group, never gathering the weight.
            assert groups and all(g is mesh.get_group() for g in groups), groups
        plain = plain_cases[name.split(",")[0]]
        expected_outputs, expected_grads = _grads(lambda h, w, b: plain(0, h, w, b),
                                                  _plain(hidden, weight, bias))
        _close(outputs, expected_outputs, f"vocabulary-parallel {name} outputs")
        assert [g.placements for g in grads] == [(Replicate(),), (Shard(0),), (Shard(0),)]
        _close([g.full_tensor() for g in grads], expected_grads,
               f"vocabulary-parallel {name} grads")
    lp_module._linear_logprobs = real_op

    h_rep, w_shard, b_shard = dt(hidden, Replicate()), dt(weight, Shard(0)), dt(bias, Shard(0))
    w_partial = torch.distributed.tensor.DTensor.from_local(weight / 2, mesh, [Partial()])
    # The same ranks under a dimension name: another mesh (no new process group).
    other_mesh = init_device_mesh("cpu", (WORLD_SIZE,), mesh_dim_names=("tp",))
    refused = [
        (lambda: fa.linear_logprobs(hidden, w_shard, targets, process_group=dist.group.WORLD),
         ValueError, r"process_group was given with a DTensor weight.*process_group=None"),
        (lambda: fa.linear_logprobs(hidden, w_partial, targets),
         ValueError, r"weight is a DTensor with placements \(Partial\(sum\),\).*redistribute"),
        (lambda: fa.linear_logprobs(dt(hidden, Shard(0)), w_shard, targets),
         ValueError, r"hidden is a DTensor with placements \(Shard\(dim=0\),\).*only "
                     r"replicated.*plain tensor \(data parallel\)"),
        (lambda: fa.linear_logprobs(h_rep, dt(weight, Shard(0), on=other_mesh), targets),
         ValueError, r"hidden and weight are DTensors on different device meshes"),
        (lambda: fa.linear_logprobs(h_rep, weight, targets),
         TypeError, r"hidden is a DTensor but weight is a plain tensor"),
        (lambda: fa.linear_logprobs(h_rep, dt(weight, Replicate()), targets),
         ValueError, r"weight is a DTensor with placements \(Replicate\(\),\).*must be "
                     r"Shard\(0\) on a 1-D mesh"),
        (lambda: fa.linear_logprobs(hidden, w_shard, targets, bias=bias),
         TypeError, r"bias is a plain tensor but weight is a DTensor.*both sharded"),
        (lambda: fa.linear_logprobs(hidden, weight, targets, bias=b_shard),
         TypeError, r"bias is a DTensor but weight is a plain tensor"),
        (lambda: fa.linear_logprobs(hidden, w_shard, targets, bias=dt(bias, Replicate())),
         ValueError, r"bias is a DTensor with placements \(Replicate\(\),\).*shard the "
                     r"head's bias like its weight"),
        (lambda: fa.linear_logprobs(hidden, w_shard,
                                    distribute_tensor(targets, mesh, [Replicate()])),
         TypeError, r"targets is a DTensor but hidden is a plain tensor"),
        (lambda: fa.linear_logprobs(h_rep, w_shard,
                                    distribute_tensor(targets[:6], mesh, [Shard(0)])),
         ValueError, r"targets is a DTensor with placements \(Shard\(dim=0\),\).*must be "
                     r"replicated on hidden's mesh"),
        (lambda: fa.linear_kl(hidden, w_shard, dt(hidden, Replicate(), False), weight),
         TypeError, r"ref_hidden is a DTensor but hidden is a plain tensor"),
        (lambda: fa.linear_kl(hidden, weight, hidden, w_partial),
         ValueError, r"ref_weight is a DTensor with placements \(Partial\(sum\),\)"),
        (lambda: fa.linear_kl(hidden, weight, hidden, w_shard, ref_bias=ref_bias),
         TypeError, r"ref_bias is a plain tensor but ref_weight is a DTensor"),
        (lambda: fa.linear_divergence(hidden, weight, hidden, w_shard, teacher_bias=ref_bias),
         TypeError, r"teacher_bias is a plain tensor but teacher_weight is a DTensor"),
        (lambda: fa.linear_divergence(hidden, w_shard, hidden, weight,
                                      process_group=dist.group.WORLD),
         ValueError, r"process_group was given with a DTensor weight"),
        (lambda: fa.linear_kl(dt(hidden, Shard(0)), w_shard, hidden, weight),
         ValueError, r"hidden is a DTensor with placements \(Shard\(dim=0\),\)"),
    ]
    for i, (call, error, message) in enumerate(refused):
        with pytest.raises(error, match=message):
            call()


def _worker(rank, init_file):
    mesh = _init(rank, init_file)
    try:
        _data_parallel_checks(rank, mesh)
        _vocab_parallel_checks(rank, mesh)  # last: it replaces an op with a spy
        dist.barrier()  # no rank tears gloo down while the other is in the last collective
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_data_parallel_and_vocabulary_parallel_heads_and_refused_layouts(tmp_path):
    """One 2-rank group (a spawn costs ~10 s of start-up): an FSDP2 head under data
    parallelism averages its gradient over ranks; a Shard(0) head beside a replicated hidden
    runs vocabulary-parallel; the other layouts are refused by name."""
    _spawn(_worker, tmp_path)


# ------------------------------------------------------------------------ DeepSpeed ZeRO-3

def _zero3_head(fake, *tensors):
    return [fake.partition(torch.nn.Parameter(t.clone())) for t in tensors]


@pytest.mark.parametrize("name", ["linear_logprobs", "linear_kl", "linear_divergence",
                                  "FusedPolicyLoss"])
def test_zero3_head_is_gathered_in_forward_and_backward(monkeypatch, name):
    """One gather in forward, one in backward (the weight is empty outside both), and the
    outputs and hidden / weight / bias gradients of the unpartitioned op."""
    fake = fake_deepspeed(monkeypatch)
    weight, bias = _head(0)
    ref_weight, ref_bias = _head(1)
    zero3_ref = _zero3_head(fake, ref_weight, ref_bias)
    fn = _cases(*zero3_ref)[name]
    w, b = _zero3_head(fake, weight, bias)
    hidden = _rows(0)[0].requires_grad_()
    outputs = fn(0, hidden, w, b)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert fake.enters == 1 and w.numel() == 0 and b.numel() == 0
    sum((o.float() * (i + 1.5)).sum() for i, o in enumerate(outputs)).backward()
    assert fake.enters == 2 and w.numel() == 0 and zero3_ref[0].numel() == 0
    expected_outputs, expected_grads = _grads(
        lambda h, w, b: _cases(ref_weight, ref_bias)[name](0, h, w, b),
        _plain(hidden, weight, bias))
    _close([o.detach() for o in outputs], expected_outputs, f"{name} outputs")
    _close([hidden.grad, w.grad, b.grad], expected_grads, f"{name} grads")


def test_zero3_row_stats_and_a_frozen_head(monkeypatch):
    """return_row_stats comes back as linear_logprobs' dict; a frozen ZeRO-3 head gets no
    gradient and is released (empty) once backward has run."""
    fake = fake_deepspeed(monkeypatch)
    weight, bias = _head(0)
    w, b = _zero3_head(fake, weight, bias)
    w.requires_grad_(False)
    hidden, targets = _rows(0)[:2]
    hidden.requires_grad_()
    lp, stats = fa.linear_logprobs(hidden, w, targets, bias=b, return_row_stats=True)
    expected_lp, expected_stats = fa.linear_logprobs(hidden, weight, targets, bias=bias,
                                                     return_row_stats=True)
    _close([lp.detach(), *stats.values()], [expected_lp.detach(), *expected_stats.values()],
           "row stats")
    lp.sum().backward()
    assert w.grad is None and b.grad is not None and w.numel() == 0 and fake.enters == 2
    (expected_grad,) = torch.autograd.grad(expected_lp.sum(), hidden)
    _close([hidden.grad], [expected_grad], "hidden grad")


def test_zero3_backward_without_the_regather_would_fail(monkeypatch):
    """The fused backward reads the weight again: with GatheredParameters doing nothing in
    backward, it finds ZeRO-3's empty tensor."""
    fake = fake_deepspeed(monkeypatch)
    (w,) = _zero3_head(fake, _head(0)[0])
    hidden, targets = _rows(0)[:2]
    lp = fa.linear_logprobs(hidden.requires_grad_(), w, targets)
    assert w.numel() == 0
    import contextlib
    monkeypatch.setattr(fake.zero, "GatheredParameters",
                        staticmethod(lambda params, modifier_rank=None: contextlib.nullcontext()))
    with pytest.raises(ValueError, match=r"weight must have shape .*got shape \(0,\)"):
        lp.sum().backward()


def test_zero3_parameter_without_deepspeed_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    w = torch.nn.Parameter(torch.empty(0))
    w.ds_id = 0
    with pytest.raises(TypeError, match="weight: DeepSpeed ZeRO-3 partitioned.*cannot be "
                                        "imported.*install deepspeed"):
        fa.linear_logprobs(torch.randn(N, D), w, torch.zeros(N, dtype=torch.long))


def test_plain_tensors_take_the_fast_path():
    plain = [torch.randn(3), torch.nn.Parameter(torch.randn(3)), None]
    assert _sharded_head.is_plain(*plain)
    zero3 = torch.nn.Parameter(torch.randn(3))
    zero3.ds_id = 7
    assert not _sharded_head.is_plain(*plain, zero3)
