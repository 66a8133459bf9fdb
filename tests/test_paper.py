"""The paper from synthetic runs: its numbers come from the inputs, its sentences follow the options the run had
(rank policy, experts, extras), its verdicts follow the numbers, and the PDF is typeset: mathematics in a math
font, numbered figures, tables and sections that the text refers to, and references.

Assertions on the prose read the Typst source with its escapes undone (`plain`): q_proj is written q\\_proj there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jinja2
import networkx as nx
import pymupdf
import pytest
import typst
from dvc.repo import Repo

from helpers_report import (
    RANK,
    expert_reports,
    extra_reports,
    extract_metrics,
    synthetic_divergence,
    synthetic_reports,
)
from weightdiff.figures import FIGURE_NAMES, write_figures
from weightdiff.metrics import energy_curves
from weightdiff.report import facts, markup
from weightdiff.report.facts import (
    energy_at,
    energy_verdict,
    experts_facts,
    extras_facts,
    fmt_bytes,
    fmt_energy,
    fmt_num,
    kept_energy,
    kl_factor,
    kl_verdict,
    module_type_rows,
    rank_facts,
    rank_text,
    target_names,
)
from weightdiff.report.paper import paper_source, typst_pdf, write_paper

SHA_A = "060db6499f32faf8b98477b0a26969ef7d8b9987"
SHA_B = "7ae557604adf67be50417f59c2c2f167def9a775"
# Per-module ranks an energy policy could have chosen: 2..8, so PEFT's r is 8 and the spread is 2–8.
ADAPTIVE_RANKS = [2, 3, 4, 5, 6, 7, 8] * 3


def synthetic_run(reports: list[dict] | None = None, policy: str = "fixed") -> dict:
    """The dict the paper stage assembles, shaped as FORMATS.md describes, with distinctive numbers."""
    reports = synthetic_reports() if reports is None else reports
    metrics = extract_metrics(reports, policy=policy)
    return {
        "manifest": {
            "model_a": {
                "source": "org/base",
                "kind": "hub",
                "path": "/cache/a",
                "revision": SHA_A,
                "files": [{"name": "model.safetensors", "size": 988_097_824}, {"name": "config.json", "size": 700}],
            },
            "model_b": {
                "source": "org/tuned",
                "kind": "hub",
                "path": "/cache/b",
                "revision": SHA_B,
                "files": [{"name": "model.safetensors", "size": 988_097_824}],
            },
        },
        "extract": metrics,
        "tensors": reports,
        "energy": energy_curves(reports, metrics["rank_max"]),
        "validate": {
            "kl_adapted": 2.5e-6,
            "kl_base": 0.0834,
            "top1_adapted": 0.996,
            "top1_base": 0.875,
            "tokens": 256,
            "gap_closed": 1 - 2.5e-6 / 0.0834,
            "texts": "built-in",
            "verdict": "reproduces",
            "gap_closed_target": 0.99,
            "verdict_summary": "A + adapter reproduces B: rank 4 keeps 61% of ‖ΔW‖² yet closes 99.997% of the KL gap",
        },
        "layers": synthetic_divergence(),
        "gguf": {
            "written": True,
            "reason": None,
            "arch": "llama",
            "tensors": 44,
            "bytes": 35_200_000,
            "dtype": "f32",
            "left_out": [],
        },
        "params": {
            "model_a": "org/base",
            "model_b": "org/tuned",
            "extract": {
                "rank": RANK,
                "rank_policy": policy,
                "energy": 0.9,
                "max_rank": 64,
                "alpha": None,
                "target_modules": ["q_proj", "k_proj", "v_proj"],
                "dtype": "bf16",
                "svd": {"method": "randomized", "oversample": 10, "power_iters": 2, "seed": 0},
            },
            "validate": {"device": "cpu"},
        },
    }


def plain(source: str) -> str:
    """The Typst source with its escapes undone, so that assertions read names as they are."""
    return re.sub(r"\\(.)", r"\1", source)


def source_of(run: dict, root: Path = Path("/repo")) -> str:
    return plain(paper_source(facts.paper_facts(run, root / "reports" / "figures", root / "reports" / "paper")))


def pdf_text(path: Path) -> str:
    """The PDF's text, whitespace collapsed (lines break where Typst set them)."""
    return " ".join(" ".join(page.get_text() for page in pymupdf.open(path)).split())


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repo")
    run = synthetic_run()
    pipeline = nx.DiGraph([("extract", "figures"), ("figures", "paper")])
    write_figures(run["tensors"], run["energy"], run["extract"], run["layers"], pipeline, root / "reports" / "figures")
    return write_paper(run, root / "reports" / "figures", root / "reports" / "paper")


