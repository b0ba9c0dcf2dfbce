"""What a causal LM's ``forward`` does between its backbone's last hidden state and the logits it
returns, read from the source of the forward (``program``) and evaluated on the model
(``evaluate``): factors on the hidden state before the head, factors and a tanh soft cap on the
logits after it, each under the conditions it is written under. Anything else is an
``UnknownStep`` quoting the line, which ``fastalign.model_head.read_head`` turns into a
refusal: a step fastalign cannot read is never taken for a plain linear head.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import textwrap

import torch

class UnknownStep(Exception):
    """A forward step ``read_head`` cannot read; the message quotes it."""


_CASTS = frozenset({"float", "to", "type", "contiguous", "clone"})  # the values stay the same
_TANH = frozenset({"torch.tanh", "nn.functional.tanh", "torch.nn.functional.tanh", "F.tanh"})
# What a factor or a test may be made of (``_is_constant``); _value evaluates nothing else.
_CONSTANT_NODES = (ast.Constant, ast.Attribute, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp,
                   ast.NamedExpr, ast.expr_context, ast.operator, ast.unaryop, ast.cmpop,
                   ast.boolop)


def _text(node) -> str:
    line = ast.unparse(node).splitlines()[0]
    return f"`{line if len(line) <= 120 else line[:117] + '...'}`"


def _dotted(node) -> str:
    return ast.unparse(node) if isinstance(node, (ast.Name, ast.Attribute)) else ""


def _is_constant(node, constants) -> bool:
    """Only numbers, ``self.<attributes>`` (``get_text_config()``, ``getattr`` too), names bound
    once to such, arithmetic and comparisons: what ``_value`` can evaluate on the model."""
    for n in ast.walk(node):
        # No dunder attribute or getattr name: nothing reaches past the model's own values.
        if (isinstance(n, ast.Attribute) and n.attr.startswith("__")
                or isinstance(n, ast.Constant) and isinstance(n.value, str)
                and n.value.startswith("__")):
            return False
        if isinstance(n, ast.Name):
            if n.id not in ("self", "getattr") and n.id not in constants:
                return False
        elif isinstance(n, ast.Call):
            if not (_is_text_config(n) or _is_getattr(n)):
                return False
        elif not isinstance(n, _CONSTANT_NODES):
            return False
    return True


def _is_text_config(node) -> bool:
    return (isinstance(node, ast.Call) and _dotted(node.func).endswith(".get_text_config")
            and not node.args and not node.keywords)


def _is_getattr(node) -> bool:
    """``getattr(x, "name")`` or ``getattr(x, "name", default)``."""
    return (isinstance(node, ast.Call) and _dotted(node.func) == "getattr"
            and len(node.args) in (2, 3) and not node.keywords
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str))


def _source_of(node):
    """``outputs`` for ``outputs.last_hidden_state`` or ``outputs[0]`` (or a choice of the two),
    else None."""
    if isinstance(node, ast.IfExp):
        name = _source_of(node.body)
        return name if name is not None and name == _source_of(node.orelse) else None
    if isinstance(node, ast.Attribute) and node.attr == "last_hidden_state":
        node = node.value
    elif (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
          and node.slice.value == 0):
        node = node.value
    else:
        return None
    return node.id if isinstance(node, ast.Name) else None


def _peel(node, slices: bool, constants):
    """``(base, steps)``: ``node`` as steps applied to ``base`` in order, each ``(kind, factor)``:
    ``("mul" | "div", constant)`` or ``("tanh", None)``; casts, and with ``slices`` position
    slices, change no value and are dropped. Stops at what is none of these."""
    steps = []
    while _source_of(node) is None:
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            kind = "mul" if isinstance(node.op, ast.Mult) else "div"
            if _is_constant(node.right, constants):
                steps.append((kind, node.right))
                node = node.left
                continue
            if kind == "mul" and _is_constant(node.left, constants):
                steps.append((kind, node.left))
                node = node.right
                continue
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in _CASTS:
                node = func.value
                continue
            if isinstance(func, ast.Attribute) and func.attr == "tanh" and not node.args:
                steps.append(("tanh", None))
                node = func.value
                continue
            if _dotted(func) in _TANH and len(node.args) == 1 and not node.keywords:
                steps.append(("tanh", None))
                node = node.args[0]
                continue
            if slices and _dotted(func) == "slice_logits_to_keep" and node.args:
                node = node.args[0]
                continue
        elif slices and isinstance(node, ast.Subscript):
            node = node.value
            continue
        break
    return node, steps[::-1]


def _targets(statement) -> list[str]:
    """The assigned targets' text of an assignment (``x: T = v`` too), else []."""
    if isinstance(statement, ast.AnnAssign) and statement.value is not None:
        return [ast.unparse(statement.target)]
    return [ast.unparse(t) for t in getattr(statement, "targets", [])]


