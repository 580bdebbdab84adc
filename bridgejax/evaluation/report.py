"""WORKDIR/eval/report.html: one self-contained page (thumbnails embedded as base64 PNG) with the
metrics table and examples of every evaluated task: generated vs reference captions, the images
retrieved for a caption, VQA answers and VisDial rounds.

    python -m bridgejax.evaluation.report WORKDIR [--examples 16]   # default: each task's report_examples

It reads eval/<task>.json and eval/<task>_predictions.json, and the images from the dataset
directory those files name.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
from collections import Counter

from PIL import Image

from bridgejax import paths
from bridgejax.evaluation import table as table_lib

THUMB = 112

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px} table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left} th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums} img{display:block;border:1px solid #ccc}
.gen{font-weight:600} .empty{color:#b00;font-style:italic} .refs{color:#555;margin:4px 0 0 16px;padding:0}
.strip{display:flex;gap:6px;align-items:flex-start} .strip figure{margin:0;font-size:11px;text-align:center}
.hit img{border:3px solid #1a7f37} .ok{color:#1a7f37} .bad{color:#b00}
"""


class _Images:
  """Thumbnails of dataset records as data: URIs, cached."""

  def __init__(self):
    self._splits, self._cache = {}, {}

  def uri(self, dataset: dict, index: int, size: int = THUMB) -> str:
    key = (dataset["dir"], dataset["split"], index, size)
    if key not in self._cache:
      from bridgejax.data.records import open_split  # lazy: bridgejax.data, ~0.1 s of CLI start
      split_key = (dataset["dir"], dataset["split"])
      if split_key not in self._splits:
        self._splits[split_key] = open_split(dataset["dir"], dataset["split"])
      image = Image.open(io.BytesIO(self._splits[split_key][index]["image"])).convert("RGB")
      image.thumbnail((size, size))
      buf = io.BytesIO()
      image.save(buf, format="PNG")
      self._cache[key] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return self._cache[key]


def _img(uri: str, title: str = "", size: int = THUMB) -> str:
  return f'<img src="{uri}" width="{size}" height="{size}" alt="{html.escape(title)}" title="{html.escape(title)}">'


def _text(s: str) -> str:
  return f'<span class="gen">{html.escape(s)}</span>' if s.strip() else '<span class="empty">(empty)</span>'


def _metrics_table(results: dict[str, dict]) -> str:
  rows = []
  for task, summary in results.items():
    cols = table_lib.columns_for([{task: summary}], [task])
    cells = "".join(f"<th>{html.escape(h)}</th>" for _, _, h in cols)
    values = "".join(f'<td class="num">{table_lib.fmt(m, summary["metrics"].get(m))}</td>' for _, m, _ in cols)
    ds = summary.get("dataset", {})
    counts = ", ".join(f"{k} {v}" for k, v in summary.get("counts", {}).items())
    rows.append(f"<tr><th rowspan=2>{html.escape(task)}</th>{cells}</tr><tr>{values}</tr>"
                f'<tr><td colspan="{len(cols) + 1}" class="meta">{html.escape(ds.get("dir", ""))} : '
                f'{html.escape(ds.get("split", ""))} — protocol {html.escape(summary.get("protocol", "?"))} — '
                f'{html.escape(counts)} — {summary.get("wall_time_s", 0):.1f} s'
                "</td></tr>")
  return "<table>" + "".join(rows) + "</table>"


def _caption_section(preds: dict, images: _Images, n: int) -> str:
  rows = []
  for p in preds["predictions"][:n]:
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in p["references"])
    rows.append(f"<tr><td>{_img(images.uri(preds['dataset'], p['index']), p['id'])}</td>"
                f"<td>{_text(p['caption'])}<ul class=refs>{refs}</ul>"
                f'<div class="meta">id {html.escape(str(p["id"]))}; raw: {html.escape(repr(p["generated"]))}</div></td></tr>')
  return "<h2>Captioning</h2><table><tr><th>image</th><th>generated / references</th></tr>" + "".join(rows) + "</table>"


def _retrieval_section(preds: dict, images: _Images, n: int) -> str:
  index_of = {p["id"]: p["index"] for p in preds["predictions"]}
  rows = []
  for p in preds["predictions"][:n]:
    if not p["queries"]:
      continue
    q = p["queries"][0]
    strip = "".join(
        f'<figure class="{"hit" if g == p["id"] else ""}">{_img(images.uri(preds["dataset"], index_of[g]), g, 80)}'
        f"{k + 1}</figure>" for k, g in enumerate(q["top_images"]) if g in index_of)
    texts = "".join(f"<li>{html.escape(t)}</li>" for t in p["top_texts"][:3])
    rows.append(f"<tr><td>{_img(images.uri(preds['dataset'], p['index']), p['id'])}</td>"
                f"<td><b>{html.escape(q['text'])}</b><div class=meta>rank of this image: {q['t2i_rank']}</div>"
                f'<div class="strip">{strip}</div></td>'
                f"<td><div class=meta>best caption at rank {p['i2t_rank']}; top texts:</div><ol>{texts}</ol></td></tr>")
  return ("<h2>Retrieval</h2><table><tr><th>image</th><th>text → images (the true image framed)</th>"
          "<th>image → texts</th></tr>" + "".join(rows) + "</table>")