def test_the_source_carries_the_runs_numbers(paper: tuple[Path, Path]) -> None:
    text = plain(paper[0].read_text())
    for expected in (
        "rank-4",
        "r = 4",
        "2.50 × 10⁻⁶",
        "0.0834",
        "56.2:1",
        SHA_A,
        SHA_B,
        "16.8 MiB",
        "942.3 MiB",
        "0.6123",
        "87.5%",
        "99.6%",
        "256 tokens",
        "closes 99.997% of the KL gap",
        "what it leaves is 3.00 × 10⁻⁵",
        "weightdiff's built-in evaluation text",
        "is after layer 3",
        "93.4 s",
        "33.6 MiB",
        f"{os.cpu_count()} CPU cores",
        "model.layers.1.self_attn.v_proj.weight",
        "`model.embed_tokens.weight` (0.5000 at rank 4; the target\n  0.9 needs rank ≥ 210)",
        "at most 3.20 × 10⁻⁷ more",
        "A streamed from the Hub (40 BF16, 21 F8_E4M3 tensors; FP8 e4m3 with block scales, dequantized on read); "
        "B read from a fetched snapshot (61 BF16 tensors); units run by the ray executor",
    ):
        assert expected in text, expected
    for heading in ("Introduction", "Method", "Experiments", "Results", "Discussion", "Conclusion"):
        assert f"\n= {heading}\n" in text
    assert "$Delta W$ is not low-rank" in text  # energy 0.61 must not be called low-rank


def test_claims_false_under_some_options_are_gone(paper: tuple[Path, Path]) -> None:
    text = plain(paper[0].read_text())
    for gone in ("2-D linear layer", "Peak memory", "two tensors plus the SVD workspace", "is not carried over"):
        assert gone not in text, gone


def test_rank_subsection_reads_the_energy_curve() -> None:
    run = synthetic_run()
    curve = run["energy"]
    text = source_of(run)
    assert (
        f"At $r/2 = 2$ the fraction would be\n{fmt_energy(curve[1]['energy'])}, and at rank 1 "
        f"{fmt_energy(curve[0]['energy'])}" in text
    )
    run["energy"] = [row | {"energy": 0.25 * row["rank"] - 0.01} for row in curve]  # a curve no spectrum gives
    assert "the fraction would be\n0.4900, and at rank 1 0.2400" in source_of(run)


def test_the_paper_says_what_doubling_the_rank_would_keep_where_the_curve_reaches_it() -> None:
    run = synthetic_run()
    run["energy"] = [{"rank": k, "energy": 0.1 * k} for k in range(1, 2 * RANK + 1)]
    assert f"Doubling the rank to {2 * RANK} would keep at least {fmt_energy(0.8)}" in source_of(run)
    run["energy"] = run["energy"][: 2 * RANK - 1]  # a curve that stops short of 2r says nothing of it
    assert "Doubling the rank" not in source_of(run)


def test_a_fixed_rank_paper_says_one_rank_and_no_spread() -> None:
    text = source_of(synthetic_run())
    assert "a rank-4 LoRA adapter" in text and "At rank $r = 4$ the adapter covers" in text
    assert "[Rank policy], [fixed]," in text and "rank_pattern" not in text and "adaptive" not in text
    assert "rank-clamped" in text


