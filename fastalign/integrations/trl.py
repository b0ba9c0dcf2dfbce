"""fastalign's fused head under TRL's trainers, with one line.

    import fastalign.integrations.trl as fatrl
    fatrl.enable()                      # every TRL trainer built from now on
    trainer = GRPOTrainer(model=model, reward_funcs=..., args=cfg, train_dataset=ds)
    trainer.train()

Since TRL 1.15 every trainer installs a fused LM head on its models in ``__init__``
(``trl.trainer.utils.add_fused_lm_head``: ``model.forward`` replaced by one that runs the
backbone and calls TRL's chunked log-prob function when called with ``fused_lm_head=True``).
While enabled, that installer is fastalign's: the same forward contract (TRL's
``FusedCausalLMOutput``, the same fields, zeros at ``-100`` labels, the same loss), computed by
``fastalign.linear_logprobs`` from the hidden states, so the ``[N, V]`` logits never exist and
ignored positions cost nothing. Without ``fused_lm_head=True`` the model's own forward runs
(generation is unchanged). ``patch(trainer)`` does the same for a trainer already built.

A guard: a training step that ran without fastalign serving any log-probs (something replaced
``model.forward`` afterwards) warns at once, naming the trainer.

Supported TRL versions: :data:`SUPPORTED_TRL` (the hook's contract is read from TRL's source of
those versions). Another version is refused with an error naming it; set
``FASTALIGN_TRL_UNCHECKED=1`` to try anyway (then only a warning).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import types
import warnings

from .. import model_head
from . import trl_distillation

# TRL versions (major.minor) whose add_fused_lm_head / FusedCausalLMOutput contract this module
# implements. The one place to change when a new TRL is checked.
SUPPORTED_TRL = ("1.16",)
UNCHECKED_ENV = "FASTALIGN_TRL_UNCHECKED"
# Modules that import add_fused_lm_head by name (each holds its own reference to replace).
_INSTALLER_MODULES = ("trl.trainer.utils", "trl.trainer.dpo_trainer", "trl.trainer.grpo_trainer",
                      "trl.trainer.rloo_trainer", "trl.trainer.kto_trainer",
                      "trl.trainer.sft_trainer")
# The trainers whose steps the guard watches: (module, class).
_TRAINERS = (("trl.trainer.dpo_trainer", "DPOTrainer"), ("trl.trainer.grpo_trainer", "GRPOTrainer"),
             ("trl.trainer.rloo_trainer", "RLOOTrainer"), ("trl.trainer.kto_trainer", "KTOTrainer"),
             ("trl.trainer.sft_trainer", "SFTTrainer"))
# Fields of TRL's FusedCausalLMOutput this head computes (log_probs always), and the
# linear_logprobs row statistic each of the last three is.
OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
_ROW_STAT_OF = {"mean_logits": "mean_logit", "is_top1": "is_top1",
                "log_sum_sq_probs": "log_sum_sq_probs"}

# Calls of the fused forward fastalign has served, for the guard.
_served = {"calls": 0}
# What enable() replaced: (object, attribute) -> the original value.
_originals: dict[tuple[object, str], object] = {}


def _check_version():
    import trl
    version = ".".join(trl.__version__.split(".")[:2])
    if version in SUPPORTED_TRL:
        return
    message = (f"fastalign.integrations.trl supports TRL {', '.join(SUPPORTED_TRL)}, not "
               f"{trl.__version__}: its fused-head hook may differ. Install trl=="
               f"{SUPPORTED_TRL[-1]}.*, or set {UNCHECKED_ENV}=1 to try this version anyway")
    if os.environ.get(UNCHECKED_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def _backbone(model):
    """The module that returns ``last_hidden_state``: ``base_model``, or, for vision-language
    models before transformers 5, ``model``."""
    import transformers
    if model_head.text_config(model) is not model.config and int(transformers.__version__.split(".")[0]) < 5:
        return model.model
    return model.base_model


def _output(**fields):
    from trl.trainer.utils import FusedCausalLMOutput
    return FusedCausalLMOutput(**fields)


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """fastalign's drop-in for ``trl.trainer.utils.add_fused_lm_head`` (same arguments): after
    it, ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput``
    computed by ``fastalign.linear_logprobs``; without ``fused_lm_head`` the original forward
    runs. Fields of ``outputs`` fastalign does not compute raise ``NotImplementedError`` here,
    when the trainer is built, not in the middle of training. A head that is not a linear map,
    or a logit transform fastalign does not know, is refused here too (``fastalign.model_head.read_head``:
    TypeError or ValueError naming the model class)."""
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown:
        raise NotImplementedError(
            f"fastalign's fused head does not compute {unknown} yet (it computes {OUTPUTS}); "
            f"build this trainer with fastalign.integrations.trl disabled")
    _install(model, model.forward, float(temperature), bool(cast_lm_head_to_fp32), tuple(outputs))


def _install(model, original_forward, temperature, cast_lm_head_to_fp32, outputs):
    # A head or a logit step fastalign cannot read is refused here, when the trainer is built
    # (read again at each call: PEFT may wrap the head after this).
    model_head.read_head(model)
    want_entropy = "entropy" in outputs
    row_stat_fields = [name for name in outputs if name in _ROW_STAT_OF]

    # The class's signature, as TRL keeps it: generate() checks its model kwargs against it.
    @functools.wraps(type(model).forward)
    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                      num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            passed = dict(labels=labels, shift_labels=shift_labels,
                          num_items_in_batch=num_items_in_batch)
            kwargs.update({k: v for k, v in passed.items() if v is not None})
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(model_head.text_config(self), "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        # Looked up per call: PEFT and FSDP replace the backbone and the head after this.
        backbone_out = _backbone(self)(*args, **kwargs)
        hidden = backbone_out.last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        log_probs, entropy, row_stats = model_head.head_logprobs(
            self, hidden, shift_labels, temperature=temperature, return_entropy=want_entropy,
            return_row_stats=bool(row_stat_fields), cast_to_fp32=cast_lm_head_to_fp32)
        extra = {name: row_stats[_ROW_STAT_OF[name]] for name in row_stat_fields}
        record_served()
        mask = shift_labels.to(log_probs.device) != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_loss(self, backbone_out, kwargs.get("attention_mask"))
            loss = loss + getattr(model_head.text_config(self), "router_aux_loss_coef", 0.0) * aux_loss
        return _output(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask,
                       aux_loss=aux_loss, **extra)

    fused_forward.fastalign_fused_head = dict(temperature=temperature, outputs=outputs,
                                              cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                              original_forward=original_forward)
    model.forward = types.MethodType(fused_forward, model)


def _router_loss(model, backbone_out, attention_mask):
    """Mixtral's load-balancing loss, the one MoE families share (as the model's forward adds)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    config = model_head.text_config(model)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts")
    return load_balancing_loss_func(backbone_out.router_logits, experts,
                                    config.num_experts_per_tok, attention_mask)


