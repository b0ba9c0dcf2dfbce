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

Verifiers, for prompts with a known answer (rows with an ``answer`` field, as the bundled
arithmetic problems, ``fastalign/data/arithmetic.jsonl``):

- ``correct_answer``: 1 when the completion's stated answer is the answer: the number after
  its last "Answer:", or without one its last number ("... so 6 x 9 = 54 cards.");
- ``answer_format``: 1 when the completion states its answer as "Answer: <number>".
"""

from __future__ import annotations

import importlib
import re

_ANSWER = re.compile(r"Answer:\s*\**\s*(-?[\d,]*\d)")
_NUMBER = re.compile(r"-?\d[\d,]*\d|-?\d")


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


def final_answer(text: str) -> int | None:
    """The integer after the last "Answer:" in ``text`` (commas and a bold ``**`` allowed),
    or None."""
    found = _ANSWER.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def stated_answer(text: str) -> int | None:
    """``final_answer``, else the last number in ``text``, else None."""
    found = final_answer(text)
    if found is None and (numbers := _NUMBER.findall(text)):
        found = int(numbers[-1].replace(",", ""))
    return found


def correct_answer(prompts, completions, answer=None) -> list[float]:
    """1 where ``stated_answer`` equals the row's ``answer``, else 0."""
    if answer is None or any(value is None for value in answer):
        raise ValueError("correct_answer needs an 'answer' field in every prompt row")
    return [float(stated_answer(text) == int(value)) for text, value in zip(completions, answer)]


def answer_format(prompts, completions) -> list[float]:
    """1 where the completion gives an "Answer: <number>", else 0."""
    return [float(final_answer(text) is not None) for text in completions]


BUILT_IN = {"enthusiasm": enthusiasm, "letters": letters, "applause": applause,
            "correct_answer": correct_answer, "answer_format": answer_format}
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
