"""Text cut to a width, with `…` where it was cut: table cells, figure titles, run names."""
from __future__ import annotations


def shorten(text: str, width: int) -> str:
    """`text`, or its first `width` - 1 characters and `…` when it is longer than `width`."""
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def shorten_middle(text: str, width: int) -> str:
    """Cut in the middle: names often differ only at their end (grid-lr-0.01, grid-lr-0.1;
    tf_efficientnet_b0, tf_efficientnet_b3)."""
    if len(text) <= width:
        return text
    tail = min(max(width // 3, 1), width - 1)
    return text[:width - 1 - tail] + "…" + text[-tail:]
