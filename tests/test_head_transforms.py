"""Heads that are not a plain linear map, read by the one reader fastalign's trainers and its
integrations share (``fastalign.model_head.read_head``): every transformers
architecture with a scaled, capped or custom head that a tiny config builds gives, through the
trainers' ``CausalLMAdapter``, the TRL fused head and ``patch_model``, the log-probs of the
model's own logits (float64 reference, float32 tolerance), or is refused by all three with an
error naming its class; so are an ``nn.Linear`` subclass head that scales its output and a
forward that multiplies the logits by a per-vocabulary parameter."""

import pytest
import torch
import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast

from fastalign.integrations.transformers import patch_model
from fastalign.trainer.models.adapter import CausalLMAdapter

try:
    import fastalign.integrations.trl as fatrl
except ImportError:  # TRL is an optional extra: its path is then skipped
    fatrl = None

pytestmark = pytest.mark.slow

VOCAB = 300
TEMPERATURE = 0.7
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64)
FULL_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}

# (model_type, config options): each factor well away from 1 (and the caps inside the logits'
# range), so that a transform read wrongly moves the log-probs by nats, not by rounding.
EXACT = {
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25),
    "cohere2_moe": dict(logit_scale=0.25),
    "cohere_compass_text": dict(logit_scale=0.25, rope_parameters=FULL_ROPE),
    "granite": dict(logits_scaling=4.0),  # divides
    "granite_swa": dict(logits_scaling=4.0),
    "granitemoe": dict(logits_scaling=4.0),
    "granitemoe_swa": dict(logits_scaling=4.0),
    "granitemoeshared": dict(logits_scaling=4.0),
    "granitemoehybrid": dict(logits_scaling=4.0, mamba_n_heads=4, layer_types=["attention"]),
    "hyperclovax": dict(logits_scaling=0.25),  # multiplies
    "falcon_h1": dict(lm_head_multiplier=0.25),
    # the hidden states divided by logits_scaling = hidden_size / dim_model_base = 4
    "minicpm3": dict(dim_model_base=8, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                     qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
    "inkling_text": dict(logits_mup_width_multiplier=4.0),  # hidden states / 4 before the head
    "gemma2": dict(final_logit_softcapping=3.0),
    "gemma3_text": dict(final_logit_softcapping=3.0),
    "gemma4_text": dict(final_logit_softcapping=3.0),
    "vaultgemma": dict(final_logit_softcapping=3.0),
    "nanochat": dict(final_logit_softcapping=3.0),
    "beam": dict(final_logit_softcapping=3.0),
    "recurrent_gemma": dict(logits_soft_cap=3.0, num_hidden_layers=2,
                            block_types=["recurrent", "attention"]),
}

# (model_type, config options, error, what the message says): refused by all three paths.
REFUSED = {
    "dory": ({}, TypeError, r"DoryForCausalLM's output embedding is a DoryLMHead, whose forward "
                            r"is not nn.Linear's.*own logits"),
    "ergo": ({}, TypeError, r"ErgoForCausalLM's output embedding is a ErgoLinearWithFP32Output"),
    "inkling2_text": (dict(final_logit_softcapping=3.0), ValueError,
                      r"Inkling2ForCausalLM.forward .* does not know: `logits = "
                      r"self.logit_softcap\(logits\)`"),
    "inkling2_loop_text": (dict(final_logit_softcapping=3.0), ValueError,
                           r"Inkling2LoopForCausalLM.forward .*self.logit_softcap"),
    "inkling_text": (dict(unpadded_vocab_size=VOCAB - 40), ValueError,
                     r"InklingForCausalLM.forward .*logits\[\.\.\., :unpadded_vocab_size\]"),
    "xlstm": (dict(num_heads=4), ValueError, r"xLSTMForCausalLM.forward .*does not know"),
    "modernbert-decoder": (dict(pad_token_id=0), ValueError,
                           r"ModernBertDecoderForCausalLM.forward .*the head's input "
                           r"`self.lm_head\(hidden_states\)` is not the backbone's last hidden"),
}


def _build(model_type, options):
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = transformers.CONFIG_MAPPING[model_type](**{**SMALL, **options})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # logits spread over several nats: scales and caps then matter
        model.get_output_embeddings().weight.mul_(30.0)
    return model


class _LogitScaleLlama(transformers.LlamaForCausalLM):
    """A forward of one's own that multiplies the logits by ``self.logit_scale``."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state) * self.logit_scale
        return CausalLMOutputWithPast(logits=logits)


class NumberScaledLlama(_LogitScaleLlama):
    def __init__(self, config):
        super().__init__(config)
        self.logit_scale = 0.3  # a number: read from the forward's source and applied


class PerTokenScaledLlama(_LogitScaleLlama):
    def __init__(self, config):
        super().__init__(config)  # a learned per-vocabulary scale, as Dory's: refused
        self.logit_scale = torch.nn.Parameter(torch.linspace(0.5, 2.0, config.vocab_size))


class ScaledOutputLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward scales its output: its weight alone is not the head."""

    def forward(self, hidden):
        return super().forward(hidden) * 0.5


