"""Tables for a terminal or a log of a given width: whole columns, as many as fit, in priority order.
Left to itself, rich squeezes every column until it fits, down to one letter per line."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

CELL_MAX = 30  # a wider value (a path, an error) is cut with an ellipsis: one column never takes the screen


@dataclass
class Fitted:
    table: Table
    shown: list[str]
    left_out: list[str]  # wanted, but no room at this width
    width: int
    headers: Mapping[str, str]

    def left_out_line(self) -> str | None:
        """One line naming the columns left out for want of room, or None."""
        if not self.left_out:
            return None
        return listing(f"no room at {self.width} characters for {len(self.left_out)}:",
                       [self.headers.get(c, c) for c in self.left_out], self.width)


def short_names(keys: Sequence[str], taken: Iterable[str] = ()) -> dict[str, str]:
    """Each dotted key by its last component, or whole where that is shared with another key or is
    already the name of a column in `taken`."""
    last = [k.rpartition(".")[2] for k in keys]
    clash = {n for n in last if last.count(n) > 1} | set(taken)
    return {k: k if n in clash else n for k, n in zip(keys, last, strict=True)}


def cut(text: str, limit: int = CELL_MAX) -> str:
    text = " ".join(text.split())  # one line: a value with a newline would break the row
    return text if cell_len(text) <= limit else text[: limit - 1] + "…"


def listing(head: str, names: Sequence[str], width: int) -> str:
    """`head` and as many of `names` as fit in one line of `width`, then "…"."""
    line = head.rstrip()
    for i, name in enumerate(names):
        sep = " " if i == 0 else ", "
        tail = "" if i == len(names) - 1 else ", …"
        if cell_len(line + sep + name + tail) > width:
            return line + ("" if i == 0 else ",") + " …"
        line += sep + name
    return line


def wrap(texts: Iterable[str], width: int, first: str = "  ", rest: str = "      ") -> list[str]:
    """Lines of text within `width`, never broken inside a word: a long one goes on, indented by
    `rest` (a log or a terminal then never wraps it mid-word)."""
    return [line for t in texts for line in textwrap.wrap(
        t, width, initial_indent=first, subsequent_indent=rest, break_long_words=False,
        break_on_hyphens=False)]


def fit(columns: Sequence[str], rows: Sequence[Mapping[str, str]], width: int,
        headers: Mapping[str, str] | None = None) -> Fitted:
    """The table of `rows` (cell text by column) with the first `columns` that fit in `width`, each
    at its widest cell or header; a column that does not fit is left out (later, narrower ones may
    still fit). Cells are cut at CELL_MAX."""
    headers = headers or {}
    cells = {c: [cut(r.get(c, "")) for r in rows] for c in columns}
    widest = {c: max(cells[c], key=cell_len, default="") for c in columns}
    shown: list[str] = []
    left_out: list[str] = []
    for c in columns:
        if _width([*shown, c], headers, widest) <= width:
            shown.append(c)
        else:
            left_out.append(c)
    t = _table(shown, headers)
    for i in range(len(rows)):
        t.add_row(*(cells[c][i] for c in shown))
    return Fitted(t, shown, left_out, width, headers)


def _table(columns: Sequence[str], headers: Mapping[str, str]) -> Table:
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    for c in columns:
        t.add_column(headers.get(c, c), no_wrap=True, overflow="ellipsis")
    return t


def _width(columns: Sequence[str], headers: Mapping[str, str], widest: Mapping[str, str]) -> int:
    """What rich needs for these columns: a table of one row of their widest cells, measured."""
    probe = _table(columns, headers)
    probe.add_row(*(widest[c] for c in columns))
    return Console(width=10_000, file=io.StringIO()).measure(probe).maximum