def test_an_adaptive_rank_paper_prints_the_adapters_r_and_the_spread() -> None:
    run = synthetic_run(synthetic_reports(ADAPTIVE_RANKS), policy="energy")
    assert run["extract"]["rank"] == 8 and run["params"]["extract"]["rank"] == RANK
    text = source_of(run)
    assert "an adaptive-rank ($r = 8$) LoRA adapter" in text
    assert "energy policy: ranks 2–8, mean 5.0, so PEFT's $r = 8$" in text
    assert "[Rank $r$], [8 (per-module ranks 2–8, mean 5.0)]," in text
    assert "[Rank policy], [energy (target 0.9, cap 64)]," in text
    assert "keeps 0.9 of the module's $norm(Delta W)_F^2$,\ncapped at 64" in text
    assert "Each module's $alpha_i$ is its own $r_i$, so $s_i = 1$." in text
    mean_rank = round(run["extract"]["rank_mean"])
    at_mean = fmt_energy(energy_at(run["energy"], mean_rank))
    assert f"A fixed rank of the\nsame mean size, {mean_rank}, would keep {at_mean}" in text
    assert "the adapter, at ranks 2–8 (mean 5.0), keeps only 61.2%" in text
    assert "rank-4" not in text and "r = 4" not in text and "rank-clamped" not in text
    noise = source_of(synthetic_run(synthetic_reports(ADAPTIVE_RANKS), policy="noise_floor"))
    assert "rounding noise" in noise and "[Rank policy], [noise_floor (cap 64)]," in noise


def test_experts_are_mentioned_only_when_there_are_lora_experts() -> None:
    plain = source_of(synthetic_run())
    assert "expert" not in plain.lower()
    moe = source_of(synthetic_run(synthetic_reports() + expert_reports()))
    assert "6 of them fused MoE expert parameters of 4 experts each" in moe
    assert "a stack of 4 matrices, one per expert" in moe
    assert "[MoE experts], [6 fused parameters in 3 layers, 4 experts each, per-expert ranks 2–3]," in moe
    assert "the worst expert keeps 0.7000" in moe
    assert "[experts.gate_up_proj], [4×128×64], [3], [0]," in moe


def test_extras_are_described_only_when_present() -> None:
    bare = [r for r in synthetic_reports() if r["action"] != "lora_embedding"]
    plain = source_of(synthetic_run(bare))
    for absent in ("modules_to_save", "lora_bias", "lora_embedding", "left out", "and extras"):
        assert absent not in plain, absent
    assert "deltas in other tensors are not carried over" in plain

    text = source_of(synthetic_run(synthetic_reports() + extra_reports()))
    assert "== Targets and extras <sec-targets>" in text
    assert "Saved whole (PEFT `modules_to_save`): `model.norm` (1 module,\n  128 bytes)" in text
    assert "carried whole in `lora_B.bias` (PEFT `lora_bias`): 1." in text
    assert "Embedding tables as LoRA factors (`lora_embedding_A`/`lora_embedding_B`): 1." in text
    assert "Measured and left out: 1 tensor (input_layernorm) with a combined $norm(Delta W)_F$ of\n  0.300" in text
    assert "*What the adapter leaves out.*" in text and "not carried over" not in text


FIGURE_LABELS = ("fig-norms", "fig-energy", "fig-pipeline", "fig-heatmap", "fig-divergence")


def test_figures_are_read_relative_to_the_paper_numbered_and_referenced(paper: tuple[Path, Path]) -> None:
    source = paper[0].read_text()
    for name in FIGURE_NAMES:
        assert f'plot("../figures/{name}")' in source
        assert (paper[0].parent / "../figures" / name).is_file()
    for label in FIGURE_LABELS:
        assert f") <{label}>" in source and f"@{label}" in source, label
    text = pdf_text(paper[1])
    captions = [text.index(f"Figure {i}: ") for i in range(1, len(FIGURE_NAMES) + 1)]
    assert captions == sorted(captions), "figures are numbered in the order they appear"
    for i in range(1, len(FIGURE_NAMES) + 1):
        assert re.search(rf"Figure {i}(?!:)", text), f"figure {i} is not referenced in the text"


