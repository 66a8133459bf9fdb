"""The records that cross files between stages, as FORMATS.md documents them (tests/test_records.py checks
its examples against these): a tensor's index entry, the per-tensor report of extraction."""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

# typing_extensions' TypedDict: NotRequired keys are known at runtime on Python 3.10 too (tests check records)
from typing_extensions import NotRequired, TypedDict

Action = Literal["lora", "lora_embedding", "lora_experts", "save", "skip"]


class TensorEntry(TypedDict):
    """One checkpoint tensor in artifacts/index.json, placed in the model as transformers holds it."""

    shard: str
    dtype: str  # safetensors' dtype: BF16, F16, F32...
    shape: list[int]
    layer: int | None
    module: str  # the in-memory module path
    module_type: str  # q_proj, gate_proj (of one expert); experts.gate_up_proj for a fused expert parameter
    group: str | None  # attention, linear_attention, mlp, experts, shared_expert, shared_expert_gate, router
    expert: int | None
    param: NotRequired[str]  # for expert tensors: the fused parameter they load into
    part: NotRequired[int]  # and their place there (0 gate, 1 up)


class ExpertArrays(TypedDict):
    """Per-expert values of a lora_experts report, indexed by expert."""

    rank: list[int]
    delta_norm: list[float]
    energy: list[float]
    rel_error: list[float]
    singular_values: list[list[float]]


class TensorReport(TypedDict):
    """What extraction did with one tensor (or one fused expert parameter): artifacts/extract/tensors.json."""

    name: str
    module: str
    module_type: str
    layer: int | None
    action: Action
    shape: list[int]
    delta_norm: float
    status: NotRequired[Literal["extracted", "zero"]]  # lora actions: factors written, or an all-zero delta
    rank: NotRequired[int]
    energy: NotRequired[float]  # Σ kept σ² / ‖ΔW‖²
    rel_error: NotRequired[float]  # ‖ΔW − scaling·B·A‖ / ‖ΔW‖, of the stored factors
    singular_values: NotRequired[list[float]]  # kept; for experts pooled over experts (root sum of squares)
    # the SVD's next ones past the rank, to extract.svd.curve_to × rank (randomized: lower bounds), pooled likewise
    singular_values_beyond: NotRequired[list[float]]
    noise_floor: NotRequired[float]
    energy_bound: NotRequired[float]  # an upper bound on the exact SVD's energy at the same rank (a posteriori)
    energy_reference: NotRequired[float]  # a deeper randomized SVD's, a lower bound on it (extract.svd.check_every)
    experts: NotRequired[ExpertArrays]
    bytes: NotRequired[int]  # save: the size of B's weights in the adapter


LORA_ACTIONS = ("lora", "lora_embedding", "lora_experts")
R = TypeVar("R", bound=Mapping[str, Any])  # a report: TensorReport, or the plain dicts tensors.json reads back as


def decomposed(reports: Iterable[R]) -> list[R]:
    """The reports with a spectrum: every tensor a lora action decomposed or found unchanged (a bias carried in
    lora_B.bias has none: it rides on its layer's weight)."""
    return [r for r in reports if "singular_values" in r]


def saved(reports: Iterable[R]) -> list[R]:
    """The reports of tensors the adapter holds whole (modules_to_save): a save whose delta is zero holds none."""
    return [r for r in reports if r["action"] == "save" and "bytes" in r]


def energy_kept(reports: Sequence[Mapping[str, Any]]) -> float:
    """Σ energyᵢ‖ΔWᵢ‖² / Σ ‖ΔWᵢ‖² over decomposed reports: the one definition of the energy an adapter keeps,
    wherever it is quoted (metrics, diagnosis, paper); 1 when there is no delta at all."""
    total = sum(r["delta_norm"] ** 2 for r in reports)
    return sum(r["energy"] * r["delta_norm"] ** 2 for r in reports) / total if total else 1.0
