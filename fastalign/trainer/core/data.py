"""Training rows: loading, checking, tokenizing and batching preference pairs
(``prompt``/``chosen``/``rejected``) and completions (``prompt``/``completion``, distillation).

Rows come from a JSONL file, a ``datasets.Dataset`` or a list of dicts. Each field is plain
text, or (conversational data) a list of ``{"role", "content"}`` messages rendered with the
tokenizer's chat template: the prompt with the generation prompt, prompt + completion without.
As in TRL, plain-text completions get the EOS token appended, and the completion starts where
the tokenized prompt and the tokenized prompt + completion diverge.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

FIELDS = ("prompt", "chosen", "rejected")
COMPLETION_FIELDS = ("prompt", "completion")


class DataError(ValueError):
    """A preference row that cannot be used; the message names the row and the field."""


class Row(dict):
    """A data row that knows where it came from (``where``: "data.jsonl line 7" or "row 3",
    1-based either way), so every later message about it names the same place."""

    where = "a row"


def where(row, index: int) -> str:
    """The place of ``row``, the ``index``-th (0-based) of its list, for a message."""
    return getattr(row, "where", f"row {index + 1}")


def read_lines(path, what: str, expected: str = ""):
    """``(line number, text)`` of each non-blank line of the UTF-8 text file ``path`` (a BOM
    is skipped); a line that is not UTF-8 is a ``DataError`` naming the file, line and byte.
    ``what`` and ``expected`` (what the file should hold) word the missing-file message."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {os.fspath(path)!r} does not exist"
                                + (f" (expected {expected})" if expected else ""))
    with open(path, "rb") as source:
        for number, raw in enumerate(source, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{os.fspath(path)} line {number}: not UTF-8 text (byte "
                                f"0x{raw[error.start]:02x} at column {error.start + 1}); save "
                                "the file as UTF-8") from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                yield number, line


def load_preferences(source, *, split: str | None = None) -> list[dict]:
    """The rows of ``source`` (a ``.jsonl`` path, a ``datasets.Dataset`` or a list of dicts),
    checked: each has non-empty ``prompt``, ``chosen`` and ``rejected``, all text or all
    message lists. With ``split``, only rows whose ``split`` field equals it.

    Raises:
        FileNotFoundError: no such file.
        DataError: a malformed row, named by its line (files) or index.
    """
    rows = _load_rows(source, FIELDS, "preference data", split)
    _warn_about_useless_pairs(rows)
    return rows


def load_completions(source, *, split: str | None = None) -> list[dict]:
    """As ``load_preferences``, for rows of a ``prompt`` and its ``completion`` (text or chat
    messages): the data of distillation (and of supervised fine-tuning)."""
    return _load_rows(source, COMPLETION_FIELDS, "completion data", split)


def _load_rows(source, fields: tuple, what: str, split: str | None) -> list:
    if isinstance(source, (str, os.PathLike)):
        rows = _read_jsonl(source, fields, what)
    else:
        rows = []
        for index, item in enumerate(source):
            row = Row(item)
            # Rows read from a file earlier keep their file and line (the CLI splits them).
            row.where = getattr(item, "where", f"row {index + 1}")
            rows.append(row)
    first_of_kind = {}  # "text" / "messages" -> where the first row of that kind is
    for row in rows:
        _check_row(row, row.where, fields)
        first_of_kind.setdefault("messages" if isinstance(row["prompt"], list) else "text",
                                 row.where)
    if len(first_of_kind) > 1:
        raise DataError(f"the {what} mixes plain-text rows ({first_of_kind['text']} is "
                        f"one) and chat-message rows ({first_of_kind['messages']} is one); use "
                        "one kind throughout")
    if split is not None:
        rows = [row for row in rows if row.get("split") == split]
        if not rows:
            raise DataError(f"no rows have split == {split!r}")
    if not rows:
        raise DataError(f"the {what} is empty")
    return rows


def _warn_about_useless_pairs(rows: list) -> None:
    """Pairs whose chosen and rejected are the same teach nothing (their DPO gradient is 0)
    and repeated rows weigh more than the others: legal, but rarely meant; said with counts."""
    same = [row for row in rows if row["chosen"] == row["rejected"]]
    keys = [json.dumps([row[field] for field in FIELDS], sort_keys=True) for row in rows]
    repeated = len(keys) - len(set(keys))
    if same:
        warnings.warn(f"{len(same)} preference pair(s) have chosen == rejected (the first: "
                      f"{same[0].where}); they teach nothing", RuntimeWarning, stacklevel=3)
    if repeated:
        warnings.warn(f"{repeated} preference row(s) repeat an earlier row exactly; each copy "
                      "counts again in training", RuntimeWarning, stacklevel=3)


def _read_jsonl(path, fields: tuple, what: str) -> list[Row]:
    rows = []
    for number, line in read_lines(path, what, f"a .jsonl file of {'/'.join(fields)} rows"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{os.fspath(path)} line {number}: not valid JSON ({error.msg})"
                            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{os.fspath(path)} line {number}: expected a JSON object with "
                            f"{', '.join(fields)}, got {type(row).__name__}")
        row = Row(row)
        row.where = f"{os.fspath(path)} line {number}"
        rows.append(row)
    return rows


def _check_row(row: dict, where: str, fields: tuple) -> None:
    missing = [field for field in fields if field not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)} (every row needs "
                        f"{', '.join(fields)})")
    kinds = set()
    for field in fields:
        value = row[field]
        if isinstance(value, str):
            kinds.add("text")
            empty = not value.strip()
        elif isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                             for m in value):
            kinds.add("messages")
            empty = not value or not any(str(m["content"]).strip() for m in value)
        else:
            raise DataError(f"{where}: {field} must be text or a list of {{'role', 'content'}} "
                            f"messages, got {type(value).__name__}")
        if empty:
            raise DataError(f"{where}: {field} is empty")
    if len(kinds) > 1:
        raise DataError(f"{where}: {', '.join(fields[:-1])} and {fields[-1]} must be all text or "
                        "all messages")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(tokenizer, text_or_messages, *, generation_prompt: bool = False) -> list[int]:
    if isinstance(text_or_messages, str):
        return tokenizer(text_or_messages, add_special_tokens=False)["input_ids"]
    rendered = tokenizer.apply_chat_template(text_or_messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pairs(rows: list[dict], tokenizer, *, max_length: int = 1024) -> list[TokenizedPair]:
    """Token ids of each row's prompt and completions; ``prompt + completion`` is cut to
    ``max_length`` tokens (the completion's end goes first).

    Raises:
        ValueError: a tokenizer without a pad token, or without a chat template for messages.
        DataError: a prompt of ``max_length`` tokens or more (no room for a completion).
    """
    return [TokenizedPair(*_tokenized(row, index, ("chosen", "rejected"), tokenizer,
                                      max_length))
            for index, row in enumerate(_checked_for_tokenizing(rows, tokenizer))]


def tokenize_completions(rows: list[dict], tokenizer, *, max_length: int = 1024
                         ) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, completion ids)`` of each ``prompt``/``completion`` row, cut as
    ``tokenize_pairs`` cuts them."""
    return [_tokenized(row, index, ("completion",), tokenizer, max_length)
            for index, row in enumerate(_checked_for_tokenizing(rows, tokenizer))]


def _checked_for_tokenizing(rows: list[dict], tokenizer) -> list[dict]:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set one first, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token")
    if rows and isinstance(rows[0]["prompt"], list) and not getattr(tokenizer, "chat_template",
                                                                    None):
        raise ValueError("the rows are chat messages but the tokenizer has no chat_template; "
                         "set tokenizer.chat_template or pass plain-text rows")
    return rows


def _tokenized(row: dict, index: int, sides: tuple, tokenizer, max_length: int) -> tuple:
    """``(prompt ids, ids of each side)``: a side's tokens start where the tokenized prompt and
    the tokenized prompt + side diverge; prompt + side is cut to ``max_length``."""
    if isinstance(row["prompt"], list):
        prompt = _ids(tokenizer, row["prompt"], generation_prompt=True)
        full = [_ids(tokenizer, row["prompt"] + row[side]) for side in sides]
    else:
        prompt = _ids(tokenizer, row["prompt"])
        full = [_ids(tokenizer, row["prompt"] + _with_eos(row[side], tokenizer.eos_token))
                for side in sides]
    start = min(_common_prefix(prompt, ids) for ids in full)
    if start >= max_length:
        raise DataError(f"{where(row, index)}: the prompt is {start} tokens, max_length is "
                        f"{max_length}; raise max_length or shorten the prompt")
    return (prompt[:start], *(ids[start:max_length] for ids in full))


def _with_eos(text: str, eos: str | None) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> tuple[dict, dict]:
    """``(chosen, rejected)`` batches, each ``input_ids``, ``completion_mask`` and
    ``attention_mask`` ``[B, T]`` (int64, right-padded to the longest row of its side)."""
    return tuple(_pad([(pair.prompt, getattr(pair, side)) for pair in pairs], pad_token_id)
                 for side in ("chosen", "rejected"))


def _pad(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    length = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for row, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion)
        completion_mask[row, len(prompt):n] = 1
        attention_mask[row, :n] = 1
    return dict(input_ids=input_ids, completion_mask=completion_mask,
                attention_mask=attention_mask)
