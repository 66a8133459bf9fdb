"""Values into Typst markup. Escaping is the default (the template environment's finalize): a model, tensor or
module name is free text, and unescaped q_proj's underscore would open emphasis, a `#` would run code and a `]`
would close the table cell it sits in. What the template means as markup says so (Markup, or the `markup` filter).
"""

from __future__ import annotations

import re

# Characters that are markup anywhere in a line, a `//` or `/*` (a comment) and a `--` (a dash).
INLINE = re.compile(r"[\\#$*_@<>`\[\]~]|/(?=[/*])|-(?=-)")
# What starts a heading, a list item or a term when it opens a source line, as a value may; and a numbered item.
LINE_START = re.compile(r"^[=+\-/]")
NUMBERED = re.compile(r"^\d+(?=\.\s)")


class Markup(str):
    """Typst markup, printed as it is."""


def escape(text: str) -> str:
    """text as Typst markup that typesets as text, each markup character escaped."""
    escaped = INLINE.sub(lambda m: "\\" + m[0], text)
    return NUMBERED.sub(lambda m: m[0] + "\\", LINE_START.sub(lambda m: "\\" + m[0], escaped))


def finalize(value: object) -> str:
    """What `{{ value }}` prints: Markup as it is, anything else escaped."""
    return value if isinstance(value, Markup) else escape(str(value))


def quoted(text: str) -> Markup:
    """text as a Typst string literal (an image path, a raw text)."""
    return Markup('"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"')


def code(text: str) -> Markup:
    """text in monospace, as it is: between backticks, or as #raw(...) when it holds a backtick itself."""
    return Markup(f"#raw({quoted(text)});" if "`" in text else f"`{text}`")


def trusted(text: str) -> Markup:
    """The `markup` filter: a macro's output (already escaped where it printed values) printed as it is."""
    return Markup(text)


FILTERS = {"code": code, "quoted": quoted, "markup": trusted}
