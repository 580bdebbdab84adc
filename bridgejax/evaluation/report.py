"""WORKDIR/eval/report.html: one self-contained page (thumbnails embedded as base64 PNG) with the
metrics table and examples of every evaluated task, each in its evaluator's section (generated vs
reference captions, the images retrieved for a caption, VQA answers, VisDial rounds, composed queries).

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

from PIL import Image

from bridgejax import paths
from bridgejax.evaluation import table as table_lib
from bridgejax.evaluation.evaluators import REGISTRY
from bridgejax.evaluation.markup import THUMB

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


class Images:
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


def render(workdir: str, examples: int | None = None) -> str:
  """The page; `examples` per task (default: each task's report_examples setting, else 16)."""
  results = table_lib.load_workdir(workdir)
  images = Images()
  first = next(iter(results.values()))
  work = paths.path(workdir)
  parts = [f"<h1>{html.escape(first.get('config') or work.name)} "
           f"@ step {first.get('checkpoint_step')}</h1>",
           f'<div class="meta">{html.escape(str(work))} — generated {html.escape(first.get("created", ""))}'
           " — rates ×100</div>", "<h2>Metrics</h2>", _metrics_table(results)]
  sections = {name: e.section for name, e in REGISTRY.items() if e.section is not None}
  kind = lambda task: results[task].get("type", task)  # JSONs written before config.evals name the type
  order = {t: i for i, t in enumerate(sections)}
  for task in sorted((t for t in results if kind(t) in sections), key=lambda t: (order[kind(t)], t)):
    path = work / "eval" / f"{task}_predictions.json"
    if not path.exists():
      continue
    preds = paths.read_json(path)
    n = examples if examples is not None else results[task].get("settings", {}).get("report_examples", 16)
    parts.append(sections[kind(task)](preds, images, n))
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
