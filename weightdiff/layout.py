"""Where each checkpoint tensor lives in the model as transformers 5 holds it in memory: what PEFT matches and keys.

Found once, by the index stage, on the meta device (no memory): module paths by type, the LM head, the fused
expert parameters (`mlp.experts.gate_up_proj`: [E, 2I, H] in Qwen's layout, [E, H, 2I] in gpt-oss's, which is
used as x @ W) and transformers' own renaming of checkpoint names
(a `model.language_model.` prefix dropped, per-expert tensors fused). Later stages read the layout from the
index and never import model code. Architectures transformers cannot build get a layout guessed from shapes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from weightdiff.errors import WeightdiffError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
# A decoder block's prefix (model.layers.3.), which group(1) numbers.
LAYER = re.compile(r"(?:^|.*?\.)(?:layers|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    match = LAYER.match(name)
    return int(match.group(1)) if match else None


def within_layer(path: str) -> str:
    """The path inside its decoder block (mlp.experts.gate_up_proj), as per-layer PEFT names are written."""
    return LAYER.sub("", path, count=1)


def module_type(path: str) -> str:
    """A module's own name (q_proj, gate_proj of expert 3); for a fused expert parameter, which is not a module
    of its own, `<container>.<parameter>` (experts.gate_up_proj)."""
    container = path.rpartition(".")[0].rpartition(".")[2]
    leaf = path.rpartition(".")[2]
    return f"{container}.{leaf}" if container == "experts" else leaf


@dataclass(frozen=True)
class ModelModules:
    """Module paths by type, as transformers builds the model (on the meta device: no memory)."""

    linear: frozenset[str]
    embedding: frozenset[str]
    output: str | None  # the LM head's path
    experts: tuple[str, ...] = ()  # fused expert parameters, in registration order
    transposed: frozenset[str] = frozenset()  # those of them stored [E, in, out] (gpt-oss), the others [E, out, in]
    # The input embedding whose weight the LM head shares (tie_word_embeddings, also by the config class's default):
    # one table, usually one tensor on disk, whose change changes both the input lookup and the output logits.
    tied: str | None = None
    rename: Callable[[str], tuple[str, int | None]] | None = None  # see checkpoint_renaming; not kept in the index

    def to_json(self) -> dict:
        return {
            "linear": sorted(self.linear),
            "embedding": sorted(self.embedding),
            "output": self.output,
            "experts": list(self.experts),
            "transposed": sorted(self.transposed),
            "tied": self.tied,
        }

    @classmethod
    def from_json(cls, data: dict) -> ModelModules:
        return cls(
            frozenset(data["linear"]),
            frozenset(data["embedding"]),
            data["output"],
            tuple(data["experts"]),
            frozenset(data["transposed"]),
            data["tied"],
        )

    @classmethod
    def from_shapes(cls, tensors: dict[str, dict]) -> ModelModules:
        """A layout guessed from the checkpoint alone: 2D weights are linear layers, those named `embed` embeddings,
        `lm_head` the output; checkpoint names stand, and experts stay out of reach."""
        weights = {t["module"]: t for n, t in tensors.items() if n.endswith(".weight") and len(t["shape"]) == 2}
        embedding = frozenset(m for m in weights if "embed" in m)
        head = next((m for m in weights if m.rpartition(".")[2] == "lm_head"), None)
        return cls(frozenset(weights) - embedding, embedding, head)


def model_modules(config: dict, tensors: dict[str, dict]) -> ModelModules:
    """The layout transformers builds for `config`; guessed from the checkpoint's tensors when it cannot."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - unknown model_type, remote code...: fall back to the checkpoint's shapes
        log.warning(
            "transformers cannot build %s (%s): taking every 2D .weight as a linear layer", config.get("model_type"), e
        )
        return ModelModules.from_shapes(tensors)
    names = {m: n for n, m in model.named_modules()}
    output = model.get_output_embeddings()
    experts = expert_parameters(model)
    return ModelModules(
        frozenset(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)),
        frozenset(n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)),
        names.get(output) if output is not None else None,
        tuple(experts),
        frozenset(p for p, transposed in experts.items() if transposed),
        tied=tied_embedding(model, names),
        rename=checkpoint_renaming(model),
    )


