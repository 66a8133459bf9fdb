"""Markdown and its figures → PDF, with fpdf2. It knows nothing of weight deltas: any Markdown whose figures
are an image line followed by an italic caption line (as paper.md.j2 writes them) typesets the same way."""

from __future__ import annotations

import re
from pathlib import Path

import markdown
import matplotlib
from fpdf import FPDF, FontFace, TextStyle
from PIL import Image

FIGURE = re.compile(r"^!\[[^\]]*\]\(([^)]+)\)\n\n\*([^*\n]+)\*$", re.MULTILINE)  # image line, caption line
TABLE = re.compile(r"<table>.*?</table>", re.DOTALL)
ROW = re.compile(r"<tr>(.*?)</tr>", re.DOTALL)
CELL = re.compile(r"<(t[dh])(?:\s[^>]*)?>(.*?)</\1>", re.DOTALL)
# Margins tuned by eye on rendered pages: fpdf2 scales user-given heading margins much more than its own.
TAG_STYLES = {
    "h1": TextStyle(
        font_family="DejaVu", font_style="B", font_size_pt=17, color=(20, 40, 90), t_margin=0, b_margin=0.5
    ),
    "h2": TextStyle(
        font_family="DejaVu", font_style="B", font_size_pt=14, color=(20, 40, 90), t_margin=10, b_margin=0.3
    ),
    "h3": TextStyle(
        font_family="DejaVu", font_style="B", font_size_pt=11.5, color=(20, 40, 90), t_margin=6, b_margin=0.2
    ),
    "code": FontFace(family="DejaVuMono", size_pt=9),
    "pre": TextStyle(font_family="DejaVuMono", font_size_pt=9, t_margin=3, b_margin=0.5, l_margin=6),
}


def markdown_pdf(text: str, base_dir: Path) -> bytes:
    """text typeset on A4: Markdown → HTML for the text, figures (paths relative to base_dir) placed directly.

    Figures are placed by hand rather than through write_html so that each is scaled to fit both the page
    width and the page height (the heatmap of a deep model is tall) and never runs off the page.
    """
    pdf = FPDF(format="A4")
    pdf.set_margins(18, 18, 18)
    pdf.set_auto_page_break(True, margin=18)
    register_fonts(pdf)
    pdf.add_page()
    pdf.set_font("DejaVu", size=10)
    parts = FIGURE.split(text)  # text, image path, caption, text, image path, caption, ..., text
    for i in range(0, len(parts), 3):
        body, heading = split_trailing_heading(parts[i])
        write_markdown(pdf, body)
        if i + 1 < len(parts):
            place_figure(pdf, (base_dir / parts[i + 1]).resolve(), parts[i + 2], heading)
    return bytes(pdf.output())


def split_trailing_heading(text: str) -> tuple[str, str]:
    """(text, "") or (text before, its last line) when that line is a heading: the heading of a section
    that opens with a figure, which must go on the figure's page."""
    body, _, last = text.rstrip().rpartition("\n")
    return (body, last) if last.startswith("#") else (text, "")


def write_markdown(pdf: FPDF, text: str) -> None:
    if text.strip():
        pdf.write_html(
            pdf_tables(markdown.markdown(text, extensions=["tables", "fenced_code"])),
            tag_styles=TAG_STYLES,
            table_line_separators=True,
        )


def pdf_tables(html: str) -> str:
    """Tables rewritten for fpdf2: cells without inline markup (it cannot nest tags in <td>), left-aligned
    (its default is justified), and columns as wide as their longest text (capped), not all equal."""
    return TABLE.sub(lambda m: pdf_table(m[0]), html)


def pdf_table(table: str) -> str:
    rows = [
        [(tag, re.sub(r"<[^>]+>", "", text).strip()) for tag, text in CELL.findall(row)] for row in ROW.findall(table)
    ]
    widths = [max(min(len(text), 60) for _, text in column) + 4 for column in zip(*rows, strict=False)]
    first = "".join(
        f'<{tag} align="left" width="{w}">{text}</{tag}>' for (tag, text), w in zip(rows[0], widths, strict=False)
    )
    rest = ["".join(f'<{tag} align="left">{text}</{tag}>' for tag, text in row) for row in rows[1:]]
    return "<br><table>" + "".join(f"<tr>{row}</tr>" for row in [first, *rest]) + "</table>"


def register_fonts(pdf: FPDF) -> None:
    """DejaVu Sans and Mono from matplotlib's data: Unicode (Σ, ‖, σ, ≈) without depending on system fonts."""
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for family, stem in (("DejaVu", "DejaVuSans"), ("DejaVuMono", "DejaVuSansMono")):
        for style, suffix in (("", ""), ("B", "-Bold"), ("I", "-Oblique"), ("BI", "-BoldOblique")):
            pdf.add_font(family, style, str(ttf / f"{stem}{suffix}.ttf"))


def place_figure(pdf: FPDF, path: Path, caption: str, heading: str) -> None:
    """heading (if any), then the image at page width (smaller and centred if that would be taller than a
    page), then its caption. The image shrinks by up to a third to fit the rest of the page; otherwise it
    moves to the next page, taking its heading along. Captions are typeset here, not by write_html: a chunk
    of HTML that starts in italics makes fpdf2 set the table cells that follow in italics too."""
    px_w, px_h = Image.open(path).size
    h = min(pdf.epw * px_h / px_w, pdf.eph - 30)
    caption_room, heading_room = 16, 14 if heading else 0
    if pdf.page_break_trigger - pdf.get_y() - heading_room - caption_room < 2 * h / 3:
        pdf.add_page()
    write_markdown(pdf, heading)
    h = min(h, pdf.page_break_trigger - pdf.get_y() - caption_room)
    w = h * px_w / px_h
    pdf.image(str(path), x=pdf.l_margin + (pdf.epw - w) / 2, y=pdf.get_y() + 2, w=w, h=h)
    pdf.set_y(pdf.get_y() + h + 4)
    pdf.set_font("DejaVu", "I", 9)
    pdf.multi_cell(0, 4.5, caption, align="C", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("DejaVu", "", 10)
    pdf.ln(2)
