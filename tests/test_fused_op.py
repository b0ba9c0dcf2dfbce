"""ops/_fused_op.py, the one way ops register custom ops: one option list gives the schema, the
fake, the autograd context and the options' None gradients."""

import pytest
import torch

from fastalign.ops._fused_op import Options, fused_op

SCALE = Options("ScaleOptions", "float factor, float? offset, bool square")


@fused_op("fastalign_test::scale", SCALE, tensors="Tensor x, Tensor? weights", returns="Tensor")
def _scale(x, weights, o):
    y = x * o.factor + (o.offset or 0.0)
    y = y.square() if o.square else y
    return y if weights is None else y * weights


@_scale.register_fake
def _scale_fake(x, weights, o):
    return torch.empty_like(x)


def _setup(ctx, tensors, o, output):
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad):
    x, weights = ctx.saved_tensors
    o = ctx.options  # set by the helper, no option list repeated here
    inner = x * o.factor + (o.offset or 0.0)
    local = 2 * inner * o.factor if o.square else torch.full_like(x, o.factor)
    return grad * local * (1.0 if weights is None else weights), None


_scale.register_autograd(_setup, _backward)


def test_forward_gradient_and_options_match_plain_torch():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(5, dtype=torch.float64)
    for options in (SCALE.new(2.0, None, False), SCALE.new(factor=-0.5, offset=1.5, square=True)):
        for w in (None, weights):
            out = _scale(x, w, options)
            expected = x * options.factor + (options.offset or 0.0)
            expected = expected.square() if options.square else expected
            expected = expected if w is None else expected * w
            torch.testing.assert_close(out, expected)
            grad, = torch.autograd.grad(out.sum(), x)
            expected_grad, = torch.autograd.grad(expected.sum(), x)
            torch.testing.assert_close(grad, expected_grad)


def test_schema_holds_the_options_once():
    schema = str(torch.ops.fastalign_test.scale.default._schema)
    assert schema == ("fastalign_test::scale(Tensor x, Tensor? weights, float factor, "
                      "float? offset, bool square) -> Tensor")


def test_compiles_without_graph_break():
    torch._dynamo.reset()
    x = torch.randn(4, requires_grad=True)
    fn = lambda x: _scale(x, None, SCALE.new(3.0, 0.5, True)).sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), fn(x))
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0],
                               torch.autograd.grad(fn(x), x)[0])


def test_arguments_passed_by_name_reach_the_implementation():
    """Inductor's fallback kernels pass trailing arguments by name."""
    x = torch.randn(3)
    out = torch.ops.fastalign_test.scale.default(x, None, factor=2.0, offset=None, square=False)
    torch.testing.assert_close(out, 2 * x)


def test_extended_options_keep_the_base_ones_first():
    grad_options = SCALE.extended("ScaleGradOptions", "bool need_x")
    values = grad_options.of(SCALE.new(1.0, None, True), need_x=True)
    assert values._fields == ("factor", "offset", "square", "need_x")
    assert grad_options.schema == "float factor, float? offset, bool square, bool need_x"


def test_misuse_is_refused_with_what_to_do():
    with pytest.raises(TypeError, match="option 'x' of Bad has type 'Tensor'"):
        Options("Bad", "Tensor x")
    with pytest.raises(TypeError, match="takes 2 tensors then one ScaleOptions"):
        _scale(torch.randn(2), SCALE.new(1.0, None, False))
    with pytest.raises(TypeError, match="takes 2 tensors then one ScaleOptions"):
        _scale(torch.randn(2), None, (1.0, None, False))

    @fused_op("fastalign_test::bad_backward", SCALE, tensors="Tensor x, Tensor? weights",
              returns="Tensor")
    def bad(x, weights, o):
        return x * o.factor

    bad.register_fake(lambda x, weights, o: torch.empty_like(x))
    bad.register_autograd(lambda ctx, tensors, o, output: None, lambda ctx, grad: (grad,))
    x = torch.randn(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="returned 1 gradients for 2 tensor inputs"):
        bad(x, None, SCALE.new(1.0, None, False)).sum().backward()