def _touches(statement, name: str) -> bool:
    """Whether ``statement`` rebinds or mutates ``name`` (a store, a subscript or attribute
    store, an in-place method such as ``mul_``)."""
    for n in ast.walk(statement):
        if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, (ast.Store, ast.Del)):
            return True
        if (isinstance(n, (ast.Subscript, ast.Attribute)) and isinstance(n.ctx, ast.Store)
                and isinstance(n.value, ast.Name) and n.value.id == name):
            return True
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and isinstance(n.func.value, ast.Name) and n.func.value.id == name
                and n.func.attr.endswith("_") and not n.func.attr.startswith("_")):
            return True
    return False


def _stores(statements, name: str, conditions=()):
    """``(value or None, conditions, statement)`` for each statement that touches ``name``, in
    order: ``value`` for a plain ``name = value``, None for anything else; inside ``if``
    blocks with the ``(test, wanted truth)`` that lead there."""
    for statement in statements:
        if isinstance(statement, ast.If):
            yield from _stores(statement.body, name, (*conditions, (statement.test, True)))
            yield from _stores(statement.orelse, name, (*conditions, (statement.test, False)))
        elif not _touches(statement, name):
            continue
        elif (isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None
              and _targets(statement) == [name]):
            yield statement.value, conditions, statement
        else:
            yield None, conditions, statement


def _local_constants(function) -> dict:
    """Local names bound once to a constant (``cap = self.config.cap``, at the top level or as
    ``:=`` in a test)."""
    arguments = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
    stores = [n.id for n in ast.walk(function) if isinstance(n, ast.Name)
              and isinstance(n.ctx, ast.Store)]
    bindings = [(s.targets[0].id, s.value) for s in function.body if isinstance(s, ast.Assign)
                and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)]
    bindings += [(n.target.id, n.value) for n in ast.walk(function)  # if (cap := ...) is not None
                 if isinstance(n, ast.NamedExpr)]
    constants = {}
    for name, value in bindings:
        if name not in arguments and stores.count(name) == 1 and _is_constant(value, constants):
            constants[name] = value
    return constants


