"""The side-by-side report for human rating: one self-contained HTML file (`lorafuse eval --report`, the demo).

Each row shows a prompt, its reference answer, the base model's answer and each adapter's; per row and
adapter, a rater marks the adapter's answer better, the same or worse than the base's. Ratings are kept
in the browser's local storage (a reload or a closed tab loses nothing) and exported as a JSON file, which
`lorafuse eval --ratings FILE` summarises (ratings.py). The file needs no server and fetches nothing: the
CSS and the script are inline, and its Content-Security-Policy forbids every network request.
"""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

RATINGS = ("better", "same", "worse")
FORMAT = "lorafuse-ratings"


@dataclass
class Row:
    id: str  # stable within the report: "test:12", "general:3"
    section: str  # "test" (the held-out task) or "general" (the forgetting check)
    prompt: str
    reference: str | None  # the expected answer; None for general prompts (the base answer is the reference)
    answers: dict[str, str] = field(default_factory=dict)  # system name -> answer; "base" first


SECTION_TITLES = {"test": "Held-out task examples", "general": "General prompts (outside the task: forgetting)"}

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;padding:1.2em 2em;color:#1d2330;background:#fafbfc}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .5em}
.meta{color:#5a6270;margin-bottom:1em}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid #d8dde6;padding:.45em .6em;vertical-align:top;text-align:left}
th{background:#eef1f6;position:sticky;top:0}td.num{color:#5a6270;width:2.5em}
.answer{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12.5px}
.hit{border-left:4px solid #2e9d5b}.miss{border-left:4px solid #d0d5de}
.same-as-base{color:#7a8290;font-size:11px}.rate{white-space:nowrap;margin-top:.4em}
.rate label{margin-right:.5em;cursor:pointer}.summary td,.summary th{width:auto}
#bar{position:sticky;top:0;background:#fafbfc;padding:.5em 0;z-index:2;border-bottom:1px solid #d8dde6}
button{font:inherit;padding:.3em .9em;cursor:pointer}textarea{width:100%;height:7em;font-size:11px}
"""

SCRIPT = r"""
(function(){
  const info = JSON.parse(document.getElementById('report-data').textContent);
  const key = 'lorafuse-ratings:' + info.report;
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(key) || '{}'); } catch (e) { saved = {}; }
  saved.ratings = saved.ratings || {};
  const rater = document.getElementById('rater');
  rater.value = saved.rater || '';
  function store(){ try { localStorage.setItem(key, JSON.stringify(saved)); } catch (e) {} }
  function progress(){
    const done = Object.keys(saved.ratings).length;
    document.getElementById('progress').textContent = 'rated ' + done + ' of ' + info.slots;
  }
  document.querySelectorAll('input[type=radio][data-row]').forEach(function(input){
    const slot = input.dataset.row + '|' + input.dataset.system;
    if (saved.ratings[slot] === input.value) input.checked = true;
    input.addEventListener('change', function(){ saved.ratings[slot] = input.value; store(); progress(); });
  });
  rater.addEventListener('input', function(){ saved.rater = rater.value; store(); });
  function exported(){
    const rows = {};
    info.rows.forEach(function(r){ rows[r.id] = r; });
    const ratings = Object.keys(saved.ratings).sort().map(function(slot){
      const parts = slot.split('|');
      const row = rows[parts[0]] || {};
      return {row: parts[0], section: row.section, system: parts[1], rating: saved.ratings[slot]};
    });
    return {format: info.format, version: 1, report: info.report, title: info.title, baseline: info.baseline,
            systems: info.systems, rater: saved.rater || '', exported: new Date().toISOString(), ratings: ratings};
  }
  document.getElementById('export').addEventListener('click', function(){
    const text = JSON.stringify(exported(), null, 2);
    document.getElementById('exported').value = text;
    const link = document.createElement('a');
    link.href = URL.createObjectURL(new Blob([text], {type: 'application/json'}));
    link.download = 'ratings-' + info.report + '.json';
    document.body.appendChild(link); link.click(); link.remove();
  });
  document.getElementById('clear').addEventListener('click', function(){
    if (!window.confirm('Forget every rating of this report in this browser?')) return;
    saved.ratings = {}; store();
    document.querySelectorAll('input[type=radio][data-row]').forEach(function(i){ i.checked = false; });
    progress();
  });
  progress();
})();
"""


def _e(text) -> str:
    return html.escape("" if text is None else str(text))


def _norm(text: str | None) -> str:
    return (text or "").strip()


def write_report(path: str | Path, rows: list[Row], systems: list[str], *, title: str,
                 meta: dict | None = None, summary: list[tuple[str, dict]] | None = None) -> Path:
    """Write the report. systems: "base" first, then the adapters, each a key of every row's answers.
    summary: (metric name, {system: shown value}) lines for the table at the top."""
    if not systems or systems[0] != "base":
        raise ValueError("systems must start with 'base'")
    rated = systems[1:]
    payload = {"format": FORMAT, "title": title, "baseline": "base", "systems": systems,
               "rows": [{"id": r.id, "section": r.section} for r in rows], "slots": len(rows) * len(rated)}
    content = json.dumps([asdict(r) for r in rows], sort_keys=True) + json.dumps(systems)
    payload["report"] = hashlib.sha256(content.encode()).hexdigest()[:16]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        # nothing may be fetched: no scripts, styles, images, fonts or connections from anywhere
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:\">",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if meta:
        parts.append('<div class="meta">' + " &middot; ".join(f"{_e(k)}: {_e(v)}" for k, v in meta.items()) + "</div>")
    if summary:
        parts.append('<table class="summary"><tr><th></th>' + "".join(f"<th>{_e(s)}</th>" for s in systems) + "</tr>")
        for name, values in summary:
            parts.append(f"<tr><th>{_e(name)}</th>" + "".join(f"<td>{_e(values.get(s, ''))}</td>" for s in systems)
                         + "</tr>")
        parts.append("</table>")
    parts.append(
        '<div id="bar">' + ("Rate each adapter's answer against the base model's: better, same or worse. "
                            if rated else "")
        + 'Ratings stay in this browser. <span id="progress"></span> &middot; rater: '
        '<input id="rater" size="12" placeholder="your name"> <button id="export">Export ratings (JSON)</button> '
        '<button id="clear">Clear</button></div>')
    for section in dict.fromkeys(r.section for r in rows):
        section_rows = [r for r in rows if r.section == section]
        parts.append(f"<h2>{_e(SECTION_TITLES.get(section, section))} ({len(section_rows)})</h2>")
        head = "<tr><th>#</th><th>prompt</th>" + ("<th>reference</th>" if section != "general" else "")
        head += "".join(f"<th>{_e(s)}</th>" for s in systems) + "</tr>"
        parts.append(f'<table class="rows" data-section="{_e(section)}">{head}')
        for number, row in enumerate(section_rows, 1):
            cells = [f'<td class="num">{number}</td>', f'<td class="answer">{_e(row.prompt)}</td>']
            if section != "general":
                cells.append(f'<td class="answer">{_e(row.reference)}</td>')
            base = row.answers.get("base")
            for system in systems:
                answer = row.answers.get(system, "")
                hit = row.reference is not None and _norm(answer) == _norm(row.reference)
                cell = f'<td class="{"hit" if hit else "miss"}"><div class="answer">{_e(answer)}</div>'
                if system != "base":
                    if _norm(answer) == _norm(base):
                        cell += '<div class="same-as-base">identical to base</div>'
                    cell += '<div class="rate">' + "".join(
                        f'<label><input type="radio" name="{_e(row.id)}|{_e(system)}" value="{v}" '
                        f'data-row="{_e(row.id)}" data-system="{_e(system)}"> {v}</label>' for v in RATINGS) + "</div>"
                cells.append(cell + "</td>")
            parts.append(f'<tr data-row="{_e(row.id)}">' + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append('<h2>Exported ratings</h2><textarea id="exported" readonly '
                 'placeholder="Export ratings puts the JSON here too (and downloads it)"></textarea>')
    data = json.dumps(payload).replace("</", "<\\/")  # nothing in the data can close the script element
    parts.append(f'<script type="application/json" id="report-data">{data}</script>')
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
