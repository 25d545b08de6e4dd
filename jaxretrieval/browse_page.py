"""The page `python -m jaxretrieval.browse` writes: one self-contained HTML file (inline CSS and JS, no CDN, no
requests beyond its own thumbnails) whose data sits in a JSON <script> block and is drawn by a small vanilla script.

Every string that comes from data (captions, file names, ids, paths) reaches the page only through that JSON block
and is put into the document with `textContent` or as a property value (img.src, title), never parsed as HTML; the
JSON block escapes `<`, `>` and `&`, so a caption cannot close the block or open a comment. A content security
policy allows only this page's own script and style (by hash) and local images. Also here: the thumbnails (small
JPEGs made with PIL) and writing the page's folder.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from jaxretrieval.data.sources import image_file
from jaxretrieval.errors import DataError, OutputPathError

# Border colours of a result: the browser test compares each thumbnail's computed border against these.
COLOURS = {"c": "rgb(22, 163, 74)", "w": "rgb(220, 38, 38)", "j": "rgb(156, 163, 175)", "u": "rgb(209, 213, 219)"}
STATUS = {"c": "correct", "w": "wrong", "j": "junk", "u": "unknown"}
DATA_ID = "browse-data"
THUMB_SIZE = 160  # longest side, pixels
THUMB_NAME = re.compile(r"\d+\.jpg")

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#111827;background:#f9fafb}
header{padding:14px 20px;background:#111827;color:#f9fafb}
header h1{font-size:18px;margin:0 0 6px}
header .details span{margin-right:16px;color:#d1d5db}
.metrics{margin-top:6px}
.metric{display:inline-block;margin:2px 6px 2px 0;padding:2px 8px;border-radius:10px;background:#374151;color:#f9fafb}
.section-metrics .metric{background:#e5e7eb;color:#111827}
#controls{position:sticky;top:0;z-index:1;display:flex;flex-wrap:wrap;gap:8px;align-items:center;padding:8px 20px;
  background:#fff;border-bottom:1px solid #e5e7eb}
#controls input{width:260px;padding:4px 8px}
#tabs button{padding:4px 10px;border:1px solid #9ca3af;background:#fff;cursor:pointer}
#tabs button[aria-selected=true]{background:#111827;color:#fff}
main{padding:8px 20px}
.query{display:flex;gap:14px;padding:10px 0;border-bottom:1px solid #e5e7eb}
.query-info{flex:0 0 240px;overflow-wrap:anywhere}
.query-info .caption{margin:0 0 4px;font-weight:600}
.query-info img{height:120px;display:block;margin-bottom:4px}
.query-label,.muted{color:#6b7280;font-size:12px}
.ap{font-weight:600}
.gt{display:block;color:#b91c1c;font-size:12px}
.hits{display:flex;gap:8px;align-items:flex-start;overflow-x:auto;min-width:0}
.hit{margin:0;text-align:center;font-size:11px;color:#374151}
.hit img,.hit .hit-text{border:4px solid #d1d5db;display:block}
.hit img{height:104px}
.hit .hit-text{width:160px;height:104px;overflow:hidden;padding:2px 4px;text-align:left;font-size:12px;background:#fff}
.hit.junk img,.hit.junk .hit-text{border-style:dashed;opacity:.55}
#plots figure{display:inline-block;margin:8px}
#plots img{max-width:480px;border:1px solid #e5e7eb}
""" + "".join(f".hit.{STATUS[s]} img,.hit.{STATUS[s]} .hit-text{{border-color:{colour}}}\n"
          for s, colour in COLOURS.items())

