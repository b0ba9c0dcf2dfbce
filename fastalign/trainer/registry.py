"""The trainers of ``fastalign train``, registered in one place: each trainer module declares its
``SPEC`` (``core/spec.py``: name, config, command options, how it is built, its summary); the
command builds its subcommands, flags and runs from this list alone."""

from __future__ import annotations

from .algorithms import distill, dpo, grpo, ppo, reward
from .core.spec import TrainerSpec

TRAINERS: dict[str, TrainerSpec] = {spec.name: spec for spec in
                                    (dpo.SPEC, reward.SPEC, grpo.SPEC, ppo.SPEC, distill.SPEC)}