def test_tables_sections_and_equations_are_numbered_and_referenced(paper: tuple[Path, Path]) -> None:
    source, text = paper[0].read_text(), pdf_text(paper[1])
    for label in ("tab-setup", "tab-modules", "tab-results", "tab-agreement"):
        assert f") <{label}>" in source and f"@{label}" in source, label
    for i in range(1, 5):
        assert f"Table {i}: " in text and re.search(rf"Table {i}(?!:)", text), i
    for heading in ("1 Introduction", "2 Method", "2.2 Truncated SVD", "3 Experiments", "4 Results", "6 Conclusion"):
        assert heading in text, heading
    assert "Abstract" in text and "Equation 4" in text and "Section 2.5" in text


def test_equations_are_typst_math_in_a_math_font(paper: tuple[Path, Path]) -> None:
    source = paper[0].read_text()
    for equation in (
        "$ Delta W = W_B - W_A = Delta_B - Delta_A. $ <eq-delta>",
        "sum_(j > r) sigma_j^2. $ <eq-eckart-young>",
        "$ E_i = (sum_(j <= r) sigma_j^2) / norm(Delta W_i)_F^2, $ <eq-energy>",
        "s = alpha / r. $ <eq-scaling>",
        '$ "KL"(B || M) = 1/N sum_(t=1)^N',
        '$ "gap closed" = 1 - ("KL"(B || A + "adapter")) / ("KL"(B || A)), $ <eq-gap>',
    ):
        assert equation in source, equation
    doc = pymupdf.open(paper[1])
    fonts = {font[3].partition("+")[2] for page in doc for font in page.get_fonts()}
    assert any(f.startswith("NewCMMath") for f in fonts), fonts
    assert any(f.startswith("LibertinusSerif") for f in fonts), fonts
    assert re.search(r"\(7\)", pdf_text(paper[1])), "display equations are numbered"


def test_references_are_cited_and_listed(paper: tuple[Path, Path]) -> None:
    source, text = paper[0].read_text(), pdf_text(paper[1])
    for key in ("hu2021lora", "eckart1936", "halko2011", "peft", "llamacpp"):
        assert f"@{key}" in source, key
    references = text[text.index("References [1]") :]
    for work in ("LoRA: Low-Rank Adaptation", "Eckart", "Halko", "PEFT", "llama.cpp"):
        assert work in references, work
    assert "[5]" in references and "[6]" not in references


def test_pdf_has_pages_text_and_unclipped_figures(paper: tuple[Path, Path]) -> None:
    doc = pymupdf.open(paper[1])
    assert doc.page_count >= 2
    text = pdf_text(paper[1])
    for expected in ("2.50 × 10⁻⁶", "56.2:1", SHA_A, "model.layers.1.self_attn.v_proj.weight", "Energy kept"):
        assert expected in text, expected
    assert "\\" not in text and "#" not in text, "an escape or a macro's output was printed twice escaped"
    placed = [(page, rect) for page in doc for xref, *_ in page.get_images() for rect in page.get_image_rects(xref)]
    assert len(placed) == len(FIGURE_NAMES)
    for page, rect in placed:
        assert page.rect.contains(rect), f"figure at {rect} runs off page {page.number}"
    assert sorted(p.name for p in paper[1].parent.iterdir()) == ["paper.pdf", "paper.typ"]


def test_the_source_has_no_list_or_heading_a_value_made(paper: tuple[Path, Path]) -> None:
    """A source line that starts with "64." is a numbered list item: the template breaks no line before a value."""
    query = lambda selector: json.loads(  # noqa: E731
        typst.query(paper[0], selector, root=paper[0].parents[1], ignore_system_fonts=True)
    )
    assert query("enum") == []
    headings = re.findall(r"^=+ ", paper[0].read_text(), re.MULTILINE)
    assert len(query("heading")) == len(headings) + 1  # and the bibliography's title


def test_the_pdf_is_the_same_bytes_each_time(paper: tuple[Path, Path]) -> None:
    assert typst_pdf(paper[0], paper[0].parents[1]) == paper[1].read_bytes()


