"""The one way an op family registers its ``torch.library`` custom ops: scalar options are
declared once, as schema text, and the op's schema, its fake, its autograd context and the
``None`` gradients of its options all come from that one declaration. ``torch.compile`` then sees
each op as one opaque node (the fake gives its shapes), with no graph break.

    OPTIONS = Options("TokenLogprobsOptions", "float inv_temperature, float? softcap, str backend")

    @fused_op("fastalign::token_logprobs_forward", OPTIONS,
              tensors="Tensor logits, Tensor targets", returns="(Tensor, Tensor)")
    def _forward(logits, targets, o):              # o.inv_temperature, o.softcap, o.backend
        ...

    @_forward.register_fake
    def _(logits, targets, o): ...                 # same arguments, shapes only

    _forward.register_autograd(setup, backward)    # see FusedOp.register_autograd

    _forward(logits, targets, OPTIONS.new(inv_temperature=1.0, softcap=None, backend="torch"))

Options are a namedtuple type: ``o.softcap`` reads one, ``o._replace(...)`` changes one, and
:meth:`Options.extended` adds the few a backward op takes beyond its forward's.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Callable

import torch

# The scalar types an option may have, as torch's schema language spells them.
_OPTION_TYPES = {"float", "float?", "int", "bool", "str"}


def _split_schema(text: str) -> list[tuple[str, str]]:
    """``"float a, float? b"`` -> ``[("float", "a"), ("float?", "b")]``."""
    fields = []
    for item in text.split(","):
        kind, _, name = item.strip().rpartition(" ")
        fields.append((kind.strip(), name))
    return fields


class Options:
    """A named list of scalar options, declared once as schema text."""

    def __init__(self, type_name: str, schema: str):
        fields = _split_schema(schema)
        for kind, name in fields:
            if kind not in _OPTION_TYPES or not name.isidentifier():
                raise TypeError(f"option {name!r} of {type_name} has type {kind!r}; options are "
                                f"scalars of one of {sorted(_OPTION_TYPES)}")
        self.schema = ", ".join(f"{kind} {name}" for kind, name in fields)
        self.values = namedtuple(type_name, [name for _, name in fields])

    def __len__(self) -> int:
        return len(self.values._fields)

    def new(self, *args, **kwargs):
        """The option values, every option given (positionally or by name)."""
        return self.values(*args, **kwargs)

    def extended(self, type_name: str, schema: str) -> "Options":
        """These options followed by more (a backward op's extra flags)."""
        return Options(type_name, f"{self.schema}, {schema}")

    def of(self, base, **more):
        """Values of these (extended) options: ``base``'s, then ``more`` by name."""
        return self.values(*base, **more)


class FusedOp:
    """A custom op called as ``op(*tensors, options)``; registered by :func:`fused_op`."""

    def __init__(self, name: str, tensors: str, options: Options):
        self.name, self.options = name, options
        self.tensor_names = [arg for _, arg in _split_schema(tensors)]
        self.n_tensors = len(self.tensor_names)
        self.op = None  # set by fused_op, which registers the op around this object

    def _split(self, args, kwargs=None):
        """``(tensors, option values)`` from the op's arguments. The dispatcher may pass
        trailing arguments by name (Inductor's fallback kernels do), so names work too."""
        args, kwargs = list(args), dict(kwargs or {})
        for arg in self.tensor_names[len(args):]:
            args.append(kwargs.pop(arg))
        return tuple(args[:self.n_tensors]), self.options.values(*args[self.n_tensors:], **kwargs)

    def __call__(self, *args):
        *tensors, values = args
        if len(tensors) != self.n_tensors or not isinstance(values, self.options.values):
            raise TypeError(f"{self.name} takes {self.n_tensors} tensors then one "
                            f"{self.options.values.__name__}")
        return self.op(*tensors, *values)

    def register_fake(self, fake: Callable) -> Callable:
        """``fake(*tensors, options)``: outputs of the right shapes, dtypes and devices."""
        def fake_kernel(*args, **kwargs):
            tensors, values = self._split(args, kwargs)
            return fake(*tensors, values)

        self.op.register_fake(fake_kernel)
        return fake

    def register_autograd(self, setup: Callable, backward: Callable) -> None:
        """``setup(ctx, tensors, options, output)`` saves what the backward needs (the options
        are on ``ctx.options`` already); ``backward(ctx, *grad_outputs)`` returns one gradient
        (or None) per tensor input, the options' Nones are appended here."""
        def setup_context(ctx, inputs, output):
            tensors, values = self._split(inputs)
            ctx.options = values
            setup(ctx, tensors, values, output)

        def grad(ctx, *grad_outputs):
            grads = tuple(backward(ctx, *grad_outputs))
            if len(grads) != self.n_tensors:
                raise RuntimeError(f"the backward of {self.name} returned {len(grads)} "
                                   f"gradients for {self.n_tensors} tensor inputs")
            return grads + (None,) * len(self.options)

        self.op.register_autograd(grad, setup_context=setup_context)


def fused_op(name: str, options: Options, *, tensors: str, returns: str,
             mutates: tuple[str, ...] = ()) -> Callable[[Callable], FusedOp]:
    """Registers ``impl(*tensors, options)`` as the custom op ``name`` with schema
    ``(tensors, options) -> returns`` (``tensors`` in schema text, ``Tensor(a!) x`` for one that
    ``mutates`` names)."""
    def register(impl: Callable) -> FusedOp:
        fused = FusedOp(name, tensors, options)

        def kernel(*args, **kwargs):
            tensor_args, values = fused._split(args, kwargs)
            return impl(*tensor_args, values)

        kernel.__doc__ = impl.__doc__
        fused.op = torch.library.custom_op(name, kernel, mutates_args=mutates,
                                           schema=f"({tensors}, {options.schema}) -> {returns}")
        return fused

    return register
