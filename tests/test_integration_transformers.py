"""fastalign.integrations.transformers.patch_model: the causal-LM loss from the hidden states,
equal to the model's own loss and gradients, with no logits; generation unchanged; the
transformers Trainer trains through it exactly as without it."""

import copy
import warnings

import pytest
import torch
from helpers import small_llama

from fastalign.integrations.transformers import patch_model

pytestmark = pytest.mark.slow


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 262, (3, 12), generator=gen)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[2, 9:] = -100
    return input_ids, labels


def _loss_and_grads(model, input_ids, labels, **kwargs):
    out = model(input_ids=input_ids, labels=labels, **kwargs)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
    return out, grads


def _relative_error(actual, exact):
    return float((actual.double() - exact).norm() / exact.norm().clamp(min=1e-30))


@pytest.mark.parametrize("num_items", [None, 17])
def test_loss_and_gradients_equal_the_models_own(num_items):
    """The loss within 1e-5 of the model's own; every gradient as close to the float64 model's
    as the model's own float32 gradient is (this model's logits are large, so float32 backbones
    differ from each other by ~1e-5 relative wherever they round differently)."""
    model = small_llama(0, scale=10.0)
    patched = patch_model(copy.deepcopy(model))
    exact_model = copy.deepcopy(model).double()
    input_ids, labels = _batch()
    kwargs = {} if num_items is None else dict(num_items_in_batch=num_items)
    expected, expected_grads = _loss_and_grads(model, input_ids, labels, **kwargs)
    actual, grads = _loss_and_grads(patched, input_ids, labels, **kwargs)
    exact, exact_grads = _loss_and_grads(exact_model, input_ids, labels, **kwargs)
    assert actual.logits is None
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert abs(float(actual.loss) - float(exact.loss)) <= 1e-5 * abs(float(exact.loss))
    for grad, own, exact_grad in zip(grads, expected_grads, exact_grads):
        assert _relative_error(grad, exact_grad) <= 1.5 * _relative_error(own, exact_grad) + 1e-7


def test_logprobs_on_request_and_forward_without_labels_unchanged():
    model = small_llama(0, scale=10.0)
    input_ids, labels = _batch(1)
    logits = model(input_ids=input_ids).logits
    generated = model.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False)
    patch_model(model)
    assert patch_model(model) is model  # twice is harmless
    assert torch.equal(model(input_ids=input_ids).logits, logits)
    assert torch.equal(model.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False),
                       generated)
    out = model(input_ids=input_ids, labels=labels, return_logprobs=True)
    log_p = torch.log_softmax(logits[:, :-1].double(), -1)
    target = labels[:, 1:]
    mask = target != -100
    expected = log_p.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(out.logprobs.double(), expected, rtol=1e-5, atol=1e-5)
    entropy = -(log_p.exp() * log_p).sum(-1) * mask
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=1e-5, atol=1e-5)


def test_refuses_a_model_without_a_head():
    from transformers import LlamaConfig, LlamaModel
    backbone = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="no output embeddings"):
        patch_model(backbone)


def test_trainer_trains_the_same_through_it(tmp_path):
    """Three steps of the transformers Trainer with gradient accumulation (num_items_in_batch
    passed to the forward): the same losses and final weights patched as unpatched."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    input_ids, labels = _batch(2)
    rows = [dict(input_ids=i.tolist(), labels=l.tolist()) for i, l in zip(input_ids, labels)] * 4

    def train(model, name):
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3,
                                 optim="sgd",  # weights then differ as little as the gradients
                                 report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                                 seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
            trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, [p.detach().clone() for p in model.parameters()]

    expected_losses, expected_weights = train(small_llama(0, scale=10.0), "plain")
    losses, weights = train(patch_model(small_llama(0, scale=10.0)), "patched")
    assert len(losses) == 3
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    for weight, expected in zip(weights, expected_weights):
        torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-7)
