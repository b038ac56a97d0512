"""Plumbing shared by the pages of a run folder (index.html, quiz.html, study.html): templates with the CSS, the
JavaScript and the data inlined (the data as a JSON block: a file:// page cannot fetch a local JSON file in
Chromium), relative URLs, and reading results cells safely. No page logic lives here."""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from html import escape
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from urllib.parse import quote

from diffusion.views.images import DIFF_COLORMAP

TEMPLATES = Path(__file__).resolve().parent / "templates"
PIXELATED_BELOW = 256  # images narrower than this are enlarged with crisp pixels in the pages (CSS: pixelated)
Row = Dict[str, str]


def embed_json(data: object) -> str:
    """JSON safe inside a ``<script type="application/json">`` block: '<', '>' and '&' become \\u escapes, so no value
    (a class name, a path) can close the block ("</script>") or open a comment; ``JSON.parse`` reads them back.
    ASCII only (non-ASCII as \\u escapes too), so the page is the same bytes whatever the locale's encoding."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(template: str, title: str, script: str | Sequence[str], data: object,
                extra_css: Sequence[str] = ()) -> str:
    """A template from ``templates/`` with ``{{ head }}`` (doctype, title, the CSS: gallery.css, then ``extra_css``),
    ``{{ title }}``, ``{{ js }}``
    (dom.js, then ``script``: one template name or several, in order) and ``{{ data }}`` filled in one pass (text put
    in is never scanned for further fields)."""
    scripts = [script] if isinstance(script, str) else list(script)
    css = "\n".join((TEMPLATES / name).read_text(encoding="utf-8") for name in ("gallery.css", *extra_css))
    js = "\n".join((TEMPLATES / name).read_text(encoding="utf-8") for name in ("dom.js", *scripts))
    if "</" in css or "</script" in js.lower():
        raise ValueError(f"templates/{script}, dom.js or gallery.css contains '</': it would end the inline block "
                         "early")
    title = escape(title).encode("ascii", "xmlcharrefreplace").decode("ascii")
    head = ('<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n<style>\n{css}\n</style>\n</head>")  # the same head for every page
    fields = {"head": head, "title": title, "js": js, "data": embed_json(data)}
    page = (TEMPLATES / template).read_text(encoding="utf-8")
    page = re.sub(r"\{\{ (\w+) \}\}", lambda m: fields[m.group(1)], page)
    if not page.isascii():
        raise ValueError(f"templates/{template}, {script}, dom.js or gallery.css holds non-ASCII text: write it as "
                         "an escape")
    return page


def url(rel_path: str) -> str:
    """A run-relative file path as a relative URL (each segment percent-encoded: class names may hold spaces, '#')."""
    return quote(rel_path.replace("\\", "/"), safe="/")


def legend_gradient() -> str:
    """The difference map's colour scale as a CSS linear-gradient (the page's legend)."""
    stops = ", ".join(f"rgb{c} {100 * s:g}%" for s, c in DIFF_COLORMAP)
    return f"linear-gradient(to right, {stops})"


def cell_float(value: object) -> Optional[float]:
    """A CSV cell as a float; None when empty, not a number, or not finite (JSON has no NaN)."""
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def row_flipped(row: Row) -> Optional[bool]:
    return None if row.get("flipped") in (None, "") else row["flipped"] == "1"


def row_change(row: Row) -> float:
    """How much an edit changed its image: LPIPS when the run measured it, else pixel L2."""
    lpips = cell_float(row.get("lpips"))
    return lpips if lpips is not None else (cell_float(row.get("l2")) or 0.0)


def existing_url(run_dir: Path, rel_path: Optional[str]) -> Optional[str]:
    """The URL of a run-relative file, or None when it is not on disk (the page then shows a placeholder)."""
    return url(rel_path) if rel_path and (run_dir / rel_path).is_file() else None


def run_classes(rows: Sequence[Row]) -> List[str]:
    """Every class of the run (sources and targets), in order of first appearance."""
    seen: "OrderedDict[str, None]" = OrderedDict()
    for r in rows:
        seen.setdefault(r["source_class"])
        seen.setdefault(r["target_class"])
    return list(seen)
