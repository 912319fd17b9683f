"""``report.html``: one self-contained page per run, readable offline (no scripts, no external
CSS; images by relative path so the run folder can be moved or zipped as a whole).

Each part of the pipeline contributes ``ReportSection(title, images, metrics)`` records; the page
is those sections in order, each with a metrics table and a grid of images.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from export.atomic import write_text


@dataclass
class ReportSection:
    title: str
    images: list[Path] = field(default_factory=list)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    text: str = ""


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts -> (dotted key, value) rows, in insertion order."""
    rows: list[tuple[str, Any]] = []
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            rows.extend(flatten_metrics(v, key + "."))
        else:
            rows.append((key, v))
    return rows


def format_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        text = ", ".join(format_value(x) for x in v)
        return text if len(text) <= 200 else text[:197] + "..."
    return str(v)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left;
font-size:.9em}td.v{font-family:monospace;text-align:right}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;width:320px}
.grid img{width:100%;height:auto;border:1px solid #ccc}figcaption{font-size:.8em;color:#555}
"""


def render_html(sections: Iterable[ReportSection], title: str, base_dir: Path, header: Mapping[str, Any] | None = None) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body>\n<h1>{e(title)}</h1>\n"]
    if header:
        parts.append(_table(list(header.items())))
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2>\n")
        if s.text:
            parts.append(f"<p>{e(s.text)}</p>\n")
        scalars = {k: v for k, v in s.metrics.items() if not _is_matrix(v)}
        rows = flatten_metrics(scalars)
        if rows:
            parts.append(_table(rows))
        for k, v in s.metrics.items():
            if _is_matrix(v):
                parts.append(_matrix(k, v))
        if s.images:
            parts.append("<div class='grid'>\n")
            for img in s.images:
                rel = Path(os.path.relpath(Path(img).resolve(), base_dir.resolve())).as_posix()
                parts.append(f"<figure><a href='{e(rel)}'><img src='{e(rel)}' loading='lazy' alt='{e(Path(img).name)}'>"
                             f"</a><figcaption>{e(Path(img).stem)}</figcaption></figure>\n")
            parts.append("</div>\n")
    parts.append("</body></html>\n")
    return "".join(parts)


def _is_matrix(v: Any) -> bool:
    """Per-side (or per-view) records, e.g. ``{"left": {...}, "right": {...}}``: shown side by side."""
    return isinstance(v, Mapping) and len(v) > 0 and all(isinstance(x, Mapping) for x in v.values())


def _matrix(title: str, records: Mapping[str, Mapping[str, Any]]) -> str:
    e = html.escape
    cols = list(records)
    flat = {c: dict(flatten_metrics(records[c])) for c in cols}
    keys: list[str] = []
    for c in cols:
        keys += [k for k in flat[c] if k not in keys]
    head = "".join(f"<th>{e(str(c))}</th>" for c in cols)
    body = "".join(
        f"<tr><th>{e(k)}</th>" + "".join(f"<td class='v'>{e(format_value(flat[c].get(k)))}</td>" for c in cols) + "</tr>\n"
        for k in keys
    )
    return f"<table>\n<tr><th>{e(title)}</th>{head}</tr>\n{body}</table>\n"


def _table(rows: list[tuple[str, Any]]) -> str:
    e = html.escape
    body = "".join(f"<tr><th>{e(str(k))}</th><td class='v'>{e(format_value(v))}</td></tr>\n" for k, v in rows)
    return f"<table>\n{body}</table>\n"


def write_report(
    path: str | Path, sections: Iterable[ReportSection], title: str = "handrecon report",
    header: Mapping[str, Any] | None = None,
) -> Path:
    """Write the page; image paths may be absolute or relative to the CWD, they are stored
    relative to the report's folder."""
    path = Path(path)
    return write_text(path, render_html(list(sections), title, path.parent, header))


def stage_sections(metrics: Mapping[str, Mapping[str, Any]], images: Mapping[str, list[Path]] | None = None) -> list[ReportSection]:
    """One section per stage from ``state.metrics``, with the stage's images if any."""
    images = images or {}
    return [ReportSection(f"stage {name}", list(images.get(name, [])), m) for name, m in metrics.items()]

