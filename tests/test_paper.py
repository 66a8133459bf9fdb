"""The paper from a synthetic run: its numbers come from the inputs, its verdicts follow them, the PDF is whole."""
from __future__ import annotations

import os
from pathlib import Path

import pymupdf
import pytest
from test_figures import synthetic_divergence, synthetic_energy_curve, synthetic_tensors, write_dvc_yaml

from weightdiff.figures import FIGURE_NAMES, write_figures
from weightdiff.paper import energy_verdict, fmt_bytes, fmt_energy, fmt_num, kl_verdict, write_paper

SHA_A = "060db6499f32faf8b98477b0a26969ef7d8b9987"
SHA_B = "7ae557604adf67be50417f59c2c2f167def9a775"


def synthetic_run() -> dict:
    """The dict the paper stage assembles, shaped as FORMATS.md describes, with distinctive numbers."""
    tensors = synthetic_tensors()
    return {
        "manifest": {
            "model_a": {"source": "org/base", "kind": "hub", "path": "/cache/a", "revision": SHA_A,
                        "files": [{"name": "model.safetensors", "size": 988_097_824},
                                  {"name": "config.json", "size": 700}]},
            "model_b": {"source": "org/tuned", "kind": "hub", "path": "/cache/b", "revision": SHA_B,
                        "files": [{"name": "model.safetensors", "size": 988_097_824}]},
        },
        "extract": {"rank": 4, "alpha": 8.0, "tensors_total": 22, "tensors_extracted": 21, "tensors_zero": 1,
                    "tensors_clamped": 0, "energy": 0.6123, "energy_min": 0.5, "rel_error_max": 0.7071,
                    "delta_norm_total": 12.5, "adapter_bytes": 17_596_416, "model_bytes": 988_097_824,
                    "compression_ratio": 56.153, "adapter_params": 8_798_208, "seconds": 93.44},
        "tensors": tensors,
        "validate": {"kl_adapted": 2.5e-6, "kl_base": 0.0834, "top1_adapted": 0.996, "top1_base": 0.875,
                     "tokens": 256, "gap_closed": 1 - 2.5e-6 / 0.0834, "texts": "built-in"},
        "layers": synthetic_divergence(),
        "gguf": {"arch": "llama", "tensors": 44, "bytes": 35_200_000, "dtype": "f32"},
        "params": {"model_a": "org/base", "model_b": "org/tuned",
                   "extract": {"rank": 4, "alpha": None, "target_modules": ["q_proj", "k_proj", "v_proj"],
                               "dtype": "bf16", "svd": {"method": "randomized", "oversample": 10,
                                                        "power_iters": 2, "seed": 0}},
                   "validate": {"device": "cpu"}},
    }


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repo")
    run = synthetic_run()
    write_figures(run["tensors"], synthetic_energy_curve(run["tensors"]), run["layers"], write_dvc_yaml(root),
                  root / "reports" / "figures")
    return write_paper(run, root / "reports" / "figures", root / "reports" / "paper")


def test_markdown_carries_the_runs_numbers(paper: tuple[Path, Path]) -> None:
    text = paper[0].read_text()
    for expected in ("rank-4", "r = 4", "2.50 × 10⁻⁶", "0.0834", "56.2:1", SHA_A, SHA_B, "16.8 MiB",
                     "942.3 MiB", "0.6123", "87.5%", "99.6%", "256 tokens", "closes 99.997% of the KL gap", "what it leaves is 3.00 × 10⁻⁵",
                     "weightdiff's built-in evaluation text", "is after layer 3", "93.4 s", "33.6 MiB",
                     f"{os.cpu_count()} CPU cores", "model.layers.1.self_attn.v_proj.weight"):
        assert expected in text, expected
    for heading in ("## Abstract", "## 1. Introduction", "## 2. Method", "## 3. Experiments", "## 4. Results",
                    "## 5. Discussion", "## 6. Conclusion"):
        assert heading in text
    assert "ΔW is not low-rank" in text  # energy 0.61 must not be called low-rank


def test_markdown_links_figures_relative_to_the_paper(paper: tuple[Path, Path]) -> None:
    text = paper[0].read_text()
    for name in FIGURE_NAMES:
        assert f"](../figures/{name})" in text
        assert (paper[0].parent / "../figures" / name).is_file()


def test_pdf_has_pages_text_and_unclipped_figures(paper: tuple[Path, Path]) -> None:
    doc = pymupdf.open(paper[1])
    assert doc.page_count >= 2
    text = " ".join(" ".join(page.get_text() for page in doc).split())
    for expected in ("2.50 × 10⁻⁶", "56.2:1", SHA_A, "KL(B ‖ A + adapter)", "Σ_r", "σ₁"):
        assert expected in text, expected
    placed = [(page, rect) for page in doc for xref, *_ in page.get_images() for rect in page.get_image_rects(xref)]
    assert len(placed) == len(FIGURE_NAMES)
    for page, rect in placed:
        assert page.rect.contains(rect), f"figure at {rect} runs off page {page.number}"
    assert sorted(p.name for p in paper[1].parent.iterdir()) == ["paper.md", "paper.pdf"]


def test_verdicts_follow_the_numbers() -> None:
    assert "numerically low-rank" in energy_verdict(0.9995, 16)
    assert "approximately low-rank" in energy_verdict(0.95, 16)
    assert "not low-rank" in energy_verdict(0.5, 16)
    assert "reduces KL" in kl_verdict({"kl_base": 0.08, "kl_adapted": 0.02})
    assert "increases KL" in kl_verdict({"kl_base": 0.02, "kl_adapted": 0.08})
    assert "exactly 0" in kl_verdict({"kl_base": 0.02, "kl_adapted": 0.0})


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
    from weightdiff.paper import target_names

    assert target_names({"extract": {"target_modules": "auto"}}) == ["auto"]
    assert target_names({"extract": {"target_modules": ["q_proj", "v_proj"]}}) == ["q_proj", "v_proj"]
