"""The pipeline's settings as typed records: the one place that says what each key holds and accepts.

conf/config.yaml gives the values (DVC composes it into params.yaml, and `dvc exp show` displays them); these
dataclasses give the types, the choices and a help text per key, as PEFT's LoraConfig does, and check every
value when a stage starts, so a mistyped choice fails before any tensor is read, naming the key and the
choices. tests/test_config.py checks that the defaults here equal conf/'s values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from weightdiff.errors import WeightdiffError


class Choice(str, Enum):
    """A closed set of words; members compare, hash, print and serialise as their word."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class DownloadMode(Choice):
    fetch = "fetch"
    stream = "stream"


class RankPolicy(Choice):
    fixed = "fixed"
    energy = "energy"
    noise_floor = "noise_floor"


class FactorDtype(Choice):
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Executor(Choice):
    local = "local"
    ray = "ray"


class SvdMethod(Choice):
    randomized = "randomized"
    exact = "exact"


class NormsChoice(Choice):
    skip = "skip"
    save = "save"


class BiasesChoice(Choice):
    skip = "skip"
    lora = "lora"


class ModuleChoice(Choice):
    """For embeddings and the LM head: leave out, save whole (modules_to_save), or decompose."""

    skip = "skip"
    save = "save"
    lora = "lora"


class Profile(Choice):
    """faithful: every non-zero delta in the most faithful form PEFT loads; serving: only what LoRA servers load."""

    faithful = "faithful"
    serving = "serving"


class ResizedEmbeddings(Choice):
    error = "error"
    skip = "skip"


