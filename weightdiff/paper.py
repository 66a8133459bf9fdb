"""The paper: the seeds' report structure, with every number taken from this run's own outputs.

Nothing here is a constant claim about results: each sentence that states a finding is chosen by the
numbers (e.g. a low kept energy is reported as "ΔW is not low-rank at this rank"), so the paper stays
honest for whatever pair of models the pipeline was run on.
"""
from __future__ import annotations

import math
import os
import platform
import re
from pathlib import Path

import markdown
import matplotlib
import numpy as np
from fpdf import FPDF, FontFace, TextStyle
from PIL import Image

from weightdiff.figures import decomposed, energy_curves, layer_norm_grid, module_kinds
from weightdiff.files import write_atomic

# In the order the paper shows them (the seeds' order: magnitudes, rank, pipeline, layers).
FIGURE_CAPTIONS = {
    "delta_norms.png": "Frobenius norm ‖ΔW‖_F of the weight delta per layer, one line per module kind.",
    "energy_vs_rank.png": "Spectral energy of ΔW kept by a rank-k truncation: all tensors (black) and per "
                          "module kind; the dashed line marks the chosen rank.",
    "pipeline.png": "The DVC pipeline, drawn from dvc.yaml: an arrow X → Y means Y reads a file X writes.",
    "heatmap.png": "‖ΔW‖_F by layer and module kind; red hatching marks tensors identical in A and B.",
    "layer_divergence.png": "Relative error ‖h − h_B‖_F / ‖h_B‖_F of the hidden state after each decoder layer "
                            "against B's, for A alone (gray) and A + adapter (black), on the validation batch.",
}
SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
FIGURE = re.compile(r"^!\[[^\]]*\]\(([^)]+)\)\n\n\*([^*\n]+)\*$", re.MULTILINE)  # image line, caption line


