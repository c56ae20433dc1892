"""Figures that fit a page and titles that fit their figure, at any number of schemes; made (``new_figure``),
finished (``done``) and written as PNG and PDF (``save``) here for every figure module.

A figure asked for more than ``PAGE`` (10 x 8 inches; 1500 x 1200 pixels at dpi 150) is scaled down to fit, its
fonts with it (never below ``MIN_FONT`` points). Every title (the figure's and each panel's) is then measured and,
when wider than its room (the figure for the suptitle, the panel's grid cell for a panel title), broken into lines at spaces
(never inside ``$...$`` mathtext) and, if one word is still too wide, set smaller; constrained layout makes room for
the extra lines when the figure is drawn. Measuring needs only the Agg renderer's text metrics, not a draw.
"""
from __future__ import annotations

import re
from pathlib import Path

PAGE = (10.0, 8.0)  # inches: the largest figure written
MIN_FONT = 5.0
PANEL_ROOM = 0.85  # of a panel's grid cell (its share of the figure's width; its labels take some of the rest)
FIGURE_ROOM = 0.96  # of the figure's width for the suptitle


def page_size(width: float, height: float) -> tuple[float, float, float]:
    """(width, height, scale): the size asked for, scaled down to fit ``PAGE`` (scale 1 when it fits)."""
    scale = min(1.0, PAGE[0] / width, PAGE[1] / height)
    return width * scale, height * scale, scale


def _words(line: str) -> list[str]:
    """``line`` split at spaces outside ``$...$``."""
    words, current, math = [], "", False
    for ch in line:
        if ch == "$":
            math = not math
        if ch == " " and not math:
            words.append(current)
            current = ""
        else:
            current += ch
    return words + [current]


def wrap(text: str, chars: int) -> str:
    """``text`` with each line broken at spaces (outside mathtext) into lines of about ``chars`` characters."""
    out = []
    for line in text.split("\n"):
        row = ""
        for word in _words(line):
            if row and len(row) + 1 + len(word) > chars:
                out.append(row)
                row = word
            else:
                row = f"{row} {word}" if row else word
        out.append(row)
    return "\n".join(out)


def _visible_chars(text: str) -> int:
    return max(len(re.sub(r"\$[^$]*\$", "xxxx", line)) for line in text.split("\n"))


def _fit_text(text, room: float, renderer) -> None:
    for _ in range(4):
        width = text.get_window_extent(renderer).width
        if width <= room or not text.get_text():
            return
        chars = max(8, int(_visible_chars(text.get_text()) * room / width * 0.95))
        wrapped = wrap(text.get_text(), chars)
        if wrapped == text.get_text():  # one word wider than the room: smaller type
            text.set_fontsize(max(MIN_FONT, text.get_fontsize() * room / width * 0.98))
            if text.get_fontsize() <= MIN_FONT:
                return
        text.set_text(wrapped)


def fit(fig, scale: float = 1.0):
    """``fig`` with its fonts times ``scale`` (what ``page_size`` returned) and every title inside its room."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    if scale < 1.0:
        from matplotlib import rcParams
        from matplotlib.font_manager import FontProperties

        for text in fig.findobj(Text):
            text.set_fontsize(max(MIN_FONT, text.get_fontsize() * scale))
        for axis in ("x", "y"):
            base = FontProperties(size=rcParams[f"{axis}tick.labelsize"]).get_size_in_points()
            for ax in fig.axes:
                ax.tick_params(axis=axis, labelsize=max(MIN_FONT, base * scale))
    renderer = FigureCanvasAgg(fig).get_renderer()
    width = fig.bbox.width
    for ax in fig.axes:
        if ax.get_visible():
            spec = ax.get_subplotspec()
            share = ax.get_position().width if spec is None else \
                (spec.colspan.stop - spec.colspan.start) / spec.get_gridspec().ncols
            room = min(width * FIGURE_ROOM, share * width * PANEL_ROOM)
            for title in (ax.title, ax._left_title, ax._right_title):
                _fit_text(title, room, renderer)
    if fig._suptitle is not None:
        _fit_text(fig._suptitle, width * FIGURE_ROOM, renderer)
    return fig


def new_figure(width: float, height: float):
    """A constrained-layout ``Figure`` of that size, scaled down to fit ``PAGE`` (its fonts follow in ``done``)."""
    from matplotlib.figure import Figure

    width, height, scale = page_size(width, height)
    fig = Figure(figsize=(width, height), layout="constrained")
    fig._fit_scale = scale
    return fig


def done(fig):
    """The finished figure: fonts scaled with a shrunk one, every title in its room (``fit``)."""
    return fit(fig, getattr(fig, "_fit_scale", 1.0))


def save(fig, out: str | Path, dpi: int = 150) -> list[Path]:
    """Write ``out.png`` (at ``dpi``) and ``out.pdf``; returns both paths. ``out`` may carry a suffix or not."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix.lower() in (".png", ".pdf") else out
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_name(base.name + ".png"), base.with_name(base.name + ".pdf")]
    fig.savefig(paths[0], dpi=dpi)
    fig.savefig(paths[1])
    return paths