JS = r"""
'use strict';
(function () {
  const DATA = JSON.parse(document.getElementById('browse-data').textContent);
  const meta = DATA.meta;
  const state = {section: 0, filter: '', sort: meta.sort, page: 0};
  const STATUS = {c: 'correct', w: 'wrong', j: 'junk', u: 'unknown'};
  const byId = function (id) { return document.getElementById(id); };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function number(x) {
    return Number.isInteger(x) ? String(x) : Number(x).toFixed(2);
  }
  function metricPills(parent, metrics) {
    Object.keys(metrics).forEach(function (key) {
      const pill = el('span', 'metric');
      pill.appendChild(el('b', null, key));
      pill.appendChild(document.createTextNode(' ' + number(metrics[key])));
      parent.appendChild(pill);
    });
  }
  function ordered(section) {
    const needle = state.filter;
    const rows = section.queries.filter(function (q) {
      return !needle || ((q.text || '') + ' ' + q.label).toLowerCase().indexOf(needle) >= 0;
    });
    if (state.sort !== 'index') {
      const sign = state.sort === 'ap_asc' ? 1 : -1;
      rows.sort(function (a, b) {
        if (a.ap === null || b.ap === null) return (a.ap === null) - (b.ap === null) || a.n - b.n;
        return sign * (a.ap - b.ap) || a.n - b.n;
      });
    }
    return rows;
  }
  function queryRow(section, q) {
    const row = el('div', 'query');
    row.dataset.query = q.label;
    const info = el('div', 'query-info');
    if (q.thumb) {
      const img = el('img');
      img.src = q.thumb;
      img.alt = q.label;
      info.appendChild(img);
    }
    if (q.text !== null) info.appendChild(el('p', 'caption', q.text));
    let label = q.label;
    if (q.pid !== null) label += ' \u00b7 id ' + q.pid;
    if (q.cam !== null) label += ' \u00b7 cam ' + (q.cam + 1);
    info.appendChild(el('div', 'query-label', label));
    if (q.ap !== null) info.appendChild(el('span', 'ap', 'AP ' + (100 * q.ap).toFixed(1) + '%'));
    if (q.gt !== null && q.gt > meta.k) info.appendChild(el('span', 'gt', 'first correct at rank ' + q.gt));
    if (q.gt === null && section.labelled) info.appendChild(el('span', 'gt', 'no valid match: not counted'));
    row.appendChild(info);
    const hits = el('div', 'hits');
    q.hits.forEach(function (hit) {
      const item = section.gallery[hit[0]];
      const status = STATUS[hit[2]];
      const figure = el('figure', 'hit ' + status);
      figure.dataset.gallery = item.label;
      figure.dataset.status = status;
      figure.title = item.label;
      if (item.thumb) {
        const img = el('img', 'thumb');
        img.src = item.thumb;
        img.alt = item.label;
        img.loading = 'lazy';
        figure.appendChild(img);
      } else {
        figure.appendChild(el('div', 'hit-text', item.text));
      }
      let text = (hit[3] ? '#' + hit[3] : 'junk') + '  ' + Number(hit[1]).toFixed(3);
      if (item.cam !== null) text += '  cam ' + (item.cam + 1);
      figure.appendChild(el('figcaption', null, text));
      hits.appendChild(figure);
    });
    row.appendChild(hits);
    return row;
  }
  function render() {
    const section = DATA.sections[state.section];
    const rows = ordered(section);
    const pages = Math.max(1, Math.ceil(rows.length / meta.page_size));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    const list = byId('queries');
    list.replaceChildren();
    rows.slice(state.page * meta.page_size, (state.page + 1) * meta.page_size).forEach(function (q) {
      list.appendChild(queryRow(section, q));
    });
    if (!rows.length) list.appendChild(el('p', 'muted', 'No query matches the filter.'));
    byId('page-info').textContent = 'page ' + (state.page + 1) + ' / ' + pages;
    byId('count').textContent = rows.length + ' of ' + section.queries.length + ' queries shown' +
      (section.total > section.queries.length ? ' (' + section.total + ' ranked; --max-queries kept ' +
       section.queries.length + ')' : '');
    byId('prev').disabled = state.page === 0;
    byId('next').disabled = state.page >= pages - 1;
    const sectionMetrics = byId('section-metrics');
    sectionMetrics.replaceChildren(el('b', null, section.title + ': '));
    metricPills(sectionMetrics, section.metrics);
    Array.prototype.forEach.call(byId('tabs').children, function (button, i) {
      button.setAttribute('aria-selected', String(i === state.section));
    });
  }
  function header() {
    byId('title').textContent = meta.title;
    const details = byId('details');
    meta.details.forEach(function (pair) { details.appendChild(el('span', null, pair[0] + ': ' + pair[1])); });
    metricPills(byId('metrics'), meta.metrics);
    DATA.sections.forEach(function (section, i) {
      const button = el('button', null, section.title);
      button.type = 'button';
      button.addEventListener('click', function () { state.section = i; state.page = 0; render(); });
      byId('tabs').appendChild(button);
    });
    byId('sort').value = state.sort;
    byId('sort').addEventListener('change', function (e) { state.sort = e.target.value; state.page = 0; render(); });
    byId('filter').addEventListener('input', function (e) {
      state.filter = e.target.value.trim().toLowerCase(); state.page = 0; render();
    });
    byId('prev').addEventListener('click', function () { state.page -= 1; render(); });
    byId('next').addEventListener('click', function () { state.page += 1; render(); });
    if (DATA.plots.length) {
      const plots = byId('plots');
      plots.hidden = false;
      if (DATA.plots_folder) {
        const link = el('a', null, 'plots folder');
        link.href = DATA.plots_folder;
        plots.appendChild(link);
      }
      DATA.plots.forEach(function (plot) {
        const figure = el('figure');
        const img = el('img');
        img.src = plot.src;
        img.alt = plot.name;
        figure.appendChild(img);
        figure.appendChild(el('figcaption', null, plot.name));
        plots.appendChild(figure);
      });
    }
  }
  header();
  render();
})();
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1 id="title"></h1>
<div class="details" id="details"></div>
<div class="metrics" id="metrics"></div>
</header>
<div id="controls">
<span id="tabs"></span>
<input id="filter" type="search" placeholder="filter queries (caption, id, file)" aria-label="filter queries">
<label>sort <select id="sort">
<option value="index">data order</option>
<option value="ap_asc">AP ascending (worst first)</option>
<option value="ap_desc">AP descending (best first)</option>
</select></label>
<button id="prev" type="button">&larr; prev</button>
<span id="page-info"></span>
<button id="next" type="button">next &rarr;</button>
<span id="count" class="muted"></span>
</div>
<main>
<div class="section-metrics" id="section-metrics"></div>
<div id="queries"></div>
<section id="plots" hidden><h2>Training curves</h2></section>
</main>
<script type="application/json" id="{data_id}">{data}</script>
<script>{js}</script>
</body>
</html>
"""

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def embed_json(data: Any) -> str:
    """`data` as JSON that is safe inside a <script> element: no `</script`, `<!--` or `-->` can appear, since every
    `<`, `>` and `&` (and the JS line separators) is written as a \\u escape, which JSON.parse reads back."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _JSON_ESCAPES[m.group()], text)


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render_page(data: dict[str, Any]) -> str:
    """The whole page for `data` (meta, sections, plots: see jaxretrieval.browse.page_data)."""
    csp = (f"default-src 'none'; img-src 'self' file: data:; style-src {_digest(CSS)}; script-src {_digest(JS)}; "
           f"base-uri 'none'; form-action 'none'")
    return TEMPLATE.format(csp=csp, title=html.escape(data["meta"]["title"]), css=CSS, js=JS, data_id=DATA_ID,
                           data=embed_json(data))


def read_page_data(page: str) -> dict[str, Any]:
    """The data embedded in a page `render_page` wrote (what the tests and other tools read back)."""
    found = re.search(f'<script type="application/json" id="{DATA_ID}">(.*?)</script>', page, re.S)
    if found is None:
        raise ValueError("no embedded browse data in the page")
    return json.loads(found.group(1))


class Thumbnails:
    """Image files -> the page's thumbnail URLs (thumbs/N.jpg), made once each."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def url(self, path: str) -> str:
        return self.names.setdefault(path, f"thumbs/{len(self.names)}.jpg")

    def render(self, size: int = THUMB_SIZE) -> dict[str, bytes]:
        """url -> JPEG bytes; an image that cannot be read is a DataError naming it."""
        def one(path: str) -> bytes:
            try:
                with Image.open(image_file(path)) as image:
                    image = ImageOps.exif_transpose(image).convert("RGB")
                    image.thumbnail((size, size))
            except OSError as e:
                raise DataError(f"cannot read image {path} for its thumbnail ({e})") from None
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80, optimize=True)
            return buffer.getvalue()

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            return dict(zip(self.names.values(), pool.map(one, self.names), strict=True))


def write_outputs(out: Path, page: str, thumbs: dict[str, bytes], plots: Path | None, names: Sequence[str]) -> None:
    """thumbs/ (stale N.jpg removed), plots/ and, last, index.html (replaced in one step)."""
    try:
        folder = out / "thumbs"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if THUMB_NAME.fullmatch(stale.name) and f"thumbs/{stale.name}" not in thumbs:
                stale.unlink()
        for url, data in thumbs.items():
            (out / url).write_bytes(data)
        if plots is not None and names:
            (out / "plots").mkdir(exist_ok=True)
            for name in names:
                shutil.copyfile(plots / name, out / "plots" / name)
        staged = out / ".index.html.tmp"
        staged.write_text(page, encoding="utf-8")
        os.replace(staged, out / "index.html")
    except OSError as e:
        raise OutputPathError(f"cannot write the page to --out {out} ({e.strerror or e}); choose another path or fix "
                              f"its permissions / free space") from None
