"""Attention heads as values: ``Head(layer, head)`` printed as ``L12.H5``.

A head is always addressed by its (layer, query-head) pair in the *query* head
numbering of the model (GQA models share key/value heads, but every query head
has its own attention pattern and is scored on its own).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

_HEAD_PATTERN = re.compile(r"^\s*L(\d+)\.H(\d+)\s*$", re.IGNORECASE)


class Head(NamedTuple):
    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}.H{self.head}"

    @classmethod
    def parse(cls, text: str) -> Head:
        """Parse ``"L12.H5"`` into ``Head(12, 5)``."""
        if not isinstance(text, str):
            raise TypeError(f"a head is written like 'L12.H5', got {type(text).__name__}: {text!r}")
        match = _HEAD_PATTERN.match(text)
        if match is None:
            raise ValueError(f"cannot parse head {text!r}: write heads as 'L<layer>.H<head>', e.g. 'L12.H5'")
        return cls(int(match.group(1)), int(match.group(2)))


def as_heads(heads: Iterable[Head | str | tuple[int, int]]) -> list[Head]:
    """Normalise an iterable of heads (``Head``, ``"L3.H1"`` or ``(3, 1)``), keeping order, dropping repeats."""
    if isinstance(heads, (str, bytes)):
        raise TypeError(
            f"expected a list of heads, got the string {heads!r}: pass ['L3.H1', ...] or a heads file path"
        )
    result: list[Head] = []
    seen: set[Head] = set()
    for index, item in enumerate(heads):
        if isinstance(item, str):
            head = Head.parse(item)
        elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(v, int) for v in item):
            head = Head(int(item[0]), int(item[1]))
        else:
            raise TypeError(f"head #{index} is {item!r}: expected 'L<layer>.H<head>' or a (layer, head) pair")
        if head.layer < 0 or head.head < 0:
            raise ValueError(f"head #{index} {head} has a negative index")
        if head not in seen:
            seen.add(head)
            result.append(head)
    return result


@dataclass(frozen=True)
class HeadGrid:
    """The heads of one model, ``num_layers x num_heads``, and the one flat numbering of them.

    Tensors over every head of a model are ``[layer, head, ...]``; flattened they are
    ``[layer * num_heads + head, ...]`` (router logits, labelled-set scores, search labels).
    """

    num_layers: int
    num_heads: int

    @property
    def size(self) -> int:
        return self.num_layers * self.num_heads

    def flat(self, head: Head) -> int:
        return head.layer * self.num_heads + head.head

    def head(self, flat_index: int) -> Head:
        return Head(flat_index // self.num_heads, flat_index % self.num_heads)

    def heads(self, flat_indices: Iterable[int]) -> list[Head]:
        return [self.head(int(i)) for i in flat_indices]

    def check(self, heads: Iterable[Head], where: str = "this backbone") -> None:
        """Raise ``ValueError`` naming the first head outside the grid, and the valid range."""
        for head in heads:
            if head.layer >= self.num_layers or head.head >= self.num_heads:
                raise ValueError(
                    f"head {head} does not exist in {where} ({self.num_layers} layers x {self.num_heads} heads: "
                    f"valid heads are L0.H0 .. L{self.num_layers - 1}.H{self.num_heads - 1})"
                )


def load_heads_file(path: str | Path) -> list[Head]:
    """Read heads from a file: a JSON list (or ``{"heads": [...]}``) or one ``L12.H5`` per line / comma-separated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"heads file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("[") or text.startswith("{"):
        data = json.loads(text)
        if isinstance(data, dict):
            if "heads" not in data:
                raise ValueError(f"{path}: a JSON object must have a 'heads' list")
            data = data["heads"]
        return as_heads(data)
    items = [part for part in re.split(r"[\s,]+", text) if part]
    if not items:
        raise ValueError(f"heads file {str(path)!r} lists no heads")
    return as_heads(items)


def format_heads(heads: Iterable[Head]) -> str:
    return ", ".join(str(h) for h in heads)
