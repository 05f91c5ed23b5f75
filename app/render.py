"""How a reply's text becomes the Markdown the chat shows.

Models often write code without a fence. As Markdown its line breaks are lost (single newlines
join a paragraph) and a ``# comment`` becomes a heading, so ``as_markdown`` shows a reply with no
fence whose lines read as code as one code block. ``looks_like_code`` is the test: most of its non-blank lines are indented or shaped
like code (``def``/``import``/``return`` lines, lines ending in ``:`` ``{`` ``}`` ``;``,
assignments, calls), over at least two lines.
"""

from __future__ import annotations

import re

FENCE = "```"
_CODE_LINE = re.compile(
    r"""^(\s{2,}|\t)\S                                  # indented
      | ^\s*(def|class|import|from\s+\S+\s+import|return|if|elif|else|for|while|try|except|with
            |fn|let|const|var|function|pub|use|package|func|public|private|static|\#include|print)\b
      | [:{};]\s*$ | ^\s*[}\])]                         # block openers and closers
      | ^\s*[\w.\[\]]+\s*(=|\+=|-=)\s*\S                # an assignment
      | ^\s*[\w.]+\(.*\)\s*$                           # a call
      | ^\s*(\#|//)                                     # a comment
    """, re.X)


def looks_like_code(text: str) -> bool:
    if FENCE in text:
        return False
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        return False
    code = sum(bool(_CODE_LINE.search(ln)) for ln in lines)
    prose = sum(ln.rstrip().endswith((".", "?", "!")) and len(ln.split()) > 4 for ln in lines)
    return code >= 0.7 * len(lines) and prose <= 0.2 * len(lines)


def as_markdown(text: str) -> str:
    """The Markdown source the reply view renders for ``text``. Code keeps its fence open: a
    streamed reply appends to it."""
    if looks_like_code(text):
        return f"{FENCE}\n{text}"
    return text
