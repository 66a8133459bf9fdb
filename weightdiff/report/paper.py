"""The paper: facts from the run's outputs, poured into paper.typ.j2 (Typst), then typeset by Typst.

The three steps meet only at plain values: a dict of facts, a Typst source file, PDF bytes. Another typesetter
can replace typst_pdf without touching the facts or the prose.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jinja2
import typst

from weightdiff.files import write_atomic
from weightdiff.report import markup
from weightdiff.report.facts import FILTERS, paper_facts

TEMPLATE = "paper.typ.j2"
BIBLIOGRAPHY = "references.yml"


def typst_pdf(source: Path, root: Path) -> bytes:
    """source typeset to PDF with only the fonts Typst's wheel embeds (Libertinus Serif, New Computer Modern
    Math, DejaVu Sans Mono): a system font would make the PDF depend on the machine."""
    return typst.compile(source, root=root, ignore_system_fonts=True)


def write_paper(
    run: dict, figures_dir: Path, out_dir: Path, render_pdf: Callable[[Path, Path], bytes] = typst_pdf
) -> tuple[Path, Path]:
    """Writes out_dir/paper.typ and out_dir/paper.pdf (atomically) from the run's outputs and figures.

    `run` holds the stages' outputs by name: manifest, extract (metrics), tensors (the reports), energy (the
    energy curve's rows), validate, layers (per-layer divergence rows), gguf, params. render_pdf(source, root)
    typesets the written source; root is the folder that holds both it and the figures, as Typst reads no file
    outside its root.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    source = write_atomic(out_dir / "paper.typ", paper_source(paper_facts(run, figures_dir, out_dir)).encode())
    root = Path(os.path.commonpath([figures_dir.resolve(), out_dir.resolve()]))
    pdf_path = write_atomic(out_dir / "paper.pdf", render_pdf(source, root))
    return source, pdf_path


def paper_source(facts: dict) -> str:
    """The paper as Typst: the template rendered with the facts and the bibliography, inlined so that the source
    compiles alone. A name the template uses that the facts lack is an error, not an empty string in the paper."""
    references = (Path(__file__).parent / BIBLIOGRAPHY).read_text()
    return template_environment().get_template(TEMPLATE).render(facts | {"references": references})


def template_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=markup.finalize,
    )
    env.filters.update(FILTERS | markup.FILTERS)
    return env
