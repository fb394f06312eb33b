"""Prompts for generation, built by the item processor so they are token-identical to training sequences.

    builder = ItemPromptBuilder(tokenizer, target_size=512)
    builder.text_to_image("A red bicycle", 512, 512, T2I_TEMPLATE)   # <s> human turn <reserved08706>
    builder.conversation({"conversations": [{"from": "human", "value": "<|image|> What is this?"}],
                          "image": ["cat.jpg"]}, base_dir="data")
    read_prompts_file("prompts.txt")          # one prompt per line (blank lines and '#' lines skipped)
    read_conversations("items.json")          # Lumina JSON list, or one item per line (.jsonl)

A prompt is what the item processor (data/item_processor.py) makes of the conversation up to the end of the
last human turn, i.e. ``<s>``, each turn followed by ``<reserved08706>``, image blocks in place of
``<|image|>``; the assistant turn is left open (no end-of-turn after it), as Lumina's inference does. An item
may end with the human turn or with ``{"from": "gpt", "value": null}`` (how Lumina's own inference code
writes the open turn); one that already ends with an answer is refused.

The text-to-image template is Lumina's: "Generate an image of {W}x{H} according to the following
prompt:\\n{prompt}" (``{W}``, ``{H}``, ``{prompt}`` are filled in; any other template may be given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from data.item_processor import ASSISTANT_ROLES, ItemError, ItemProcessor
from model.tokenizer.bundle import EOT, ChameleonTokenizer

__all__ = ["ItemPromptBuilder", "PromptBuilder", "read_prompts_file", "read_conversations", "T2I_TEMPLATE",
           "GenerationInputError"]

T2I_TEMPLATE = "Generate an image of {W}x{H} according to the following prompt:\n{prompt}"


class GenerationInputError(ValueError):
    """A prompt, conversation, resolution or model that cannot be generated from; the message names it."""


class PromptBuilder(Protocol):
    """Turns user input into prompt tokens exactly as training sequences are built (ItemPromptBuilder below)."""

    def text_to_image(self, prompt: str, width: int | None, height: int | None, template: str) -> list[int]: ...

    def conversation(self, item: dict, base_dir: str | Path | None = None) -> list[int]: ...


# the item processor builds whole training items, which need an assistant turn; a placeholder one is added
# and cut off again (turns are encoded one by one, so the tokens before it do not depend on it)
_PLACEHOLDER = "x"


class ItemPromptBuilder:
    """``PromptBuilder`` over ``ItemProcessor`` (``target_size``: crop budget for input images)."""

    def __init__(self, tokenizer: ChameleonTokenizer, target_size: int = 512):
        self.tokenizer = tokenizer
        self.processor = ItemProcessor(tokenizer, target_size=target_size)
        self._tail = len(tokenizer.encode_text(_PLACEHOLDER + EOT))

    def text_to_image(self, prompt: str, width: int | None, height: int | None,
                      template: str = T2I_TEMPLATE) -> list[int]:
        """The human turn (``template`` filled in when a resolution is given, else the prompt as written)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerationInputError(f"empty prompt {prompt!r}")
        text = template.format(W=width, H=height, prompt=prompt) if width is not None else prompt
        return self._open_turn({"conversations": [{"from": "human", "value": text}]})

    def conversation(self, item: dict, base_dir: str | Path | None = None) -> list[int]:
        """Tokens of a Lumina-format item up to its open assistant turn."""
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list) or not item["conversations"]:
            raise ItemError("expected an object with a non-empty 'conversations' list")
        conv = list(item["conversations"])
        last = conv[-1]
        if isinstance(last, dict) and str(last.get("from", "")).lower() in ASSISTANT_ROLES:
            if last.get("value") is not None:
                raise ItemError(f"the conversation already ends with an answer ({last['from']}: "
                                f"{str(last['value'])[:60]!r}); end it with the human turn, or with "
                                f'{{"from": "gpt", "value": null}}, to have the answer generated')
            conv = conv[:-1]
        if not conv:
            raise ItemError("the conversation has no human turn to answer")
        return self._open_turn({**item, "conversations": conv}, base_dir)

    def _open_turn(self, item: dict, base_dir: str | Path | None = None) -> list[int]:
        conv = item["conversations"] + [{"from": "gpt", "value": _PLACEHOLDER}]
        tokens, _labels = self.processor.process_item({**item, "conversations": conv}, base_dir=base_dir)
        return tokens[:-self._tail]


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts, one per line (UTF-8); blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationInputError(f"--prompts_file {path}: cannot read it ({e})") from e
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise GenerationInputError(f"--prompts_file {path}: no prompts in it (one per line)")
    return prompts


def read_conversations(path: str | Path) -> list[dict]:
    """Lumina-format items from a JSON list (``.json``) or one object per line (``.jsonl``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".jsonl":
            items = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        else:
            items = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        kind = "JSON lines" if p.suffix == ".jsonl" else "a JSON list"
        raise GenerationInputError(f"--conversations {path}: cannot read it as {kind} ({e})") from e
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        raise GenerationInputError(f"--conversations {path}: expected a non-empty list of items with 'conversations'")
    return items
