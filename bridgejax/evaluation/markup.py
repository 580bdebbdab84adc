"""The HTML pieces of eval/report.html that every evaluator's report section uses."""

from __future__ import annotations

import html

THUMB = 112  # thumbnail side in pixels


def img(uri: str, title: str = "", size: int = THUMB) -> str:
  return f'<img src="{uri}" width="{size}" height="{size}" alt="{html.escape(title)}" title="{html.escape(title)}">'


def text(s: str) -> str:
  """Generated text, bold; an empty generation shown as such."""
  return f'<span class="gen">{html.escape(s)}</span>' if s.strip() else '<span class="empty">(empty)</span>'


def strip(ranked, size: int) -> str:
  """A row of ranked thumbnails, the hits framed: [(1-based rank, uri, title, is_hit), ...]."""
  return "".join(f'<figure class="{"hit" if hit else ""}">{img(uri, title, size)}{rank}</figure>'
                 for rank, uri, title, hit in ranked)


escape = html.escape