def _vqa_section(preds: dict, images: _Images, n: int) -> str:
  index_of = {}
  rows = []
  for p in preds["predictions"][:n]:
    index_of.setdefault(p["image_id"], p["index"])
    common = ", ".join(f"{a} ×{c}" for a, c in Counter(p["answers"]).most_common(3))
    rows.append(f"<tr><td>{_img(images.uri(preds['dataset'], p['index']), str(p['image_id']), 80)}</td>"
                f"<td>{html.escape(p['question'])}<div class=meta>{html.escape(p['answer_type'])}</div></td>"
                f"<td>{_text(p['answer'])}</td><td>{html.escape(common)}</td></tr>")
  return ("<h2>VQA</h2><table><tr><th>image</th><th>question</th><th>answer</th><th>humans</th></tr>"
          + "".join(rows) + "</table>")


def _visdial_section(preds: dict, images: _Images, n: int) -> str:
  index_of = {p["id"]: p["index"] for p in preds["predictions"]}
  rows = []
  for p in preds["predictions"][:n]:
    rounds = "".join(
        f"<li>{html.escape(r['question'])}? <span class={'ok' if r['gt_rank'] == 1 else 'bad'}>"
        f"{html.escape(r['predicted'])}</span> <span class=meta>(truth: {html.escape(r['answer'])}, "
        f"rank {r['gt_rank']})</span></li>" for r in p["rounds"][:4])
    strip = "".join(
        f'<figure class="{"hit" if g == p["id"] else ""}">{_img(images.uri(preds["dataset"], index_of[g]), g, 64)}'
        f"{k + 1}</figure>" for k, g in enumerate(p["top_images"]) if g in index_of)
    rows.append(f"<tr><td>{_img(images.uri(preds['dataset'], p['index']), p['id'])}</td>"
                f"<td><div class=meta>{html.escape(p['caption'])}</div><ol>{rounds}</ol></td>"
                f'<td><div class=meta>images for the dialog (true rank {p["t2i_rank"]})</div>'
                f'<div class="strip">{strip}</div></td></tr>')
  return ("<h2>VisDial</h2><table><tr><th>image</th><th>rounds: predicted (truth, rank)</th><th>T2I</th></tr>"
          + "".join(rows) + "</table>")


SECTIONS = {"caption": _caption_section, "retrieval": _retrieval_section, "vqa": _vqa_section,
            "visdial": _visdial_section}


def render(workdir: str, examples: int | None = None) -> str:
  """The page; `examples` per task (default: each task's report_examples setting, else 16)."""
  results = table_lib.load_workdir(workdir)
  images = _Images()
  first = next(iter(results.values()))
  work = paths.path(workdir)
  parts = [f"<h1>{html.escape(first.get('config') or work.name)} "
           f"@ step {first.get('checkpoint_step')}</h1>",
           f'<div class="meta">{html.escape(str(work))} — generated {html.escape(first.get("created", ""))}'
           " — rates ×100</div>", "<h2>Metrics</h2>", _metrics_table(results)]
  kind = lambda task: results[task].get("type", task)  # JSONs written before config.evals name the type
  order = {t: i for i, t in enumerate(table_lib.TASK_ORDER)}
  for task in sorted((t for t in results if kind(t) in SECTIONS), key=lambda t: (order[kind(t)], t)):
    path = work / "eval" / f"{task}_predictions.json"
    if not path.exists():
      continue
    preds = paths.read_json(path)
    n = examples if examples is not None else results[task].get("settings", {}).get("report_examples", 16)
    parts.append(SECTIONS[kind(task)](preds, images, n))
  return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>bridgejax eval report</title>"
          f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>")


def write_report(workdir: str, examples: int | None = None) -> str:
  path = paths.path(workdir) / "eval" / "report.html"
  paths.write_text(path, render(workdir, examples))
  return str(path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m bridgejax.evaluation.report", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir")
  p.add_argument("--examples", type=int, default=None,
                 help="examples shown per task (default: each task's report_examples)")
  a = p.parse_args(argv)
  return table_lib.print_or_fail(lambda: write_report(a.workdir, a.examples))


if __name__ == "__main__":
  sys.exit(main())
