"""Data text (questions, answers, model names from the data or a generations file) made inert before it is
placed in a Markdown report: no raw HTML (`<script>`, `<img onerror=...>`) and no links or images
(`[x](javascript:...)`) when report.md is rendered by GitHub, the MLflow UI or any CommonMark viewer.

CommonMark's backslash escapes turn the characters that start HTML and links into literal text, so the report
still reads as written: `\\<script\\>` renders as "<script>", not as a script.
"""

from __future__ import annotations

import re

# The backslash first (so the text cannot un-escape what follows), then what opens HTML, autolinks and links.
_ACTIVE = re.compile(r"([\\<>\[\]])")


def inline(text: str) -> str:
    """`text` safe inside a Markdown paragraph, heading, list item, table-free quote."""
    return _ACTIVE.sub(r"\\\1", text)