@functools.lru_cache(maxsize=64)
def program(forward, head_name: str, backbone_name: str):
    """The steps of ``forward`` from its backbone's last hidden state to the logits it returns:
    ``((stage, kind, factor, conditions, text), ...)`` with ``stage`` "hidden" (before the head)
    or "logits", and ``kind`` "mul", "div", "tanh" or "unknown" (refused where its conditions
    hold). Raises ``UnknownStep`` where the head's call or input cannot be read."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError) as error:
        raise UnknownStep(f"its source cannot be read ({error})") from None
    calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)
             and _dotted(n.func) == f"self.{head_name}"]
    if len(calls) != 1:
        raise UnknownStep(f"it calls self.{head_name} {len(calls)} times (fastalign reads one "
                          "call)")
    call = calls[0]
    index, statement = next((i, s) for i, s in enumerate(function.body)
                            if any(n is call for n in ast.walk(s)))
    targets = _targets(statement)
    if len(targets) != 1 or not targets[0].isidentifier() or len(call.args) != 1 or call.keywords:
        raise UnknownStep(_text(statement))
    constants = _local_constants(function)
    base, logit_steps = _peel(statement.value, False, constants)
    if base is not call:
        raise UnknownStep(_text(statement))
    base, input_steps = _peel(call.args[0], True, constants)
    before = function.body[:index]
    if isinstance(base, ast.Name):
        steps = _hidden_steps(before, base.id, backbone_name, constants)
    elif not _is_backbone_output(base, before, backbone_name):
        raise UnknownStep(f"the head's input {_text(base)} is not the backbone's last hidden state")
    else:
        steps = []
    text = _text(statement)
    steps += [("hidden", kind, factor, (), text) for kind, factor in input_steps]
    steps += [("logits", kind, factor, (), text) for kind, factor in logit_steps]
    logits = targets[0]
    for value, conditions, store in _stores(function.body[index + 1:], logits):
        base, more = (None, []) if value is None else _peel(value, False, constants)
        if not (isinstance(base, ast.Name) and base.id == logits):
            more = [("unknown", None)]
        steps += [("logits", kind, factor, conditions, _text(store)) for kind, factor in more]
    return tuple(steps), tuple(constants.items())


def _is_backbone_output(node, before, backbone_name: str) -> bool:
    """``node`` is ``outputs.last_hidden_state`` (or ``outputs[0]``) with ``outputs`` last bound
    at the top level of ``before`` to ``self.<backbone>(...)``."""
    name = _source_of(node)
    bound = [s.value for s in before if isinstance(s, (ast.Assign, ast.AnnAssign))
             and _targets(s) == [name]]
    # self.model.decoder(...) (OPT) too: the backbone's own forward returns what it returns.
    return (name is not None and bool(bound) and isinstance(bound[-1], ast.Call)
            and f"{_dotted(bound[-1].func)}.".startswith(f"self.{backbone_name}."))


def _hidden_steps(before, name: str, backbone_name: str, constants) -> list:
    """The steps from the backbone's output to ``name``, the head's input."""
    steps, found = [], False
    for value, conditions, store in _stores(before, name):
        base, more = (None, []) if value is None else _peel(value, True, constants)
        text = _text(store)
        if isinstance(base, ast.Name) and base.id == name and found:
            steps += [("hidden", kind, factor, conditions, text) for kind, factor in more]
        elif base is not None and not conditions and _is_backbone_output(base, before,
                                                                          backbone_name):
            found = True
            steps = [("hidden", kind, factor, (), text) for kind, factor in more]
        else:
            steps.append(("hidden", "unknown", None, conditions, text))
    if not found:
        raise UnknownStep(f"the head's input `{name}` is not read as the backbone's last "
                          f"hidden state")
    return steps


def _value(node, model, constants):
    """``node`` evaluated with ``model`` as ``self``. Only what ``_is_constant`` lets through
    runs (attributes, numbers, arithmetic, comparisons, ``get_text_config()``, ``getattr``), and
    never ``training``: a step that depends on it cannot be decided once."""
    training = any(isinstance(n, ast.Attribute) and n.attr == "training"
                   or isinstance(n, ast.Constant) and n.value == "training" for n in ast.walk(node))
    if training or not _is_constant(node, constants):
        raise UnknownStep(f"{_text(node)} cannot be evaluated on the model")
    names = {"self": model, "getattr": getattr}
    names.update({n.id: _value(constants[n.id], model, constants) for n in ast.walk(node)
                  if isinstance(n, ast.Name) and n.id in constants})
    # Safe to evaluate: the expression comes from the source of the model class's own forward
    # (code that already runs), and _is_constant admitted only attribute reads, numbers,
    # arithmetic and comparisons, with no builtins and no names but these.
    try:
        return eval(compile(ast.Expression(body=node), "<forward>", "eval"),
                    {"__builtins__": {}}, names)
    except Exception as error:  # an attribute the model lacks, a None in arithmetic
        raise UnknownStep(f"{_text(node)} cannot be evaluated on the model ({error!r})") from None


def _truth(node, model, constants) -> bool:
    if isinstance(node, ast.BoolOp):  # short-circuits as Python does: `n is not None and n < v`
        stop = isinstance(node.op, ast.Or)
        for operand in node.values:
            if _truth(operand, model, constants) is stop:
                return stop
        return not stop
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _truth(node.operand, model, constants)
    value = _value(node, model, constants)
    if not (value is None or isinstance(value, (bool, int, float))):
        raise UnknownStep(f"{_text(node)} is not a plain truth value")
    return bool(value)


def evaluate(model, steps, constants) -> tuple[float, float | None, float]:
    """``(input_scale, softcap, scale)`` of ``program``'s steps on ``model``: the factors before
    the tanh multiply into the scale, those after it are the soft cap
    (``c tanh(p z) = softcap_c(p c z)``)."""
    input_scale, before, after, tanh = 1.0, 1.0, 1.0, False
    for stage, kind, factor, conditions, text in steps:
        try:
            if not all(_truth(test, model, constants) is wanted for test, wanted in conditions):
                continue
        except UnknownStep as error:
            raise UnknownStep(f"{text} under a condition fastalign cannot decide ({error})"
                              ) from None
        if kind == "unknown":
            raise UnknownStep(text)
        if kind == "tanh":
            if tanh or stage == "hidden":
                raise UnknownStep(f"{text} (a second or an early tanh)")
            tanh = True
            continue
        value = _value(factor, model, constants)
        if isinstance(value, torch.Tensor):
            raise UnknownStep(f"{text}, whose factor {_text(factor)} is a tensor (a learned or "
                           f"per-vocabulary scale), not a number")
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value == 0):
            raise UnknownStep(f"{text}, whose factor {_text(factor)} is {value!r}")
        value = float(value) if kind == "mul" else 1.0 / value
        if stage == "hidden":
            input_scale *= value
        elif tanh:
            after *= value
        else:
            before *= value
    if tanh and not after > 0:
        raise UnknownStep(f"a soft cap of {after}")
    return input_scale, (after if tanh else None), (before * after if tanh else before)