class ModelDtype(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class GgufDtype(Choice):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


class DemoPair(Choice):
    smollm2 = "smollm2"
    tiny = "tiny"


NAMED_TARGETS = ("auto", "all-linear")


def helped(default: Any, text: str) -> Any:
    """A field with its default and its help text (dataclasses.field's metadata, as PEFT's configs carry it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


def fail(key: str, value: Any, expected: str) -> WeightdiffError:
    return WeightdiffError(f"{key} must be {expected}, not {value!r}")


@dataclass
class DownloadSettings:
    mode: DownloadMode = helped(
        DownloadMode.fetch,
        "Hub sources: fetch copies the weights into the cache; stream keeps only config, tokenizer and the "
        "safetensors headers, and extract/validate read each tensor's bytes from the Hub at the pinned commit",
    )
    cache_dir: str | None = helped(None, "where Hub snapshots and the demo pair live; null: HF_HUB_CACHE")
    allow_patterns: list[str] = helped(
        [
            "*.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "tokenizer.model",
            "vocab.json",
            "merges.txt",
            "chat_template.jinja",
        ],
        "files fetched from a Hub repo: weights, shard index, config, tokenizer; pickles (*.bin, *.pt) never",
    )


@dataclass
class SmolLM2Demo:
    lora_rank: int = helped(16, "the demo fine-tune's LoRA rank on every linear layer (lora_alpha = 2·rank)")
    steps: int = helped(8, "optimiser steps")
    batch_size: int = helped(4, "sequences per step")
    seq_len: int = helped(128, "tokens per packed sequence")
    learning_rate: float = helped(0.003, "AdamW learning rate")


@dataclass
class TinyDemo:
    hidden_size: int = helped(64, "of the tiny random Llama")
    intermediate_size: int = helped(128, "of its MLP")
    num_hidden_layers: int = helped(2, "decoder layers")
    num_attention_heads: int = helped(4, "attention heads")
    num_key_value_heads: int = helped(2, "key/value heads")
    vocab_size: int = helped(256, "vocabulary")
    base_steps: int = helped(60, "steps that train the base before the two fine-tunes")
    lora_rank: int = helped(8, "rank of each fine-tune's LoRA")
    train_steps: int = helped(40, "steps of each fine-tune")
    learning_rate: float = helped(0.01, "AdamW learning rate")


@dataclass
class DemoSettings:
    pair: DemoPair = helped(
        DemoPair.smollm2,
        "smollm2: SmolLM2-135M-Instruct and a LoRA fine-tune of it on "
        "Python's docs; tiny: two fine-tunes of a tiny random Llama",
    )
    seed: int = helped(0, "seeds every random step of the demo pair")
    smollm2: SmolLM2Demo = field(default_factory=SmolLM2Demo)
    tiny: TinyDemo = field(default_factory=TinyDemo)


@dataclass
class VerifySettings:
    ignore_config_keys: list[str] = helped(
        [
            "_name_or_path",
            "torch_dtype",
            "dtype",
            "transformers_version",
            "architectures",
            "use_cache",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "generation_config",
        ],
        "config.json keys that may differ between A and B without changing the architecture",
    )
    resized_embeddings: ResizedEmbeddings = helped(
        ResizedEmbeddings.error,
        "A and B with different vocab_size: error refuses the pair; skip extracts every "
        "other tensor and leaves the vocabulary-sized ones out",
    )


@dataclass
class ExtrasSettings:
    """Deltas that are not LoRA factors of a target layer, and what becomes of them. By default each goes into the
    adapter in the most faithful form PEFT loads; whatever is still left out is named, with its share of ‖ΔW‖², at
    the end of the extract log and in metrics/extract.json (`left_out`)."""

    norms: NormsChoice = helped(
        NormsChoice.save, "save whole (modules_to_save, the only way PEFT carries a norm), or skip"
    )
    biases: BiasesChoice = helped(
        BiasesChoice.lora,
        "biases of target layers: lora (PEFT's lora_bias, where PEFT can apply it to the whole adapter), or skip",
    )
    embeddings: ModuleChoice = helped(
        ModuleChoice.lora,
        "lora (lora_embedding_A/B; on tied models also the LM head, via PEFT's ensure_weight_tying), save whole, "
        "or skip",
    )
    lm_head: ModuleChoice = helped(
        ModuleChoice.lora, "an untied LM head: lora (a LoRA target), save whole, or skip; a tied one follows embeddings"
    )


@dataclass
class SvdSettings:
    method: SvdMethod = helped(SvdMethod.randomized, "randomized (a range finder), or exact (torch.linalg.svd)")
    oversample: int = helped(10, "extra sketch columns of the randomized SVD")
    power_iters: int | str = helped(
        "auto", "auto: passes over ΔW until one adds less than `tol` of the kept energy; or a fixed count"
    )
    tol: float = helped(1.0e-4, "the energy gain under which power_iters=auto stops, in (0, 1)")
    seed: int = helped(0, "the sketches' seed (per tensor: mixed with its name)")
    curve_to: float = helped(
        2.0,
        "the reports' spectra and the energy-vs-rank curve reach this multiple of the rank (what more rank would "
        "buy); the sketch widens to it where rank + oversample falls short (not at rank 16, oversample 10)",
    )
    check_every: int = helped(
        40,
        "every so many lora tensors of the decoder layers, in plan order (the first included), also get a deeper "
        "randomized SVD, to measure the gap; 0: none",
    )

    def __post_init__(self) -> None:
        if self.power_iters != "auto" and not (isinstance(self.power_iters, int) and self.power_iters >= 0):
            raise fail("extract.svd.power_iters", self.power_iters, "auto or a count >= 0")
        if not 0 < self.tol < 1:
            raise fail("extract.svd.tol", self.tol, "a number in (0, 1)")
        if self.curve_to < 1:
            raise fail("extract.svd.curve_to", self.curve_to, "a multiple of the rank >= 1")
        if self.oversample < 0 or self.check_every < 0:
            raise WeightdiffError("extract.svd.oversample and check_every must be >= 0")


@dataclass
class RaySettings:
    address: str | None = helped(
        None,
        "null: start a local Ray for the run; else a running cluster's, as ray.init takes it: auto (RAY_ADDRESS, or "
        "the cluster `ray start` last started on this machine), or the head's host:port (6379 by default)",
    )
    max_retries: int = helped(
        3, "reruns of a unit whose worker died (killed, out of memory, node lost); a weightdiff error is not rerun"
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.max_retries, int) and self.max_retries >= 0):
            raise fail("extract.ray.max_retries", self.max_retries, "a count >= 0")


@dataclass
class ExtractSettings:
    profile: Profile = helped(
        Profile.faithful,
        "faithful: `extras` as set; serving: LoRA on linear layers and experts only (no modules_to_save, lm_head, "
        "embeddings or lora_bias, which LoRA servers such as vLLM refuse or drop), every rank capped at max_rank",
    )
    rank: int | str = helped("auto", "a positive integer, or auto: by model size (< 7B: 32, > 70B: 8, else 16)")
    rank_policy: RankPolicy = helped(
        RankPolicy.fixed,
        "fixed: `rank` everywhere; energy: per module the smallest rank keeping `energy` of "
        "‖ΔW‖²; noise_floor: the singular values above the checkpoints' rounding noise",
    )
    energy: float = helped(
        0.9, "target of rank_policy=energy; below it (globally) the extract log names the tensors that keep least"
    )
    max_rank: int = helped(64, "cap of the adaptive policies, and of every rank under profile=serving")
    alpha: float | None = helped(None, "null: alpha = rank (PEFT scaling 1); else folded into the factors")
    target_modules: Any = helped("auto", "auto, all-linear, or a list of names (PEFT's suffix rule; conf/targets/)")
    extras: ExtrasSettings = field(default_factory=ExtrasSettings)
    dtype: FactorDtype = helped(FactorDtype.fp16, "of the saved factors (fp16 keeps 3 more mantissa bits than bf16)")
    device: Device = helped(Device.auto, "auto (cuda when available), cpu or cuda")
    svd: SvdSettings = field(default_factory=SvdSettings)
    executor: Executor = helped(
        Executor.local,
        "local: the units one after another in this process; ray: as Ray tasks (pip install -e '.[ray]'), same bytes",
    )
    ray: RaySettings = field(default_factory=RaySettings)

    def __post_init__(self) -> None:
        if self.rank != "auto" and not (isinstance(self.rank, int) and self.rank >= 1):
            raise fail("extract.rank", self.rank, "a positive integer or auto")
        if not (isinstance(self.max_rank, int) and self.max_rank >= 1):
            raise fail("extract.max_rank", self.max_rank, "a positive integer")
        if not 0 < self.energy <= 1:
            raise fail("extract.energy", self.energy, "a fraction in (0, 1]")
        targets = self.target_modules
        if isinstance(targets, str) and targets not in NAMED_TARGETS:
            raise fail(
                "extract.target_modules", targets, f"a list of module names or one of {', '.join(NAMED_TARGETS)}"
            )
        if not isinstance(targets, str):
            self.target_modules = [str(t) for t in targets]


# Keys that cannot change the adapter: left out of what identifies a run (resume store, DVC params).
RUN_ONLY_KEYS = ("device", "executor", "ray")


@dataclass
class ValidateSettings:
    texts: str | None = helped(None, "null: the built-in texts; or a .jsonl of {text}/{messages} records or a .txt")
    batch_size: int = helped(4, "sequences")
    seq_len: int = helped(128, "tokens per sequence")
    seed: int = helped(0, "shuffles the texts' records (or draws the seeded ids)")
    dtype: ModelDtype = helped(ModelDtype.fp32, "the models' arithmetic; KL is accumulated in fp64 either way")
    device: str = helped("cpu", "a torch device")
    gap_closed_target: float = helped(
        0.99, "the share of KL(B ‖ A) the adapter must remove to count as reproducing B (the verdict), in (0, 1]"
    )

    def __post_init__(self) -> None:
        if not 0 < self.gap_closed_target <= 1:
            raise fail("validate.gap_closed_target", self.gap_closed_target, "a fraction in (0, 1]")


@dataclass
class GgufSettings:
    dtype: GgufDtype = helped(GgufDtype.f32, "of the GGUF adapter's tensors")
    strict: bool = helped(
        False,
        "false: write what GGUF holds and list what it leaves out (or, for an architecture llama.cpp has no LoRA "
        "support for, write no file and say why); true: either is an error",
    )


# A Hub repo id as create_repo takes it: org/name, or a bare name in the token owner's namespace.
REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


@dataclass
class PublishSettings:
    repo: str | None = helped(
        None,
        "a Hub model repo (org/name) to upload the adapter, its model card, the GGUF and the paper to, made when "
        "missing; null: the publish stage does nothing and never reaches the network",
    )
    revision: str = helped("main", "the branch to commit to, made from main when missing")
    private: bool = helped(False, "make a new repo private (an existing repo keeps its visibility)")
    commit_message: str | None = helped(None, "null: one from the run's numbers (rank, energy kept, gap closed)")

    def __post_init__(self) -> None:
        if self.repo is not None and not REPO_ID.fullmatch(self.repo):
            raise fail("publish.repo", self.repo, "a Hub repo id (org/name) or null")
        if not self.revision.strip():
            raise fail("publish.revision", self.revision, "a branch name")


@dataclass
class Paths:
    """Where stages read and write, from the repository root: wiring, not experiment knobs, so not in params.yaml
    (`dvc exp show` lists params). dvc.yaml names the same files (tests/test_dag.py checks it); `paths.<key>=...`
    overrides one for a stage run."""

    manifest: str = "artifacts/manifest.json"
    verify: str = "artifacts/verify.json"
    index: str = "artifacts/index.json"
    adapter: str = "artifacts/adapter"
    resume: str = "artifacts/resume"  # the resume store of an interrupted extraction: not a DVC out
    tensors: str = "artifacts/extract/tensors.json"
    extract_metrics: str = "metrics/extract.json"
    energy_curve: str = "metrics/energy_vs_rank.csv"
    validate_metrics: str = "metrics/validate.json"
    layer_divergence: str = "metrics/layer_divergence.csv"
    gguf: str = "artifacts/gguf"  # a directory: adapter.gguf when one is written, empty when not
    gguf_metrics: str = "metrics/gguf.json"
    figures: str = "reports/figures"
    paper: str = "reports/paper"
    publish_record: str = "metrics/publish.json"


@dataclass
class Settings:
    model_a: str = helped(MISSING, "a Hub repo id (org/name@revision), a local directory, or demo:a")
    model_b: str = helped(MISSING, "the same, for the fine-tune")
    download: DownloadSettings = field(default_factory=DownloadSettings)
    demo: DemoSettings = field(default_factory=DemoSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    validate: ValidateSettings = field(default_factory=ValidateSettings)
    gguf: GgufSettings = field(default_factory=GgufSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    paths: Paths = field(default_factory=Paths)


T = TypeVar("T")


def typed(schema: type[T], *values: Any, key: str = "") -> T:
    """`values` (DictConfigs, dicts or records, later ones overriding) checked against `schema`, as a record of it.

    Unknown keys and wrong types or choices fail naming the key; `key` is the prefix of `values`' keys in the
    whole configuration (extract, extract.svd), so messages name the key as the user writes it.
    """
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), *values))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        full_key = ".".join(k for k in (key, str(getattr(e, "full_key", "") or "")) if k)
        message = str(e).splitlines()[0]
        raise WeightdiffError(f"configuration key {full_key or '?'}: {message}") from None


def updated(record: T, **changes: Any) -> T:
    """A copy of a settings record with some keys changed (nested ones as dicts), checked as the original was."""
    return typed(type(record), record, changes)


def plain(record: Any) -> Any:
    """A record as JSON-ready dicts, lists and strings (choices as their words)."""
    node = record if isinstance(record, DictConfig) else OmegaConf.structured(record)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