def test_names_with_markup_characters_are_printed_as_they_are(paper: tuple[Path, Path], tmp_path: Path) -> None:
    odd = "org/we*ird_[name]#1 $x$ @y <z> ~`q`"
    run = synthetic_run()
    run["params"] |= {"model_b": odd}
    run["manifest"]["model_b"]["source"] = odd
    run["validate"]["verdict_summary"] += " // not a comment -- nor a dash"
    typ, pdf = write_paper(run, paper[0].parent.parent / "figures", tmp_path / "paper")
    text = pdf_text(pdf).replace(" ", "")  # lines may break inside the name
    assert text.count(odd.replace(" ", "")) >= 4 and "//notacomment--noradash" in text


def test_escaping() -> None:
    assert markup.escape("self_attn.q_proj[0]") == "self\\_attn.q\\_proj\\[0\\]"
    assert markup.escape("- 3. a//b") == "\\- 3. a\\//b" and markup.escape("64. x") == "64\\. x"
    assert markup.finalize(markup.Markup("$x_1$")) == "$x_1$" and markup.finalize(4) == "4"
    assert markup.code("a_b") == "`a_b`" and markup.code("a`b") == '#raw("a`b");'
    assert markup.quoted('a"b\\c') == '"a\\"b\\\\c"'


def test_the_pdf_renderer_is_replaceable(tmp_path: Path) -> None:
    seen = {}

    def renderer(source: Path, root: Path) -> bytes:
        seen.update(source=source, text=source.read_text(), root=root)
        return b"%PDF-stand-in"

    typ, pdf = write_paper(synthetic_run(), tmp_path / "figures", tmp_path / "paper", render_pdf=renderer)
    assert pdf.read_bytes() == b"%PDF-stand-in"
    assert seen == {"source": typ, "text": typ.read_text(), "root": tmp_path.resolve()}


def test_a_fact_the_template_needs_but_lacks_is_an_error() -> None:
    run_facts = facts.paper_facts(synthetic_run(), Path("f"), Path("p"))
    del run_facts["curve"]
    with pytest.raises(jinja2.UndefinedError, match="curve"):
        paper_source(run_facts)


def test_verdicts_follow_the_numbers() -> None:
    assert energy_verdict(0.9995) == "numerically_low_rank"
    assert energy_verdict(0.95) == "approximately_low_rank"
    assert energy_verdict(0.5) == "not_low_rank"
    assert kl_verdict({"kl_base": 0.08, "kl_adapted": 0.02}) == "reduces"
    assert kl_factor({"kl_base": 0.08, "kl_adapted": 0.02}) == pytest.approx(4)
    assert kl_verdict({"kl_base": 0.02, "kl_adapted": 0.08}) == "increases"
    assert kl_factor({"kl_base": 0.02, "kl_adapted": 0.08}) == pytest.approx(4)
    assert kl_verdict({"kl_base": 0.02, "kl_adapted": 0.0}) == "exact"
    assert kl_verdict({"kl_base": 0.0, "kl_adapted": 0.0}) == "no_gap"


def test_verdict_sentences_follow_the_verdicts() -> None:
    run = synthetic_run()
    run["extract"] |= {"energy": 0.9995}
    run["validate"] |= {"kl_adapted": 0.2}
    text = source_of(run)
    assert "$Delta W$ is numerically low-rank: the adapter, at rank 4, keeps all but 5.00 × 10⁻⁴" in text
    assert 'The adapter increases $"KL"(B || dot)$ by a factor of 2.40: it makes A less like B.' in text
    assert "the adapter does not move A towards B" in text


def test_rank_facts_and_rank_text() -> None:
    reports = synthetic_reports(ADAPTIVE_RANKS)
    metrics = extract_metrics(reports, policy="energy")
    ranks = rank_facts(metrics, {"extract": {"energy": 0.9, "max_rank": 64}})
    assert (ranks["r"], ranks["min"], ranks["max"], ranks["adaptive"]) == (8, 2, 8, True)
    assert rank_text(ranks) == "ranks 2–8 (mean 5.0)"
    assert rank_text(rank_facts(extract_metrics(synthetic_reports()), {"extract": {}})) == "rank 4"