def _trl_head_options(forward):
    """TRL's fused forward's settings, read from its closure (``add_fused_lm_head``'s
    arguments and the original forward), or None if ``forward`` is not TRL's."""
    function = getattr(forward, "__func__", forward)
    code = getattr(function, "__code__", None)
    # functools.wraps gave it the model's forward's name: the code object keeps TRL's.
    if code is None or code.co_name != "_fused_forward" or "trl" not in code.co_filename:
        return None
    cells = dict(zip(code.co_freevars, function.__closure__ or ()))
    try:
        return dict(temperature=cells["temperature"].cell_contents,
                    cast_lm_head_to_fp32=cells["cast_lm_head_to_fp32"].cell_contents,
                    outputs=tuple(cells["outputs"].cell_contents),
                    original_forward=cells["original_forward"].cell_contents)
    except KeyError:
        return None


def _guard_step(training_step):
    @functools.wraps(training_step)
    def guarded(self, *args, **kwargs):
        before = _served["calls"]
        result = training_step(self, *args, **kwargs)
        if not getattr(self, "_fastalign_guard_checked", False):
            self._fastalign_guard_checked = True
            if _served["calls"] == before:
                message = (f"fastalign's fused head is installed but served none of this "
                           f"{type(self).__name__} step's log-probs: TRL's own head (or "
                           f"another patch) ran instead. Was model.forward replaced after the "
                           f"trainer was built? fastalign.integrations.trl.patch(trainer) "
                           f"installs fastalign's head again")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        return result
    guarded.fastalign_guard = True
    return guarded


