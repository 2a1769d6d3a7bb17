"""``routehead-rag rerank --explain`` and ``--explain-html FILE``: an explanation in the terminal and as a page.

The terminal shows the heads (router weight, share of the best passage's attention) and, for each passage
whose words were traced, the score's parts and the text with its most attended words highlighted. Passage
text is printed as rich ``Text`` (never parsed as markup); every other user text goes through ``escape``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .cli_shared import escape

if TYPE_CHECKING:
    from rich.console import Console

    from .explain import Explanation

TERMINAL_CHARACTERS = 600  # a passage is printed up to this many characters of what was read
HEADS_SHOWN = 12


def print_explanation(explanation: Explanation, console: Console, top_spans: int = 5) -> None:
    """The heads as a table, then each traced passage's parts and text with its ``top_spans`` words highlighted."""
    from rich.table import Table
    from rich.text import Text

    best = next((p for p in explanation.passages if p.attention is not None), None)
    shares = best.contributions if best is not None else {}
    heads = list(explanation.heads)
    if len(heads) > HEADS_SHOWN:
        heads = sorted(heads, key=lambda c: -abs(shares.get(c.head, 0.0)))[:HEADS_SHOWN]
    fusion = (f"fused with the first stage (weight {explanation.fusion_weight:.3f})"
              if explanation.fusion_weight is not None else "no first-stage fusion")
    table = Table(title=escape(f"Heads: {explanation.description} · {fusion}"), title_justify="left")
    for column in ("head", "router weight", "share of #1's attention"):
        table.add_column(column, justify="right")
    for choice in heads:
        weight = "-" if choice.router_weight is None else f"{choice.router_weight:.3f}"
        table.add_row(str(choice.head), weight, f"{shares.get(choice.head, 0.0):+.4f}")
    if len(explanation.heads) > len(heads):
        table.caption = f"{len(heads)} of {len(explanation.heads)} heads: those that moved #1 most"
    console.print(table)
    for passage in explanation.passages:
        if passage.spans is None:
            continue
        document = passage.document
        console.print(f"[bold]#{document.rank}[/bold] {escape(str(document.id))}  score {document.score:+.4f}",
                      highlight=False)
        parts = f"  attention {passage.attention:+.4f}"
        if passage.fused != passage.attention:  # fused with the first stage or the bi-encoder: its parts
            parts += f" · fused {passage.fused:+.3f} = {passage.attention_part:+.3f} + first stage {passage.first_stage_part:+.3f}"
            if passage.bi_encoder_part:
                parts += f" + bi-encoder {passage.bi_encoder_part:+.3f}"
        if passage.probability is not None:
            parts += f" · probability {passage.probability:.3f}"
        console.print(escape(parts + f" · first-stage rank {passage.first_stage_rank}"), style="dim", highlight=False)
        start = document.chunk[0] if document.chunk else 0
        end = passage.scored_end if passage.scored_end is not None else (
            document.chunk[1] if document.chunk else len(document.text))
        end = min(end, start + TERMINAL_CHARACTERS)
        text = Text("  " + document.text[start:end].replace("\n", " ⏎ ").replace("\r", " "))
        for span in passage.top_spans(top_spans):
            if span.end <= end:
                text.stylize("bold black on dark_orange" if span.weight > 0 else "bold", *_shifted(document.text, start,
                                                                                                    span.start, span.end))
        if end < len(document.text):
            text.append(" …", style="dim")
        console.print(text)


def _shifted(text: str, start: int, begin: int, end: int) -> tuple[int, int]:
    """Offsets ``[begin, end)`` of ``text`` in the printed line: after the indent, with each line break printed as
    three characters (" ⏎ ")."""
    def at(offset: int) -> int:
        return 2 + offset - start + 2 * text.count("\n", start, offset)

    return at(begin), at(end)


def write_html(explanation: Explanation, path: Path) -> Path:
    """The page (:meth:`Explanation.to_html` as a whole document), written atomically."""
    from .atomic import atomic_write_text
    from .explain_html import page

    return atomic_write_text(path, page(explanation))
