"""``report.html``: the report's table and plots in one self-contained file.

The plots are embedded as base64 PNG ``data:`` URIs and the style sheet is inline, so the file
refers to nothing outside itself: it opens offline, from an e-mail attachment or a copied folder.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; }
figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
"""


def page(title: str, intro: str, head: list[str], body: list[list[str]], plots: list[Path], caption: str) -> str:
    """The HTML text: a title, one intro paragraph, the table and every plot inlined."""
    e = html.escape
    rows = ["<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body]
    figs = []
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        figs.append(f'<figure><img alt="{e(p.stem)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{STYLE}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>", f"<p>{e(intro)}</p>",
        '<table id="results">', *rows, "</table>", '<div id="plots">', *figs, "</div>", "</body>", "</html>", ""])


def write(path: Path, title: str, intro: str, head: list[str], body: list[list[str]], plots: list[Path],
          caption: str) -> Path:
    path = Path(path)
    path.write_text(page(title, intro, head, body, plots, caption), encoding="utf-8")
    return path