def test_energy_at_stays_at_the_last_value_past_the_curve() -> None:
    curve = [{"rank": 1, "energy": 0.5}, {"rank": 2, "energy": 0.75}]
    assert (energy_at(curve, 1), energy_at(curve, 2), energy_at(curve, 16)) == (0.5, 0.75, 0.75)


def test_module_type_rows_pool_the_energy_the_adapter_keeps() -> None:
    """Energy pooled by ‖ΔW‖² at each tensor's own rank; a bias riding on q_proj adds no tensor to the table."""
    a = {
        "name": "a.weight",
        "module": "a",
        "module_type": "q_proj",
        "layer": 0,
        "action": "lora",
        "shape": [4, 4],
        "status": "extracted",
        "delta_norm": 1.0,
        "rank": 2,
        "energy": 0.5,
        "singular_values": [0.6, 0.4],
    }
    b = a | {"name": "b.weight", "delta_norm": 3.0, "rank": 5, "energy": 0.9}
    zero = a | {  # as extraction reports an all-zero delta (actions.zero)
        "name": "z.weight",
        "delta_norm": 0.0,
        "status": "zero",
        "rank": 0,
        "energy": 1.0,
        "rel_error": 0.0,
        "singular_values": [],
    }
    bias = {
        "name": "a.bias",
        "module": "a",
        "module_type": "q_proj",
        "layer": 0,
        "action": "lora",
        "shape": [4],
        "status": "extracted",
        "delta_norm": 0.1,
    }
    [row] = module_type_rows([a, b, zero, bias])
    assert (row["count"], row["zero"], row["ranks"]) == (3, 1, "2–5")
    assert row["energy"] == pytest.approx((0.5 * 1 + 0.9 * 9) / 10)
    assert kept_energy([zero]) is None


def test_extras_and_experts_facts() -> None:
    unchanged_norm = {  # planned to be saved, but its delta is zero: not in the adapter
        "name": "model.layers.0.input_layernorm.weight",
        "module": "model.layers.0.input_layernorm",
        "module_type": "input_layernorm",
        "layer": 0,
        "action": "save",
        "shape": [64],
        "status": "zero",
        "delta_norm": 0.0,
    }
    reports = synthetic_reports() + extra_reports() + expert_reports() + [unchanged_norm]
    metrics = extract_metrics(reports)
    extras = extras_facts(reports, metrics)
    assert extras["saved"] == ["model.norm"] and extras["biases"] == ["model.layers.0.self_attn.q_proj.bias"]
    assert extras["embeddings"] == ["model.embed_tokens"] and extras["skipped"] == 1 and extras["carried"]
    assert experts_facts(synthetic_reports()) is None
    moe = experts_facts(reports)
    assert (moe["parameters"], moe["experts"], moe["layers"], moe["ranks"]) == (6, 4, 3, "2–3")
    assert moe["types"] == ["experts.gate_up_proj", "experts.down_proj"]


def test_number_formats() -> None:
    assert fmt_num(2.5e-6) == "2.50 × 10⁻⁶"
    assert fmt_num(3.0e7) == "3.00 × 10⁷"
    assert fmt_num(0.0834) == "0.0834"
    assert fmt_num(0) == "0"
    assert fmt_energy(0.6123) == "0.6123"
    assert fmt_energy(0.99999) == "1 − 1.00 × 10⁻⁵"
    assert fmt_bytes(512) == "512 bytes"
    assert fmt_bytes(17_596_416) == "16.8 MiB"


def test_a_target_preset_is_named_whole() -> None:
    assert target_names({"extract": {"target_modules": "auto"}}) == ["auto"]
    assert target_names({"extract": {"target_modules": ["q_proj", "v_proj"]}}) == ["q_proj", "v_proj"]


