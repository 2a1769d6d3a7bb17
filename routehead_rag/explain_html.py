"""The picture of an :class:`~routehead_rag.explain.Explanation`: one self-contained HTML page, no script.

Passages best first, each with its attended words highlighted by weight (orange: drew attention; blue: drew
less than under the content-free query; the shade grows with the square root of the weight, on one scale for
the whole page, so passages compare), the text past the passage budget greyed out, and the score's parts
(heads, fusion, calibration) in one line; the heads as a small bar chart: the router's weight for each, and
each head's share of the best passage's attention. Every text from the caller is HTML-escaped.

The functions take an :class:`~routehead_rag.explain.Explanation` (and its passages); this
module does not import it (``Explanation.to_html`` imports this one).
"""

from __future__ import annotations

from html import escape
from typing import Any

PLAIN_CHARACTERS = 400  # a passage without attended spans shows its first characters only
MOST_HEADS = 16  # the bar chart shows at most this many heads (every head's share for "all" is in to_dict())

_STYLE = """
.rh-explain { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1f2328; max-width: 1100px;
  line-height: 1.5; font-size: 14px; }
.rh-explain h2 { font-size: 18px; margin: 0 0 4px 0; }
.rh-explain .rh-meta { color: #59636e; margin-bottom: 12px; }
.rh-explain .rh-heads { display: grid; grid-template-columns: 70px 1fr 1fr; gap: 2px 10px; align-items: center;
  margin: 8px 0 16px 0; max-width: 640px; }
.rh-explain .rh-heads .rh-h { font-family: ui-monospace, monospace; font-size: 12px; }
.rh-explain .rh-bar { height: 12px; background: #eef1f4; position: relative; border-radius: 2px; }
.rh-explain .rh-bar span { position: absolute; top: 0; bottom: 0; border-radius: 2px; }
.rh-explain .rh-bar em { position: absolute; right: 4px; top: -2px; font-size: 11px; font-style: normal;
  color: #59636e; }
.rh-explain .rh-head-title { font-size: 12px; color: #59636e; }
.rh-explain .rh-passage { border: 1px solid #d1d9e0; border-radius: 6px; padding: 8px 12px; margin: 0 0 10px 0; }
.rh-explain .rh-top { display: flex; gap: 12px; align-items: baseline; flex-wrap: wrap; }
.rh-explain .rh-rank { font-weight: 700; font-size: 16px; }
.rh-explain .rh-score { font-family: ui-monospace, monospace; }
.rh-explain .rh-parts { color: #59636e; font-size: 12px; font-family: ui-monospace, monospace; }
.rh-explain .rh-text { white-space: pre-wrap; margin-top: 6px; }
.rh-explain .rh-text mark { color: inherit; border-radius: 2px; padding: 0; }
.rh-explain .rh-unread { color: #9198a1; }
.rh-explain .rh-words { font-size: 12px; color: #59636e; margin-top: 4px; }
"""


def render(explanation: Any, top_spans: int = 5) -> str:
    """The page (a ``<div>`` with its own style, valid standalone and inside Jupyter)."""
    scale = max((abs(s.weight) for p in explanation.passages for s in p.spans or ()), default=0.0) or 1.0
    parts = [f"<div class='rh-explain'><style>{_STYLE}</style>",
             f"<h2>Query: {escape(explanation.query)}</h2>", _meta(explanation), _heads(explanation)]
    parts += [_passage(p, scale, top_spans) for p in explanation.passages]
    parts.append("</div>")
    return "\n".join(parts)


def page(explanation: Any, top_spans: int = 5) -> str:
    """:func:`render` as a whole HTML document (what ``--explain-html`` writes)."""
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>RouteHead: "
            f"{escape(explanation.query)}</title></head><body>\n{render(explanation, top_spans)}\n</body></html>\n")


def _meta(explanation: Any) -> str:
    fusion = (f"fused with the first stage (weight {explanation.fusion_weight:.3f})"
              if explanation.fusion_weight is not None else "no first-stage fusion")
    scores = "probabilities of relevance" if explanation.calibrated else "uncalibrated scores"
    return (f"<div class='rh-meta'>heads: {escape(explanation.description)} · {fusion} · {scores} · "
            f"{len(explanation.passages)} documents</div>")