def tied_embedding(model: PreTrainedModel, names: dict[torch.nn.Module, str]) -> str | None:
    """The input embedding's path when the LM head holds the very same weight (transformers tied them), else None."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return names[embedding] if output is not None and output.weight is embedding.weight else None


def expert_parameters(model: torch.nn.Module) -> dict[str, bool]:
    """Paths of the 3D parameters holding all experts of a layer, in the order PEFT wraps them, each with whether
    it is stored [E, in, out] rather than [E, out, in].

    PEFT nests one ParamWrapper per targeted parameter of a module in registration order, which decides the
    adapter keys; it reads the orientation from the module's `is_transposed` (transformers' experts decorator
    sets it on gpt-oss's), as is done here.
    """
    return {
        f"{path}.{name}": bool(getattr(module, "is_transposed", False))
        for path, module in model.named_modules()
        if not isinstance(module, torch.nn.modules.conv._ConvNd)
        for name, param in module.named_parameters(recurse=False)
        if param.ndim == 3
    }


def checkpoint_renaming(model: PreTrainedModel) -> Callable[[str], tuple[str, int | None]]:
    """Checkpoint tensor name → (the parameter it loads into, its part there), by transformers' own rules.

    Per-expert tensors (mlp.experts.3.gate_proj.weight) load into the fused parameter (mlp.experts.gate_up_proj),
    part 0 for gate and 1 for up: the order transformers concatenates them in (MergeModulelist over experts,
    then Concatenate along the rows); plain renamings give part 0. Part is None for fusions of any other kind
    (a transpose, an interleave), which LoRA factors of the checkpoint's tensors cannot follow.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings: list = [t for t in transforms if not isinstance(t, WeightConverter)]  # WeightRenaming, and kin
    meta = model.state_dict()

    def stacks_rows(c: WeightConverter) -> bool:
        ops = [(type(o), getattr(o, "dim", None)) for o in c.operations]
        return ops[:1] == [(MergeModulelist, 0)] and ops[1:] in ([], [(Concatenate, 1)])

    def rename(name: str) -> tuple[str, int | None]:
        renamed, pattern = rename_source_key(name, renamings, converters, str(model.base_model_prefix), meta)
        if pattern is None:
            return renamed, 0
        converter = next(c for c in converters if pattern in c.source_patterns)
        return renamed, converter.source_patterns.index(pattern) if stacks_rows(converter) else None

    return rename


def in_memory(tensors: dict[str, dict], modules: ModelModules) -> dict[str, dict]:
    """The index entries with `module` named as in memory; expert tensors also get `param` and `part`.

    `param` is the fused expert parameter a tensor loads into, `part` its place there (0 gate, 1 up).
    Unknown architectures keep the checkpoint's names, and their experts stay out of reach.
    """
    if modules.rename is None:
        return tensors
    out = {}
    for name, entry in tensors.items():
        renamed, part = modules.rename(name)
        if part is not None:  # else a fusion LoRA factors cannot follow: the checkpoint's name stands
            entry = entry | {"module": renamed.rpartition(".")[0]}
            if renamed in modules.experts:
                entry |= {"param": renamed, "part": part}
        out[name] = entry
    return out


def parameter_name(name: str, entry: dict) -> str:
    """The in-memory parameter a checkpoint tensor loads into: a layer's experts all load into one fused one."""
    return entry.get("param") or f"{entry['module']}.{name.rpartition('.')[2]}"


def fuse_experts(param: str, values: list[torch.Tensor], experts: list[int]) -> torch.Tensor:
    """Per-expert tensors as transformers fuses them on load: stacked by expert, each expert's parts (gate, up)
    concatenated along the rows. `values` come by expert, then part; a hole is an error naming the parameter."""
    count = max(experts) + 1
    parts = len(values) // count
    if experts != [e for e in range(count) for _ in range(parts)]:
        missing = sorted(set(range(count)) - set(experts))
        raise WeightdiffError(
            f"{param}: the checkpoint has {len(values)} expert tensors for {count} experts × "
            f"{parts} parts; experts {missing[:5]} or some of their parts are missing"
        )
    return torch.stack([torch.cat(values[e * parts : (e + 1) * parts]) for e in range(count)])