def test_the_stages_hand_their_files_to_figures_and_paper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stages/figures.py and stages/paper.py, run in a DVC project on FORMATS.md's files."""
    from omegaconf import OmegaConf

    from stages import figures as figures_stage
    from stages import paper as paper_stage
    from weightdiff.files import write_csv, write_json

    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  figures:\n    cmd: echo\n    outs: [reports/figures]\n  paper:\n"
        "    cmd: echo\n    deps: [reports/figures]\n    outs: [reports/paper]\n"
    )
    run = synthetic_run()
    paths = {
        name: f"in/{name}"
        for name in (
            "manifest",
            "tensors",
            "extract_metrics",
            "validate_metrics",
            "gguf_metrics",
            "energy_curve",
            "layer_divergence",
        )
    }
    for key, name in (
        ("manifest", "manifest"),
        ("tensors", "tensors"),
        ("extract_metrics", "extract"),
        ("validate_metrics", "validate"),
        ("gguf_metrics", "gguf"),
    ):
        write_json(tmp_path / paths[key], run[name])
    write_csv(tmp_path / paths["energy_curve"], run["energy"])
    write_csv(tmp_path / paths["layer_divergence"], run["layers"])
    cfg = OmegaConf.create(run["params"] | {"paths": paths | {"figures": "reports/figures", "paper": "reports/paper"}})
    monkeypatch.chdir(tmp_path)
    figures_stage.main(cfg)
    paper_stage.main(cfg)
    assert sorted(p.name for p in (tmp_path / "reports/figures").iterdir()) == sorted(FIGURE_NAMES)
    text = (tmp_path / "reports/paper/paper.typ").read_text()
    assert "a rank-4 LoRA adapter" in text and (tmp_path / "reports/paper/paper.pdf").read_bytes()[:5] == b"%PDF-"


def test_the_verdict_is_by_function_and_energy_only_explains_it() -> None:
    run = synthetic_run()
    run["validate"] |= {
        "gap_closed": 0.94,
        "verdict": "falls_short",
        "verdict_summary": "A + adapter falls short of B (target 99.0%) although rank 4 keeps 99.9% of ‖ΔW‖²",
    }
    text = source_of(run)
    assert "Judged by what it does rather than by the energy\nit keeps: A + adapter falls short of B" in text
    assert "*Verdict* (A + adapter counts as reproducing B when it closes at least 99.0% of the KL gap)" in text
    assert "- *A + adapter falls short of B*: A + adapter falls short of B (target 99.0%)" in text
    assert "The energy kept, below, explains this verdict; it does not make it." in text
    assert "*A + adapter reproduces B*" in source_of(synthetic_run())


def test_what_the_adapter_and_the_gguf_leave_out_is_listed_with_shares_and_reasons() -> None:
    run = synthetic_run(synthetic_reports() + extra_reports())
    run["extract"]["left_out"] = [
        {"module_type": "input_layernorm", "tensors": 30, "share": 0.0004, "reason": "extract.extras.norms=skip"},
        {"module_type": "lm_head", "tensors": 1, "share": 0.05, "reason": "extract.profile=serving"},
    ]
    run["gguf"]["left_out"] = [
        {"tensor": f"model.layers.{i}.input_layernorm", "reason": "a full weight (modules_to_save)"} for i in range(4)
    ] + [{"tensor": "model.layers.0.self_attn.q_proj.lora_B.bias", "reason": "llama.cpp applies no LoRA bias"}]
    text = source_of(run)
    assert (
        "*What the adapter leaves out.* lm_head (1 tensor, 5% of\n  $norm(Delta W)^2$: extract.profile=serving); "
        "input_layernorm (30 tensors, 0.04% of\n  $norm(Delta W)^2$: extract.extras.norms=skip)."
    ) in text
    assert "[GGUF export], [llama, 44 tensors, f32; 5 adapter tensors left out (@sec-limitations)]," in text
    assert "4 tensors (`model.layers.0.input_layernorm`, `model.layers.1.input_layernorm`," in text
    assert ": a full weight (modules_to_save); 1 tensor (`model.layers.0.self_attn.q_proj.lora_B.bias`)" in text

    run["gguf"] |= {"written": False, "reason": "llama.cpp has no LoRA support for model_type 'bert'", "left_out": []}
    text = source_of(run)
    assert "[GGUF export], [not written: llama.cpp has no LoRA support for model_type 'bert']," in text
    assert "*No GGUF adapter.* llama.cpp has no LoRA support for model_type 'bert'; the PEFT adapter" in text
    assert "GGUF adapter size" not in text
