"""The paper: facts from the run's outputs, poured into paper.md.j2, then typeset.

The three steps meet only at plain values: a dict of facts, a Markdown string, PDF bytes. Another renderer
(pandoc, LaTeX) can replace pdf.markdown_pdf without touching the facts or the prose.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jinja2

from weightdiff.files import write_atomic
from weightdiff.report.facts import FILTERS, paper_facts
from weightdiff.report.pdf import markdown_pdf

TEMPLATE = "paper.md.j2"


def write_paper(
    run: dict, figures_dir: Path, out_dir: Path, render_pdf: Callable[[str, Path], bytes] = markdown_pdf
) -> tuple[Path, Path]:
    """Writes out_dir/paper.md and out_dir/paper.pdf (atomically) from the run's outputs and figures.

    `run` holds the stages' outputs by name: manifest, extract (metrics), tensors (the reports), energy (the
    energy curve's rows), validate, layers (per-layer divergence rows), gguf, params.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    text = paper_markdown(paper_facts(run, figures_dir, out_dir))
    md_path = write_atomic(out_dir / "paper.md", text.encode())
    pdf_path = write_atomic(out_dir / "paper.pdf", render_pdf(text, out_dir))
    return md_path, pdf_path


def paper_markdown(facts: dict) -> str:
    """The paper as Markdown: the template rendered with the facts; a name the template uses that the facts
    lack is an error, not an empty string in the paper."""
    return template_environment().get_template(TEMPLATE).render(facts)


def template_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(FILTERS)
    return env