def _llama(cls=transformers.LlamaForCausalLM):
    config = transformers.LlamaConfig(**SMALL, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def _batch():
    """input_ids [2, 9], the completion (after a 3-token prompt) and a right-padded row."""
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    completion_mask = torch.ones_like(input_ids)
    completion_mask[:, :3] = 0
    labels = torch.where((completion_mask * attention_mask).bool(), input_ids, -100)
    return input_ids, attention_mask, completion_mask, labels


def _reference(model, input_ids, attention_mask, labels, bare=False):
    """The model's own log-probs of the labels (float64 log_softmax of its logits, 0 at -100)
    and, with ``bare``, those of the bare head on the backbone's last hidden state."""
    target = labels[:, 1:]
    keep = target != -100

    def gathered(logits):
        log_p = torch.log_softmax(logits[:, :-1].double() / TEMPERATURE, -1)
        return log_p.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * keep

    own = gathered(model(input_ids=input_ids, attention_mask=attention_mask).logits)
    if not bare:
        return own
    with torch.no_grad():
        hidden = model.base_model(input_ids=input_ids,
                                  attention_mask=attention_mask).last_hidden_state
        bare = gathered(model.get_output_embeddings()(hidden))
    return own, bare


def _check_every_path(build):
    """``build()`` gives the same model afresh for each path (some do not deep-copy once run)."""
    model = build()
    input_ids, attention_mask, completion_mask, labels = _batch()
    expected, bare = _reference(model, input_ids, attention_mask, labels, bare=True)
    # The transform matters for this model: reading the head as a plain linear map is far off.
    assert (expected - bare).abs().max() > 0.1
    close = dict(rtol=1e-5, atol=1e-5)

    adapter = CausalLMAdapter(model)
    per_token, _ = adapter.completion_logprobs(input_ids, completion_mask, attention_mask,
                                               temperature=TEMPERATURE)
    torch.testing.assert_close(per_token.double(), expected.detach(), **close)
    # The head's gradient through the trainers' path (the logit scale multiplied into the weight)
    # is the model's own.
    head = model.get_output_embeddings().weight
    fused_grad, = torch.autograd.grad(per_token.sum(), head)
    own_grad, = torch.autograd.grad(expected.sum(), head)
    torch.testing.assert_close(fused_grad, own_grad, rtol=1e-4, atol=1e-6)

    patched = patch_model(build(), temperature=TEMPERATURE)
    out = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                  return_logprobs=True)
    torch.testing.assert_close(out.logprobs.double(), expected.detach(), **close)

    if fatrl is not None:
        trl_model = build()
        fatrl.add_fused_lm_head(trl_model, temperature=TEMPERATURE)
        out = trl_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        fused_lm_head=True)
        torch.testing.assert_close(out.log_probs.double(), expected.detach(), **close)


def _check_refused(model, error, message):
    with pytest.raises(error, match=message):
        CausalLMAdapter(model)
    with pytest.raises(error, match=message):
        patch_model(model)
    if fatrl is not None:
        with pytest.raises(error, match=message):
            fatrl.add_fused_lm_head(model)


@pytest.mark.parametrize("model_type", sorted(EXACT))
def test_scaled_and_capped_heads_equal_the_models_own_logits(model_type):
    _check_every_path(lambda: _build(model_type, EXACT[model_type]))


def test_a_number_on_the_model_that_the_forward_multiplies_in_is_read():
    _check_every_path(lambda: _llama(NumberScaledLlama))


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_heads_and_logit_steps_fastalign_cannot_read_are_refused(model_type):
    options, error, message = REFUSED[model_type]
    _check_refused(_build(model_type, options), error, message)


def test_a_per_vocabulary_scale_parameter_is_refused():
    _check_refused(_llama(PerTokenScaledLlama), ValueError,
                   r"PerTokenScaledLlama.forward .*`self.logit_scale` is a tensor \(a learned "
                   r"or per-vocabulary scale\).*compute its log-probs from its own logits")


def test_a_linear_subclass_head_that_scales_its_output_is_refused():
    model = _llama()
    head = ScaledOutputLinear(32, VOCAB, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    _check_refused(model, TypeError,
                   r"LlamaForCausalLM's output embedding is a ScaledOutputLinear, whose forward "
                   r"is not nn.Linear's.*plain nn.Linear head")


@pytest.mark.parametrize("where", ["modules_to_save", "target_modules"])
def test_a_peft_head_on_a_scaled_model(where):
    """lm_head of Cohere (logit scale) in PEFT's modules_to_save (a wrapper whose forward runs a
    trained copy of the head) or LoRA-adapted: read through the copy or with the adapter folded
    in, and as the original with the adapters disabled."""
    peft = pytest.importorskip("peft")
    options = ({"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]}
               if where == "modules_to_save" else
               {"target_modules": ["q_proj", "lm_head"], "init_lora_weights": False})
    cohere = _build("cohere", {**EXACT["cohere"], "tie_word_embeddings": False})
    model = peft.get_peft_model(cohere, peft.LoraConfig(r=4, lora_dropout=0.0, **options))
    if where == "modules_to_save":
        with torch.no_grad():
            model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.5)
    input_ids, attention_mask, completion_mask, labels = _batch()
    adapter = CausalLMAdapter(model)
    for disabled in (False, True):
        with adapter.reference_context(disable_adapters=disabled):
            expected = _reference(model, input_ids, attention_mask, labels)
            per_token, _ = adapter.completion_logprobs(input_ids, completion_mask,
                                                       attention_mask, temperature=TEMPERATURE)
        torch.testing.assert_close(per_token.double(), expected, rtol=1e-5, atol=1e-5)