def write_paper(run: dict, figures_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """Writes out_dir/paper.md and out_dir/paper.pdf (atomically) from the run's outputs and figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = paper_markdown(run | {"tensors": decomposed(run["tensors"])}, figures_dir, out_dir)
    md_path = write_atomic(out_dir / "paper.md", text.encode())
    pdf_path = write_atomic(out_dir / "paper.pdf", paper_pdf(text, out_dir))
    return md_path, pdf_path


# ---------------------------------------------------------------- number formatting


def fmt_num(x: float, digits: int = 3) -> str:
    """x to `digits` significant digits; tiny or huge values as 2.50 × 10⁻⁶ (KL values span many decades)."""
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(x)))) if x else 0
        return f"{x:.{decimals}f}"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa} × 10{str(int(exponent)).translate(SUPERSCRIPTS)}"


def fmt_energy(x: float) -> str:
    """An energy fraction: 4 decimals, or 1 − residual when that would print a misleading 1.0000."""
    return f"1 − {fmt_num(1 - x)}" if 0.9999 <= x < 1 else f"{x:.4f}"


def fmt_bytes(n: int) -> str:
    """Bytes in binary units (KiB, MiB, GiB, TiB), as file sizes are usually quoted."""
    value, unit = float(n), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def fmt_ratio(x: float) -> str:
    """A compression ratio, e.g. 37.2:1."""
    return f"{x:,.1f}:1"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ---------------------------------------------------------------- the run's facts


def model_line(entry: dict) -> str:
    """Where a model came from: source, kind and the pinned revision (or that none was recorded)."""
    revision = f"revision `{entry['revision']}`" if entry.get("revision") else "no revision recorded"
    weights = sum(f["size"] for f in entry.get("files", []) if f["name"].endswith(".safetensors"))
    return f"`{entry['source']}` ({entry['kind']}; {revision}; weights {fmt_bytes(weights)})"


def hardware_line() -> str:
    """The machine that generated this report (normally the one that ran the pipeline)."""
    return f"{platform.system()} {platform.release()}, {platform.machine()}, {os.cpu_count()} CPU cores, " \
           f"Python {platform.python_version()}"


def svd_line(params: dict) -> str:
    """The SVD method as configured, with the randomized method's settings and reference."""
    svd = params["extract"].get("svd") or {}
    if svd.get("method") == "randomized":
        iters = (f"power iterations until one adds less than {svd.get('tol')} of the kept energy"
                 if svd.get("power_iters") == "auto" else f"{svd.get('power_iters')} power iterations")
        return f"randomized [3] (oversampling ≥ {svd.get('oversample')}, {iters})"
    return svd.get("method", "not recorded in the parameters")


def layer_totals(tensors: dict) -> dict[int, float]:
    """Layer → ‖ΔW‖_F of all its target tensors together (√ of the summed squared norms)."""
    layers, _, grid = layer_norm_grid(tensors)
    return dict(zip(layers, np.sqrt(np.nansum(np.square(grid), axis=1)).tolist()))


def kind_summary(tensors: dict) -> list[dict]:
    """Per module kind: shapes, tensor counts, pooled ‖ΔW‖_F and pooled energy kept at the chosen rank."""
    rank = int(tensors["rank"])
    energy_at_rank = {kind: curve[-1] for kind, curve in energy_curves(tensors, rank).items()}
    rows = []
    for kind in module_kinds(tensors):
        members = [t for t in tensors["tensors"] if t["kind"] == kind]
        rows.append({
            "kind": kind,
            "shapes": ", ".join(dict.fromkeys("×".join(map(str, t["shape"])) for t in members)),
            "count": len(members),
            "zero": sum(t["status"] == "zero" for t in members),
            "norm": math.sqrt(sum(t["delta_norm"] ** 2 for t in members)),
            "energy": energy_at_rank.get(kind),
        })
    return rows


def target_names(params: dict) -> list[str]:
    """extract.target_modules as a list: a preset name (auto, all-linear) is one entry, not its letters."""
    targets = params["extract"]["target_modules"]
    return [targets] if isinstance(targets, str) else list(targets)


def figure_block(number: int, name: str, figures_dir: Path, out_dir: Path) -> str:
    """An image line with a path relative to the paper (so it renders in the repo) and its caption."""
    link = Path(os.path.relpath(figures_dir / name, out_dir)).as_posix()
    return f"![Figure {number}]({link})\n\n*Figure {number}: {FIGURE_CAPTIONS[name]}*\n"


# ---------------------------------------------------------------- the text


def paper_markdown(run: dict, figures_dir: Path, out_dir: Path) -> str:
    """The whole paper as Markdown: sections in the seeds' order, numbers from run."""
    fig = {name: figure_block(i + 1, name, figures_dir, out_dir) for i, name in enumerate(FIGURE_CAPTIONS)}
    return "\n".join([
        title_section(run), abstract_section(run), INTRODUCTION, method_section(run),
        experiments_section(run, fig), results_section(run, fig["layer_divergence.png"]), discussion_section(run),
        conclusion_section(run), REFERENCES,
    ])


def title_section(run: dict) -> str:
    p = run["params"]
    return f"# Weight-Diff SVD Extraction: a rank-{run['extract']['rank']} LoRA adapter for " \
           f"{p['model_b']} − {p['model_a']}\n\n*Generated by the weightdiff pipeline from the outputs " \
           f"of this run; every number below is read from them.*\n"


def abstract_section(run: dict) -> str:
    e, v, p = run["extract"], run["validate"], run["params"]
    return f"""## Abstract

We extract a LoRA adapter from the weight difference ΔW = W_B − W_A between model B (`{p['model_b']}`) and
model A (`{p['model_a']}`), without any training, by a truncated SVD of each target weight delta. At rank
r = {e['rank']} the adapter covers {e['tensors_total']} tensors ({e['tensors_zero']} of them unchanged), takes
{fmt_bytes(e['adapter_bytes'])} against {fmt_bytes(e['model_bytes'])} for model B's weights (a compression
ratio of {fmt_ratio(e['compression_ratio'])}) and keeps a fraction {fmt_energy(e['energy'])} of the spectral
energy of the delta. {fidelity_sentence(v)} Extraction took {e['seconds']:.1f} s.
"""


def fidelity_sentence(v: dict) -> str:
    """What validation says, in one sentence whose verdict follows the numbers."""
    kl = f"KL(B ‖ A + adapter) = {fmt_num(v['kl_adapted'])} against KL(B ‖ A) = {fmt_num(v['kl_base'])}"
    if v["kl_adapted"] < v["kl_base"]:
        verdict = f"the adapter moves A towards B ({kl}, over {v['tokens']} tokens)"
    else:
        verdict = f"the adapter does not move A towards B ({kl}, over {v['tokens']} tokens)"
    return f"On next-token distributions {verdict}; top-1 agreement with B goes from " \
           f"{fmt_pct(v['top1_base'])} to {fmt_pct(v['top1_adapted'])}."


INTRODUCTION = """## 1. Introduction

Fine-tuned language models are usually distributed as full copies of their weights, even when they differ
from a sibling model only by a fine-tuning delta. If models A and B share a base W_base and were fine-tuned
to W_base + Δ_A and W_base + Δ_B, their difference cancels the base:

    ΔW = W_B − W_A = Δ_B − Δ_A

When both fine-tunes were LoRA adapters [1] merged into the weights, rank(ΔW) ≤ r_A + r_B per module, and a
truncated SVD recovers ΔW as a LoRA adapter exactly; for other fine-tunes the truncation is an
approximation whose quality the spectral energy it keeps measures. This report applies the extraction to
one pair of models and measures size, spectral energy, reconstruction error and the next-token
distributions of A + adapter against those of B.
"""


def method_section(run: dict) -> str:
    p = run["params"]
    return f"""## 2. Method

### 2.1 Weight delta

For every target weight W_i (a 2-D linear layer present in both models with the same name and shape) we
form ΔW_i = W_i^(B) − W_i^(A).

### 2.2 Truncated SVD

By the Eckart–Young theorem [2] the best rank-r approximation of ΔW_i in Frobenius norm is its truncated
SVD ΔW_i ≈ U_r Σ_r V_rᵀ, with Σ_r = diag(σ₁, …, σ_r). The singular values are split between the two LoRA
factors:

    A_i = √Σ_r · V_rᵀ   ∈ ℝ^(r × d_in)
    B_i = U_r · √Σ_r    ∈ ℝ^(d_out × r)

so that B_i A_i = U_r Σ_r V_rᵀ. The fraction of ‖ΔW_i‖²_F kept, Σ_(i≤r) σᵢ² / ‖ΔW_i‖²_F, is the energy
reported throughout. SVD method: {svd_line(p)}.

### 2.3 Scaling

PEFT adds s · B · A to a module's output with s = α / r. With α = {fmt_num(run['extract']['alpha'])} and
r = {run['extract']['rank']} (s = {fmt_num(run['extract']['alpha'] / run['extract']['rank'])}), the scaling
is folded into the stored factors so that s · B · A equals the truncated SVD, whatever α is chosen; the
adapter loads with standard PEFT.

### 2.4 Tensor-by-tensor streaming

Extraction never holds a whole model in memory. Tensors are read one at a time from the memory-mapped
safetensors files:

```
for each target tensor name:
    W_A, W_B = read(A, name), read(B, name)
    A_i, B_i = truncated_svd(W_B − W_A, r)
    save(A_i, B_i); free(W_A, W_B)
```

Peak memory is two tensors plus the SVD workspace, whatever the model size.

### 2.5 Target modules

The target modules are {', '.join(f'`{m}`' for m in target_names(p))}; the factors are
stored as {p['extract']['dtype']}.
"""


def experiments_section(run: dict, fig: dict[str, str]) -> str:
    return "\n".join([setup_subsection(run), f"### 3.2 Delta magnitudes\n\n{fig['delta_norms.png']}",
                      delta_paragraph(run["tensors"]), rank_subsection(run, fig["energy_vs_rank.png"]),
                      pipeline_subsection(fig["pipeline.png"]), layer_subsection(run["tensors"], fig["heatmap.png"])])


def setup_subsection(run: dict) -> str:
    e, m, p, g, v = run["extract"], run["manifest"], run["params"], run["gguf"], run["validate"]
    device = (p.get("validate") or {}).get("device")
    counts = f"{e['tensors_total']} total: {e['tensors_extracted']} extracted, {e['tensors_zero']} zero, " \
             f"{e['tensors_clamped']} rank-clamped"
    return f"""## 3. Experiments

### 3.1 Setup

| Parameter | Value |
|---|---|
| Model A | {model_line(m['model_a'])} |
| Model B | {model_line(m['model_b'])} |
| Rank r | {e['rank']} |
| LoRA alpha α | {fmt_num(e['alpha'])} |
| Factor dtype | {p['extract']['dtype']} |
| SVD | {svd_line(p)} |
| Target modules | {', '.join(target_names(p))} |
| Tensors | {counts} |
| Adapter parameters | {e['adapter_params']:,} |
| GGUF export | {g['arch']}, {g['tensors']} tensors, {g['dtype']} |
| Validation | {v['tokens']} tokens{f' on {device}' if device else ''} |
| Hardware (report machine) | {hardware_line()} |
| Extraction time | {e['seconds']:.1f} s |
"""


def delta_paragraph(tensors: dict) -> str:
    """Which kinds change most and which tensors did not change at all."""
    kinds = sorted(kind_summary(tensors), key=lambda k: k["norm"], reverse=True)
    zero = [t["name"] for t in tensors["tensors"] if t["status"] == "zero"]
    order = ", ".join(f"{k['kind']} ({fmt_num(k['norm'])})" for k in kinds)
    zero_text = (f"Tensors identical in A and B (ΔW = 0), which contribute nothing to the adapter: "
                 f"{len(zero)}, {', '.join(f'`{n}`' for n in zero[:8])}{' …' if len(zero) > 8 else ''}."
                 if zero else "No target tensor is identical in A and B.")
    return f"Pooled over layers, the module kinds ordered by ‖ΔW‖_F are: {order}. {zero_text}\n"


def rank_subsection(run: dict, figure: str) -> str:
    e = run["extract"]
    r = int(e["rank"])
    curve = energy_curves(run["tensors"], r, group_of=lambda t: "all").get("all", [0.0] * r)
    half = max(1, r // 2)
    return f"""### 3.3 Rank versus energy

{figure}
At the chosen rank r = {r} the adapter keeps an energy fraction {fmt_energy(e['energy'])} of ΔW over all
tensors (the worst single tensor keeps {fmt_energy(e['energy_min'])}). At r/2 = {half} the fraction would be
{fmt_energy(curve[half - 1])}, and at rank 1 {fmt_energy(curve[0])}: going from r/2 to r adds
{fmt_num(curve[-1] - curve[half - 1])} of the energy for about twice the adapter size.
"""


def pipeline_subsection(figure: str) -> str:
    return f"""### 3.4 Pipeline

{figure}
Each stage is a DVC stage with declared inputs and outputs, so a change of configuration or code re-runs
only the stages downstream of it; this paper is the last stage and is regenerated from the metrics files.
"""


def layer_subsection(tensors: dict, figure: str) -> str:
    totals = layer_totals(tensors)
    biggest_tensor = max(tensors["tensors"], key=lambda t: t["delta_norm"])
    nonzero = [t for t in tensors["tensors"] if t["status"] != "zero"]
    smallest_tensor = min(nonzero, key=lambda t: t["delta_norm"]) if nonzero else None
    ranked = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
    lines = [f"### 3.5 Layer analysis\n\n{figure}"]
    if ranked:
        lines.append(f"The per-layer delta (‖ΔW‖_F of all target tensors of a layer together) ranges from "
                     f"{fmt_num(ranked[-1][1])} (layer {ranked[-1][0]}) to {fmt_num(ranked[0][1])} "
                     f"(layer {ranked[0][0]}), with a mean of {fmt_num(float(np.mean(list(totals.values()))))} "
                     f"over {len(totals)} layers.")
    lines.append(f"The largest single delta is `{biggest_tensor['name']}` (‖ΔW‖_F = "
                 f"{fmt_num(biggest_tensor['delta_norm'])})" + (
                     f"; the smallest non-zero one is `{smallest_tensor['name']}` "
                     f"({fmt_num(smallest_tensor['delta_norm'])})." if smallest_tensor else "."))
    lines.append("\n| Module | Shape | Tensors | Zero | ‖ΔW‖_F (pooled) | Energy at r |\n"
                 "|---|---|---|---|---|---|")
    lines += [f"| {k['kind']} | {k['shapes']} | {k['count']} | {k['zero']} | {fmt_num(k['norm'])} | "
              f"{fmt_energy(k['energy']) if k['energy'] is not None else '—'} |" for k in kind_summary(tensors)]
    return "\n".join(lines) + "\n"


def results_section(run: dict, divergence_figure: str) -> str:
    e, v, g = run["extract"], run["validate"], run["gguf"]
    return f"""## 4. Results

| Metric | Value |
|---|---|
| Adapter size (safetensors) | {fmt_bytes(e['adapter_bytes'])} ({e['adapter_bytes']:,} bytes) |
| Model B weights | {fmt_bytes(e['model_bytes'])} ({e['model_bytes']:,} bytes) |
| Compression ratio | {fmt_ratio(e['compression_ratio'])} |
| GGUF adapter size | {fmt_bytes(g['bytes'])} ({g['dtype']}) |
| Energy kept (all tensors) | {fmt_energy(e['energy'])} |
| Energy kept (worst tensor) | {fmt_energy(e['energy_min'])} |
| Max relative reconstruction error | {fmt_num(e['rel_error_max'])} |

| Next-token agreement with B | A | A + adapter |
|---|---|---|
| KL(B ‖ ·), mean over tokens | {fmt_num(v['kl_base'])} | {fmt_num(v['kl_adapted'])} |
| Top-1 agreement | {fmt_pct(v['top1_base'])} | {fmt_pct(v['top1_adapted'])} |

{gap_sentence(v)}

{divergence_figure}
{divergence_sentence(run.get("layers") or [])}
"""


def gap_sentence(v: dict) -> str:
    """The share of B's lead over A that the adapter recovers, 1 − KL(B‖A+adapter) / KL(B‖A)."""
    if v.get("gap_closed") is None:
        return "A and B agree on the validation batch, so there is no gap for the adapter to close."
    return f"The adapter closes {100 * v['gap_closed']:.3f}% of the KL gap between A and B (gap closed = " \
           f"1 − KL(B ‖ A + adapter) / KL(B ‖ A); what it leaves is {fmt_num(1 - v['gap_closed'])} of KL(B ‖ A)), " \
           f"measured on {v['tokens']} tokens of {texts_phrase(v)}."


def texts_phrase(v: dict) -> str:
    source = v.get("texts", "")
    if source == "seeded ids":
        return "seeded random token ids (the models have no tokenizer)"
    if source == "built-in":
        return "weightdiff's built-in evaluation text (prose, code and chat), teacher-forced"
    return f"the texts in `{source}`, teacher-forced"


def divergence_sentence(layers: list[dict]) -> str:
    """Where along the depth A + adapter departs from B, from validate's per-layer relative errors."""
    if not layers:
        return ""
    worst = max(layers, key=lambda row: row["rel_error_adapted"])
    last = layers[-1]
    return f"After the last layer the hidden state of A + adapter is {fmt_num(last['rel_error_adapted'])} away " \
           f"from B's in relative norm (A alone: {fmt_num(last['rel_error_base'])}); the largest divergence, " \
           f"{fmt_num(worst['rel_error_adapted'])}, is after layer {worst['layer']}."


def energy_verdict(energy: float, rank: int) -> str:
    """How low-rank ΔW is, judged by the energy the rank-r truncation keeps."""
    if energy >= 0.999:
        return f"ΔW is numerically low-rank: rank {rank} keeps all but {fmt_num(1 - energy)} of its energy, " \
               f"consistent with both models being merged low-rank fine-tunes of one base."
    if energy >= 0.9:
        return f"ΔW is approximately low-rank: rank {rank} keeps {fmt_pct(energy)} of its energy; the other " \
               f"{fmt_pct(1 - energy)} lies in singular values beyond rank {rank}."
    return f"ΔW is not low-rank: rank {rank} keeps only {fmt_pct(energy)} of its energy, so the adapter is a " \
           f"lossy approximation of B − A, not a reconstruction; Figure 2 shows what other ranks would keep."


def kl_verdict(v: dict) -> str:
    """How much of the gap between A and B the adapter closes, in KL."""
    if v["kl_base"] <= 0:
        return "A and B already agree on the validation tokens (KL(B ‖ A) = 0), so validation cannot tell " \
               "anything about the adapter."
    if v["kl_adapted"] == 0:
        return f"The adapter brings KL(B ‖ ·) from {fmt_num(v['kl_base'])} to exactly 0."
    factor = v["kl_base"] / v["kl_adapted"]
    if factor >= 1:
        return f"The adapter reduces KL(B ‖ ·) by a factor of {fmt_num(factor)}, from {fmt_num(v['kl_base'])} " \
               f"to {fmt_num(v['kl_adapted'])}."
    return f"The adapter increases KL(B ‖ ·) by a factor of {fmt_num(1 / factor)}: it makes A less like B."


def discussion_section(run: dict) -> str:
    e, v, p = run["extract"], run["validate"], run["params"]
    return f"""## 5. Discussion

### 5.1 What the numbers show

- {energy_verdict(e['energy'], e['rank'])}
- {kl_verdict(v)} Top-1 agreement with B is {fmt_pct(v['top1_adapted'])} with the adapter and
  {fmt_pct(v['top1_base'])} without.
- The largest relative reconstruction error of a tensor is {fmt_num(e['rel_error_max'])}; it includes the
  truncation and the rounding of the factors to {p['extract']['dtype']}.
- Unchanged target tensors (ΔW = 0): {e['tensors_zero']} of {e['tensors_total']}. Rank-clamped tensors
  (a dimension smaller than r, extracted at that smaller rank): {e['tensors_clamped']}.

### 5.2 Limitations

{chr(10).join(f"- {item}" for item in limitations(run))}
"""


def limitations(run: dict) -> list[str]:
    """What the run does not show; the randomized-SVD caveat only when that method was used."""
    p, v = run["params"], run["validate"]
    items = [
        "**Same architecture and base.** The extraction needs identical tensor names and shapes in A and B, "
        "and it is only meaningful when both derive from one base model.",
        f"**Target modules only.** The adapter represents the deltas of {', '.join(target_names(p))} "
        "only; any difference in other tensors (embeddings, norms, biases) is not carried over.",
        f"**Small validation.** KL and top-1 agreement are means over {v['tokens']} token positions; they "
        "measure agreement with B's next-token distribution, not task quality.",
        "**Hardware.** The hardware line describes the machine that generated this report, which is normally "
        "but not necessarily the one that ran the extraction.",
    ]
    if (p["extract"].get("svd") or {}).get("method") == "randomized":
        items.insert(3, "**Randomized SVD.** The singular values, and so the energies, are estimates; the "
                        "relative errors are measured with the factors actually saved.")
    return items


def conclusion_section(run: dict) -> str:
    e, v, p = run["extract"], run["validate"], run["params"]
    return f"""## 6. Conclusion

A rank-{e['rank']} truncated SVD of `{p['model_b']}` − `{p['model_a']}` gives a LoRA adapter of
{fmt_bytes(e['adapter_bytes'])} ({fmt_ratio(e['compression_ratio'])} smaller than model B's weights) that keeps
{fmt_energy(e['energy'])} of the delta's energy, in {e['seconds']:.1f} s and without training.
{kl_verdict(v)} The whole run is reproducible with `dvc repro`, and this paper is regenerated from its
outputs.
"""


REFERENCES = """## References

[1] E. J. Hu, Y. Shen, P. Wallis, Z. Allen-Zhu, Y. Li, S. Wang, L. Wang, W. Chen. *LoRA: Low-Rank
Adaptation of Large Language Models.* ICLR 2022. arXiv:2106.09685

[2] C. Eckart, G. Young. *The approximation of one matrix by another of lower rank.* Psychometrika 1(3),
1936.

[3] N. Halko, P.-G. Martinsson, J. A. Tropp. *Finding structure with randomness: probabilistic algorithms
for constructing approximate matrix decompositions.* SIAM Review 53(2), 2011.
"""


# ---------------------------------------------------------------- PDF


def paper_pdf(text: str, base_dir: Path) -> bytes:
    """paper.md typeset with fpdf2: Markdown → HTML for the text, figures placed directly at page width.

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
        pdf.write_html(pdf_tables(markdown.markdown(text, extensions=["tables", "fenced_code"])),
                       tag_styles=TAG_STYLES, table_line_separators=True)


def pdf_tables(html: str) -> str:
    """Tables rewritten for fpdf2: cells without inline markup (it cannot nest tags in <td>), left-aligned
    (its default is justified), and columns as wide as their longest text (capped), not all equal."""
    return TABLE.sub(lambda m: pdf_table(m[0]), html)


def pdf_table(table: str) -> str:
    rows = [[(tag, re.sub(r"<[^>]+>", "", text).strip()) for tag, text in CELL.findall(row)]
            for row in ROW.findall(table)]
    widths = [max(min(len(text), 60) for _, text in column) + 4 for column in zip(*rows)]
    first = "".join(f'<{tag} align="left" width="{w}">{text}</{tag}>' for (tag, text), w in zip(rows[0], widths))
    rest = ["".join(f'<{tag} align="left">{text}</{tag}>' for tag, text in row) for row in rows[1:]]
    return "<br><table>" + "".join(f"<tr>{row}</tr>" for row in [first, *rest]) + "</table>"


TABLE = re.compile(r"<table>.*?</table>", re.DOTALL)
ROW = re.compile(r"<tr>(.*?)</tr>", re.DOTALL)
CELL = re.compile(r"<(t[dh])(?:\s[^>]*)?>(.*?)</\1>", re.DOTALL)
# Margins tuned by eye on rendered pages: fpdf2 scales user-given heading margins much more than its own.
TAG_STYLES = {
    "h1": TextStyle(font_family="DejaVu", font_style="B", font_size_pt=17, color=(20, 40, 90), t_margin=0,
                    b_margin=0.5),
    "h2": TextStyle(font_family="DejaVu", font_style="B", font_size_pt=14, color=(20, 40, 90), t_margin=10,
                    b_margin=0.3),
    "h3": TextStyle(font_family="DejaVu", font_style="B", font_size_pt=11.5, color=(20, 40, 90), t_margin=6,
                    b_margin=0.2),
    "code": FontFace(family="DejaVuMono", size_pt=9),
    "pre": TextStyle(font_family="DejaVuMono", font_size_pt=9, t_margin=3, b_margin=0.5, l_margin=6),
}


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
