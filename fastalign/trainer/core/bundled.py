"""The data sets that ship with fastalign (``fastalign/data/``) and the data a run's command
options name: preference pairs split into training and held-out rows, prompt sets."""

from __future__ import annotations

import json
from importlib.resources import files

from .data import load_completions, load_preferences, read_lines

# --data NAME (preference pairs) and --prompts NAME (prompt sets): fastalign/data/FILE.
# --prompts demo is the prompts of the demo pairs (demo_prompts).
BUNDLED_PREFERENCES = {"demo": "demo_preferences.jsonl",
                       "arithmetic": "arithmetic_preferences.jsonl"}
BUNDLED_PROMPTS = {"arithmetic": "arithmetic.jsonl"}


def bundled_file(name: str) -> str:
    return str(files("fastalign") / "data" / name)


def demo_preferences(split: str | None = "train") -> list[dict]:
    """The bundled preference pairs (``fastalign/data/demo_preferences.jsonl``), one split."""
    return load_preferences(bundled_file(BUNDLED_PREFERENCES["demo"]), split=split)


def demo_prompts() -> list[str]:
    """The distinct prompts of the bundled training pairs, sorted: the built-in RL prompt set."""
    return sorted({row["prompt"] for row in demo_preferences("train")})


def preference_splits(data: str, eval_data: str | None = None) -> tuple[list, list | None]:
    """``(training rows, held-out rows or None)`` of ``data`` (a bundled name or a .jsonl
    file): the rows of ``eval_data`` when given, else the ``test`` rows of a file whose rows
    have a ``split`` field (the rest train)."""
    path = bundled_file(BUNDLED_PREFERENCES[data]) if data in BUNDLED_PREFERENCES else data
    return _split(load_preferences(path), eval_data and load_preferences(eval_data))


def completion_splits(data: str, eval_data: str | None = None) -> tuple[list, list | None]:
    """As ``preference_splits``, for ``prompt``/``completion`` rows; ``demo`` is the bundled
    pairs' prompts with their chosen (polite) answers, ``arithmetic`` the bundled word problems
    with their worked solutions (and each row's ``answer``, for a verifier)."""
    if data == "demo":
        rows = [{"prompt": row["prompt"], "completion": row["chosen"], "split": row["split"]}
                for row in demo_preferences(split=None)]
    elif data in BUNDLED_PROMPTS:
        rows = [{"prompt": row["prompt"], "completion": _reply(row["prompt"], row["solution"]),
                 **{k: v for k, v in row.items() if k not in ("prompt", "solution")}}
                for row in _bundled_rows(BUNDLED_PROMPTS[data])]
    else:
        rows = load_completions(data)
    return _split(rows, eval_data and load_completions(eval_data))


def _bundled_rows(name: str) -> list[dict]:
    with open(bundled_file(name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _reply(prompt, text: str):
    """``text`` as the completion of ``prompt``: an assistant message after chat messages."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _split(rows: list, held_out: list | None) -> tuple[list, list | None]:
    """``(training rows, held-out rows or None)``: ``held_out`` when given, else the ``test``
    rows of data whose rows have a ``split`` field (the rest train)."""
    if held_out:
        return rows, held_out
    if any("split" in row for row in rows):
        train = [row for row in rows if row.get("split", "train") == "train"]
        held_out = [row for row in rows if row.get("split") == "test"]
        return train, held_out or None
    return rows, None


def load_prompts(source: str, split: str | None = "train") -> list:
    """``demo`` (the bundled prompts), ``arithmetic`` (the bundled word problems, rows with an
    ``answer``), a ``.jsonl`` file of rows with a ``prompt`` (text or chat messages; a row's
    other fields go to the reward functions by name), or a text file with one prompt per line.
    Rows with a ``split`` field are kept where it is ``split`` (None: all); rows without one
    count as ``train``."""
    if source == "demo":
        return demo_prompts() if split in ("train", None) else []
    if source in BUNDLED_PROMPTS:
        source = bundled_file(BUNDLED_PROMPTS[source])
    lines = read_lines(source, "--prompts", "'demo', 'arithmetic', a .jsonl file of rows with a "
                                            "'prompt', or a .txt file of one prompt per line")
    if source.endswith(".jsonl"):
        prompts = []
        for number, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source} line {number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict) or not row.get("prompt"):
                raise ValueError(f"{source} line {number}: a row needs a non-empty 'prompt'")
            row_split = row.pop("split", "train")
            if split is not None and row_split != split:
                continue
            prompts.append(row if len(row) > 1 else row["prompt"])
    else:
        prompts = [line.rstrip("\r\n") for _, line in lines] if split in ("train", None) else []
    if not prompts and split in ("train", None):
        raise ValueError(f"--prompts {source!r} holds no prompt")
    return prompts
