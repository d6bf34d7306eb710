"""One self-contained HTML page for one or several runs: inline SVG, CSS and a small script.

Nothing on the page is fetched: no CDN, no font, no image file. The script only adds hover
readouts and legend toggles; the charts are drawn without it. It marks the page rendered
(``document.body.dataset.rendered``) and records any script error in
``document.body.dataset.errors``, which the browser test reads.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from atoll import __version__
from atoll.report.rundata import RunData
from atoll.report.sections import (
    chain_section,
    comparison_section,
    header,
    loss_section,
    plan_section,
    sync_section,
    throughput_section,
    timeline_section,
    wan_section,
)
from atoll.report.svg import esc

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#f6f7f9}
header.top{background:#1d2b3a;color:#fff;padding:12px 24px}
header.top h1{margin:0;font-size:20px} header.top p{margin:2px 0 0;color:#b8c4d0;font-size:12px}
main{padding:8px 24px 40px;max-width:1180px}
section.run{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:16px 0;padding:4px 18px 14px}
h2{font-size:18px;margin:12px 0 4px} h3{font-size:15px;margin:18px 0 6px;border-bottom:1px solid #eee}
h4{font-size:13px;margin:12px 0 4px}
.row{display:flex;flex-wrap:wrap;gap:12px}
figure.plot{margin:6px 0;position:relative} figcaption{font-weight:600;font-size:13px;margin-bottom:2px}
svg text.tick{font-size:10px;fill:#555} svg text.label{font-size:11px;fill:#333}
svg text.lane-label{font-size:12px;font-weight:600;fill:#222} svg text.row{font-size:9px;fill:#777}
.legend{font-size:11px;display:flex;flex-wrap:wrap;gap:4px 12px;max-width:1120px}
.legend .key{cursor:pointer;user-select:none} .legend .key.off{opacity:.35}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:-1px}
.readout{font-size:11px;color:#333;min-height:15px}
table{border-collapse:collapse;margin:6px 0;font-size:12px} th,td{border:1px solid #e1e4e8;padding:3px 7px}
th{background:#f0f2f5;text-align:left} table.num td{text-align:right} table.num td:first-child{text-align:left}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px;margin:8px 0}
dl.facts dt{color:#666} dl.facts dd{margin:0}
p.note{font-size:12px;color:#555;margin:4px 0} p.na{font-size:12px;color:#888}
.verdict{padding:1px 6px;border-radius:3px} .v-true{background:#d4f4dd} .v-false{background:#fbd5d5}
.v-none{background:#fff1c2}
"""

SCRIPT = r"""
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    errors.push(String(e.message || e.type));
    document.body.dataset.errors = JSON.stringify(errors);
  });
  function nearest(points, x) {
    var best = null;
    for (var i = 0; i < points.length; i++) {
      if (best === null || Math.abs(points[i][0] - x) < Math.abs(best[0] - x)) best = points[i];
    }
    return best;
  }
  function fmt(v) {
    var a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toPrecision(4) + 'M';
    if (a >= 1e4) return (v / 1e3).toPrecision(4) + 'k';
    return Number(v.toPrecision(4)).toString();
  }
  document.querySelectorAll('figure.plot[data-kind="line"]').forEach(function (fig) {
    var svg = fig.querySelector('svg.chart');
    var out = fig.querySelector('.readout');
    var cursor = svg.querySelector('line.cursor');
    var x0 = +svg.dataset.x0, x1 = +svg.dataset.x1, p0 = +svg.dataset.px0, p1 = +svg.dataset.px1;
    var series = Array.prototype.map.call(svg.querySelectorAll('g.series'), function (g) {
      return {g: g, label: g.dataset.label, xy: JSON.parse(g.dataset.xy)};
    });
    svg.addEventListener('mousemove', function (ev) {
      var box = svg.getBoundingClientRect();
      var px = (ev.clientX - box.left) * svg.viewBox.baseVal.width / box.width;
      if (px < p0 || px > p1) return;
      var x = x0 + (px - p0) / (p1 - p0) * (x1 - x0);
      cursor.setAttribute('x1', px); cursor.setAttribute('x2', px); cursor.setAttribute('visibility', 'visible');
      out.textContent = 'x ' + fmt(x) + ': ' + series.filter(function (s) {
        return s.g.style.display !== 'none';
      }).map(function (s) {
        var p = nearest(s.xy, x);
        return s.label + ' ' + fmt(p[1]);
      }).join(' | ');
    });
    svg.addEventListener('mouseleave', function () { cursor.setAttribute('visibility', 'hidden'); });
    fig.querySelectorAll('.legend .key').forEach(function (key) {
      key.addEventListener('click', function () {
        var g = series[+key.dataset.index].g;
        var off = g.style.display !== 'none';
        g.style.display = off ? 'none' : '';
        key.classList.toggle('off', off);
      });
    });
  });
  document.body.dataset.rendered = '1';
})();
"""


def run_section(run: RunData, *, index: int) -> str:
    """Everything about one run, in the order a reader asks: how the loss moves, where the time
    goes, the WAN, throughput, the sync and whether sites agree, the chain and the plan."""
    blocks = [
        ("Summary", header(run)),
        ("Loss", loss_section(run)),
        ("Timeline", timeline_section(run)),
        ("WAN", wan_section(run) if run.multi_site else ""),
        ("Throughput, utilization and MFU", throughput_section(run)),
        ("Synchronization", sync_section(run)),
        ("Chain: lineage and evaluation", chain_section(run)),
        ("Plan: predicted against measured", plan_section(run)),
    ]
    body = "".join(f"<h3>{esc(title)}</h3>{html}" for title, html in blocks if html)
    return (
        f'<section class="run" id="run-{index}" data-run="{esc(run.label)}"><h2>{esc(run.label)}</h2>{body}</section>'
    )


def render_report(runs: Sequence[RunData], *, title: str | None = None) -> str:
    """The HTML page for `runs` (one or several, side by side)."""
    if not runs:
        raise ValueError("render_report needs at least one run")
    title = title or ("atoll run report: " + ", ".join(r.label for r in runs))
    made = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = []
    if len(runs) > 1:
        parts.append(
            f'<section class="run compare"><h2>{len(runs)} runs side by side</h2>{comparison_section(runs)}</section>'
        )
    parts += [run_section(r, index=i) for i, r in enumerate(runs)]
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body>"
        f'<header class="top"><h1>{esc(title)}</h1><p>written by atoll {esc(__version__)} on {esc(made)}; '
        "self-contained: opens offline</p></header>"
        f"<main>{''.join(parts)}</main><script>{SCRIPT}</script></body></html>\n"
    )
