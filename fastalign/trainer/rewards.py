"""Rule-based reward functions ``f(prompts, completions) -> list[float]`` for GRPO and
Best-of-N, and the built-in default's.

The built-in policy is the tiny model after a short supervised warm start (``sft.py``): it
writes byte soup with the letter, space and punctuation statistics of the bundled answers, so
its rewards are rules on characters that it can learn in a few dozen steps on a CPU:

- ``enthusiasm``: up to two exclamation marks (the polite answers open with "Gladly!");
- ``letters``: the share of letters and spaces, i.e. text rather than symbols;
- ``applause``: every "!" counts, without a cap. The seed's clapping audience made concrete: a
  proxy that loves exclamation marks, which an optimizer satisfies with "!!!!!!!!" and no text.
  Pair it with ``letters`` at weight 0 to watch the true goal fall while the proxy rises (see
  docs/reward_hacking.md), and with the KL penalty (``beta``) to hold it back.
"""

from __future__ import annotations

import importlib


def enthusiasm(prompts, completions) -> list[float]:
    """1 for two or more "!", 0.5 for one, 0 for none."""
    return [min(text.count("!"), 2) / 2 for text in completions]


def letters(prompts, completions) -> list[float]:
    """The share of a completion's characters that are letters or spaces (0 when empty)."""
    return [sum(c.isalpha() or c == " " for c in text) / max(len(text), 1)
            for text in completions]


def applause(prompts, completions) -> list[float]:
    """Exclamation marks per completion over 4, uncapped: the hackable proxy."""
    return [text.count("!") / 4 for text in completions]


BUILT_IN = {"enthusiasm": enthusiasm, "letters": letters, "applause": applause}
DEFAULT = ("enthusiasm", "letters")


def reward_function(name: str):
    """A built-in reward by name, or ``"package.module:function"`` imported from the path.

    Raises:
        ValueError: an unknown name, or a path that does not import to a callable.
    """
    if name in BUILT_IN:
        return BUILT_IN[name]
    module_name, _, attribute = name.partition(":")
    if not attribute:
        raise ValueError(f"unknown reward function {name!r}: use one of "
                         f"{', '.join(BUILT_IN)}, or 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward function {name!r} cannot be imported: {error}") from None
    if not callable(function):
        raise ValueError(f"reward function {name!r} is not callable")
    return function
