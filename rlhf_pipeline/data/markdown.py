"""Stack Exchange post HTML -> Markdown.

We use `html-to-markdown` (Rust core): it decodes entities, keeps links, images, lists, blockquotes and
tables, writes <pre><code> as fenced code blocks, and does not backslash-escape `_` or `*` (escapes
would teach the policy to emit them). It is several times faster than markdownify on the beer dump (docs/data.md),
which is what makes the stage's throughput target reachable on one core (see docs/data.md).

The library's defaults are exactly the options we want, and passing no options skips a per-call options
conversion that costs more than the conversion itself; tests over real bodies pin the output style.
"""

from __future__ import annotations

import html_to_markdown
from html_to_markdown import exceptions as h2m_errors

_CONVERSION_ERRORS = (
    h2m_errors.ConversionError,
    h2m_errors.ParseError,
    h2m_errors.InvalidInputError,
    h2m_errors.InputTooLargeError,
    h2m_errors.SanitizationError,
)


def to_markdown(html: str) -> str | None:
    """Markdown for one post body; "" for an empty body; None if the HTML cannot be converted."""
    if not html or html.isspace():
        return ""
    try:
        return html_to_markdown.convert(html).content.strip()
    except _CONVERSION_ERRORS:
        return None