def _heads(explanation: Any) -> str:
    if not explanation.heads:
        return ""
    best = next((p for p in explanation.passages if p.attention is not None), None)
    shares = best.contributions if best is not None else {}
    chosen = list(explanation.heads)
    if len(chosen) > MOST_HEADS:  # every head ("all"): the ones that moved the best passage most
        chosen = sorted(chosen, key=lambda c: -abs(shares.get(c.head, 0.0)))[:MOST_HEADS]
    largest = max((abs(shares.get(c.head, 0.0)) for c in chosen), default=0.0) or 1.0
    routed = any(c.router_weight is not None for c in chosen)
    title = f"share of #1's attention ({best.attention:+.4f})" if best is not None else "share of attention"
    rows = [f"<div class='rh-head-title'>head</div><div class='rh-head-title'>"
            f"{'router weight' if routed else 'router weight: none (' + escape(explanation.strategy) + ')'}</div>"
            f"<div class='rh-head-title'>{escape(title)}</div>"]
    for choice in chosen:
        weight = choice.router_weight
        router = (f"<div class='rh-bar'><span style='left:0;width:{100 * weight:.1f}%;background:#8250df'></span>"
                  f"<em>{weight:.2f}</em></div>") if weight is not None else "<div></div>"
        share = shares.get(choice.head, 0.0)
        width = 50 * abs(share) / largest
        left = 50 if share >= 0 else 50 - width
        colour = "#fb8f44" if share >= 0 else "#54aeff"
        rows.append(f"<div class='rh-h'>{choice.head}</div>{router}<div class='rh-bar'><span style='left:{left:.1f}%;"
                    f"width:{width:.1f}%;background:{colour}'></span><em>{share:+.4f}</em></div>")
    more = len(explanation.heads) - len(chosen)
    note = f"<div class='rh-meta'>and {more} more heads (every head's share is in to_dict())</div>" if more else ""
    return f"<div class='rh-heads'>{''.join(rows)}</div>{note}"


def _parts(p: Any) -> str:
    if p.attention is None:
        return "blank: nothing to score, ranked last"
    heads = sorted(p.contributions.items(), key=lambda item: -abs(item[1]))
    shown = " + ".join(f"{h} {v:+.4f}" for h, v in heads[:4]) + (f" + {len(heads) - 4} more" if len(heads) > 4 else "")
    text = f"attention {p.attention:+.4f} = {shown}"
    if p.outlier_masking:
        text += f" {p.outlier_masking:+.4f} (outlier masking)"
    if p.fused != p.attention:  # fused with the first stage or the bi-encoder (or standardised): its parts
        text += f" · fused {p.fused:+.3f} = attention {p.attention_part:+.3f} + first stage {p.first_stage_part:+.3f}"
        if p.bi_encoder_part:
            text += f" + bi-encoder {p.bi_encoder_part:+.3f}"
    if p.probability is not None:
        text += f" · probability {p.probability:.3f}"
    return text + f" · first-stage rank {p.first_stage_rank}"


def _passage(p: Any, scale: float, top_spans: int) -> str:
    document = p.document
    head = (f"<div class='rh-top'><span class='rh-rank'>#{document.rank}</span><span>id "
            f"{escape(str(document.id))}</span><span class='rh-score'>score {document.score:+.4f}</span></div>"
            f"<div class='rh-parts'>{escape(_parts(p))}</div>")
    words = ""
    if p.spans:
        listed = ", ".join(f"{escape(document.text[s.start:s.end])} ({s.weight:+.4f})" for s in p.top_spans(top_spans))
        words = f"<div class='rh-words'>most attended: {listed}</div>"
    return f"<div class='rh-passage'>{head}<div class='rh-text'>{_text(p, scale)}</div>{words}</div>"


def _text(p: Any, scale: float) -> str:
    """The document's text with its spans marked; what the model did not read (other chunks, past the budget)
    greyed out."""
    text = p.document.text
    if p.spans is None:
        short = text if len(text) <= PLAIN_CHARACTERS else text[:PLAIN_CHARACTERS] + "…"
        return escape(short)
    read_from = p.document.chunk[0] if p.document.chunk else 0
    read_to = p.scored_end if p.scored_end is not None else (p.document.chunk[1] if p.document.chunk else len(text))
    head = text[:read_from] if read_from <= PLAIN_CHARACTERS else "…" + text[read_from - PLAIN_CHARACTERS : read_from]
    out = [f"<span class='rh-unread'>{escape(head)}</span>" if read_from else ""]
    position = read_from
    for span in p.spans:
        out.append(escape(text[position : span.start]))
        alpha = min(abs(span.weight) / scale, 1.0) ** 0.5  # the square root: faint words stay visible
        colour = f"rgba(251,143,68,{alpha:.2f})" if span.weight >= 0 else f"rgba(84,174,255,{alpha:.2f})"
        out.append(f"<mark style='background:{colour}' title='{span.weight:+.5f}'>"
                   f"{escape(text[span.start : span.end])}</mark>")
        position = span.end
    out.append(escape(text[position:read_to]))
    if read_to < len(text):
        tail = text[read_to:] if len(text) - read_to <= PLAIN_CHARACTERS else text[read_to : read_to + PLAIN_CHARACTERS] + "…"
        note = " [not read: past the passage budget]" if p.scored_end is not None else " [other chunks]"
        out.append(f"<span class='rh-unread'>{escape(tail)}{escape(note)}</span>")
    return "".join(out)