def record_served() -> None:
    """One call of TRL's head or loss that fastalign served (the guard counts them)."""
    _served["calls"] += 1


def _counted(function):
    """``function``, each call recorded for the guard."""
    @functools.wraps(function)
    def counted(*args, **kwargs):
        record_served()
        return function(*args, **kwargs)
    return counted


def _replace(owner, name, value):
    _originals.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, value)


def enable() -> None:
    """TRL trainers built from now on compute their log-probs through fastalign (see the
    module docstring). Idempotent; :func:`disable` undoes it."""
    _check_version()
    # Import every module before replacing anything: a trainer module imported after
    # trl.trainer.utils was patched would bind (and we would record) the replacement.
    modules = [importlib.import_module(name) for name in _INSTALLER_MODULES]
    for module in modules:
        if hasattr(module, "add_fused_lm_head"):
            _replace(module, "add_fused_lm_head", add_fused_lm_head)
    # DistillationTrainer's loss is one module-level function, called by name.
    distillation = importlib.import_module(trl_distillation.MODULE)
    _replace(distillation, trl_distillation.FUNCTION,
             _counted(trl_distillation.fused_divergence_loss))
    for module_name, class_name in (*_TRAINERS, trl_distillation.TRAINER):
        cls = getattr(importlib.import_module(module_name), class_name)
        if not getattr(cls.training_step, "fastalign_guard", False):
            _replace(cls, "training_step", _guard_step(cls.training_step))


def disable() -> None:
    """Trainers built from now on use TRL's own head again (trainers already built keep the
    head they were built with)."""
    while _originals:
        (owner, name), value = _originals.popitem()
        setattr(owner, name, value)


def is_enabled() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def enabled():
    """``with enabled(): trainer = DPOTrainer(...)``: fastalign's head for the trainers built
    inside; the previous state is restored on exit."""
    was = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was:
            disable()


def patch(trainer):
    """Installs fastalign's head on an already-built TRL trainer's policy and reference models,
    with the settings TRL's head was built with (temperature, outputs, fp32 cast), and guards
    its steps. Returns the trainer.

    What it cannot reach: anything the trainer computed before the call, such as the reference
    log-probs DPOTrainer precomputes in ``__init__`` with ``precompute_ref_log_probs=True``
    (TRL's head computed those; they are plain numbers, so training stays correct, but that
    pass ran at TRL's memory cost: build the trainer inside :func:`enabled` to have fastalign
    serve it too), and models the trainer keeps elsewhere than ``trainer.model`` /
    ``trainer.ref_model``. A model whose forward is
    not TRL's fused head (a trainer that did not install one) raises ``ValueError``.
    """
    _check_version()
    models = [getattr(trainer, "model", None), getattr(trainer, "ref_model", None)]
    patched = 0
    for model in models:
        if model is None:
            continue
        if hasattr(model, "get_base_model"):  # PEFT: TRL installs its head on the base model
            model = model.get_base_model()
        if getattr(getattr(model.forward, "__func__", None), "fastalign_fused_head", None):
            patched += 1
            continue
        options = _trl_head_options(model.forward)
        if options is None:
            raise ValueError(f"{type(model).__name__}.forward of this {type(trainer).__name__} "
                             f"is not TRL's fused head, so there is nothing to replace; build "
                             f"the trainer inside fastalign.integrations.trl.enabled() instead")
        unknown = [name for name in options["outputs"] if name not in OUTPUTS]
        if unknown:
            raise NotImplementedError(f"this trainer's head computes {unknown}, which "
                                      f"fastalign's fused head does not compute yet")
        _install(model, options["original_forward"], float(options["temperature"]),
                 bool(options["cast_lm_head_to_fp32"]), tuple(options["outputs"]))
        patched += 1
    if not patched:
        raise ValueError(f"{type(trainer).__name__} has no model to patch")
    if not getattr(trainer.training_step, "fastalign_guard", False):
        trainer.training_step = types.MethodType(_guard_step(type(trainer).training_step), trainer)
    return trainer
