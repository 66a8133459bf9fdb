"""Publishing a run to the Hub (weightdiff.publish, the publish stage, `weightdiff publish`) against the stand-in
Hub's write endpoints: what lands in the repo, byte for byte, on which branch, and what a refused token gives.

The run is a small fake in the pipeline's layout (tmp_path/artifacts, metrics, reports), its metrics shaped as
FORMATS.md's examples; nothing reaches the network but the stand-in on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants as hf_constants
from safetensors.torch import save
from torch import Generator, randn

import stages.publish
import weightdiff.publish
from helpers import REPO
from hub_standin import GITATTRIBUTES, commit, serve
from test_download import hf_isolated, point_hub_at  # noqa: F401 - hf_isolated is a fixture
from test_records import problems
from weightdiff.commands import METRICS_FILE
from weightdiff.config import run_config
from weightdiff.errors import WeightdiffError
from weightdiff.publish import ADAPTER_METRICS, PublishRecord, publish
from weightdiff.settings import Paths, PublishSettings

WRITE, READ = "hf_write_token", "hf_read_token"
REPO_ID = "org/smol-adapter"
EXAMPLES = re.findall(r"```json\n(.*?)```", (REPO / "FORMATS.md").read_text(), re.S)
SCRIPT = Path(sys.executable).parent / "weightdiff"


def example(starts: str) -> dict:
    (text,) = [e for e in EXAMPLES if e.lstrip().startswith(starts)]
    return json.loads(text)


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def make_run(root: Path, seed: int = 0) -> dict[str, bytes]:
    """A finished run's outputs under `root`, laid out as settings.Paths says; returns the files' bytes by path."""
    p = Paths()
    factors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": randn(
            4, 8, generator=Generator().manual_seed(seed)
        )
    }
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4.0, "target_modules": ["q_proj"]}
    manifest = {
        side: {"source": f"org/{name}", "kind": "hub", "mode": "fetch", "path": f"/cache/{name}", "revision": sha * 40}
        for side, name, sha in (("model_a", "base", "a"), ("model_b", "tuned", "b"))
    }
    gguf = {"written": True, "reason": None, "arch": "llama", "tensors": 2, "bytes": 99, "dtype": "f32", "left_out": []}
    files = {
        f"{p.adapter}/adapter_config.json": json.dumps(config | {"base_model_name_or_path": "org/base"}).encode(),
        f"{p.adapter}/adapter_model.safetensors": save(factors),
        f"{p.gguf}/adapter.gguf": b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * (seed + 1),
        f"{p.paper}/paper.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + bytes(64),
        f"{p.paper}/paper.typ": b'= The run\n#image("../figures/energy_vs_rank.png")\n',
        f"{p.figures}/energy_vs_rank.png": b"\x89PNG\r\n\x1a\n" + bytes(32),
        p.manifest: json.dumps(manifest).encode(),
        p.extract_metrics: json.dumps(example('{"rank"')).encode(),
        p.validate_metrics: json.dumps(example('{"kl_adapted"')).encode(),
        p.gguf_metrics: json.dumps(gguf).encode(),
    }
    return {name: write(root / name, data) for name, data in files.items()}


def paths_under(root: Path) -> Paths:
    return Paths(**{key: str(root / value) for key, value in asdict(Paths()).items()})


def head(repos: dict, repo_id: str, ref: str = "main") -> tuple[str, dict]:
    [(sha, found)] = [(sha, c) for sha, c in repos[repo_id].items() if ref in c["refs"]]
    return sha, found


def front_matter(card: bytes) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card.decode(), re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


@pytest.fixture
def hub(monkeypatch, hf_isolated):  # noqa: F811 - hf_isolated is the fixture
    """The stand-in Hub, empty, granting WRITE write access and READ read access; HF_TOKEN is WRITE."""
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # hf_xet is installed; the stand-in speaks LFS
    monkeypatch.setenv("HF_TOKEN", WRITE)
    with serve({}, tokens={WRITE: "write", READ: "read"}) as standin:
        point_hub_at(monkeypatch, standin.url)
        yield standin


def test_formats_example_is_a_publish_record():
    assert problems(example('{"published"'), PublishRecord) == []


def test_the_repo_gets_the_card_the_adapter_the_gguf_and_the_paper(hub, tmp_path):
    run = make_run(tmp_path)
    p = Paths()

    record = publish(PublishSettings(repo=REPO_ID), paths_under(tmp_path))

    sha, published = head(hub.repos, REPO_ID)
    files = published["files"]
    repo_paths = {
        "adapter_config.json": f"{p.adapter}/adapter_config.json",
        "adapter_model.safetensors": f"{p.adapter}/adapter_model.safetensors",
        "adapter.gguf": f"{p.gguf}/adapter.gguf",
        "paper/paper.pdf": f"{p.paper}/paper.pdf",
        "paper/paper.typ": f"{p.paper}/paper.typ",
        "figures/energy_vs_rank.png": f"{p.figures}/energy_vs_rank.png",
    }
    for name, source in repo_paths.items():
        assert files[name] == run[source], name
    assert sorted(files) == sorted([*repo_paths, "README.md", ".gitattributes"])
    assert record == {
        "published": True,
        "repo": REPO_ID,
        "revision": "main",
        "commit": sha,
        "url": f"{hub.url}/{REPO_ID}/commit/{sha}",
        "files": sorted([*repo_paths, "README.md"]),
        "left_out": [],
    }
    assert problems(record, PublishRecord) == []

    meta = front_matter(files["README.md"])
    assert meta["base_model"] == "org/base" and meta["library_name"] == "peft"
    assert {"lora", "peft", "weightdiff", "gguf"} <= set(meta["tags"])
    card = files["README.md"].decode()
    extract, validate = example('{"rank"'), example('{"kl_adapted"')
    for shown in (
        f"| KL(B ‖ ·) per token | {validate['kl_adapted']:.3g} | {validate['kl_base']:.3g} |",
        f"| top-1 agreement with B | {validate['top1_adapted']:.1%} | {validate['top1_base']:.1%} |",
        f"{validate['tokens']} tokens of weightdiff's built-in evaluation text",
        f"{validate['gap_closed']:.5f}",
        "**reproduces**",
        validate["verdict_summary"],
        f"| energy kept (Σ kept σ² / ‖ΔW‖²) | {extract['energy']:.4f} |",
        f"| rank | {extract['rank']}, fixed policy |",
        f"| adapter size | {extract['adapter_bytes'] / 1e3:.1f} kB, {extract['compression_ratio']:.1f}× smaller",
        "| A (base) | `org/base` | `" + "a" * 40 + "` |",
        f'PeftModel.from_pretrained(base, "{REPO_ID}")',
        "--lora adapter.gguf",
        "ΔW = W_B − W_A",
    ):
        assert shown in card, shown
    assert published["message"] == "weightdiff adapter: rank 16, energy kept 0.9900; gap closed 0.99997 (reproduces)"
    writes = [r for r in hub.requests if r.method in ("POST", "PUT") and not r.cdn]
    assert writes and all(r.headers["authorization"] == f"Bearer {WRITE}" for r in writes)


def test_an_existing_repo_gets_a_new_commit_and_keeps_its_files(hub, tmp_path):
    first = commit(hub.repos, REPO_ID, {".gitattributes": GITATTRIBUTES, "notes.md": b"kept\n"})
    make_run(tmp_path / "one", seed=1)
    second = publish(PublishSettings(repo=REPO_ID), paths_under(tmp_path / "one"))["commit"]
    rerun = make_run(tmp_path / "two", seed=2)
    third = publish(PublishSettings(repo=REPO_ID, commit_message="rank 8"), paths_under(tmp_path / "two"))["commit"]

    assert len({first, second, third}) == 3 and set(hub.repos[REPO_ID]) == {first, second, third}
    sha, latest = head(hub.repos, REPO_ID)
    assert sha == third and latest["message"] == "rank 8"
    assert latest["files"]["notes.md"] == b"kept\n"
    assert latest["files"]["adapter.gguf"] == rerun[f"{Paths().gguf}/adapter.gguf"]
    assert hub.repos[REPO_ID][second]["files"]["adapter.gguf"] != rerun[f"{Paths().gguf}/adapter.gguf"]
    assert not hub.uploads  # every LFS blob PUT went into a commit


def test_the_stage_commits_to_its_branch_and_not_to_main(hub, tmp_path):
    run = make_run(tmp_path)
    overrides = [f"paths.{k}={v}" for k, v in asdict(paths_under(tmp_path)).items()]
    cfg = run_config(
        [*overrides, f"publish.repo={REPO_ID}", "publish.revision=rank-8", "publish.private=true"],
        params=REPO / "params.yaml",
    )

    stages.publish.main(cfg)

    record = json.loads(Path(cfg.paths.publish_record).read_text())
    sha, branch = head(hub.repos, REPO_ID, "rank-8")
    assert record["published"] and record["revision"] == "rank-8" and record["commit"] == sha
    assert branch["files"]["adapter_model.safetensors"] == run[f"{Paths().adapter}/adapter_model.safetensors"]
    assert 'revision="rank-8"' in branch["files"]["README.md"].decode()
    _, main = head(hub.repos, REPO_ID, "main")
    assert list(main["files"]) == [".gitattributes"]  # the new repo's first commit, untouched
    assert REPO_ID in hub.private


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (
            "hf_not_a_token",
            r"the Hub refused the token \(401\) for org/smol-adapter: log in with `hf auth login` or set HF_TOKEN",
        ),
        (None, r"the Hub refused the token \(401\) for org/smol-adapter"),
        (READ, r"the Hub refused to let this token write to org/smol-adapter \(403\): it needs write access to org"),
    ],
)
def test_a_refused_token_is_one_clear_error(hub, tmp_path, monkeypatch, token, message):
    make_run(tmp_path)
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(WeightdiffError, match=message):
        publish(PublishSettings(repo=REPO_ID), paths_under(tmp_path))
    assert hub.repos == {}


def test_the_command_publishes_the_pipelines_outputs_and_a_refusal_is_one_line(hub, tmp_path):
    """`weightdiff publish` from a run's directory finds its outputs where the stages write them."""
    run = make_run(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))} | {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }

    def weightdiff(*args: str, token: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), "publish", *args], cwd=tmp_path, env=env | {"HF_TOKEN": token}, capture_output=True, text=True
        )

    refused = weightdiff(REPO_ID, token="hf_not_a_token")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip().count("\n") == 0 and "refused the token (401)" in refused.stderr, refused.stderr

    done = weightdiff(REPO_ID, "--revision", "v1", "publish.commit_message=first", token=WRITE)
    assert done.returncode == 0, done.stderr
    sha, branch = head(hub.repos, REPO_ID, "v1")
    assert sha in done.stdout and branch["message"] == "first"
    assert branch["files"]["adapter.gguf"] == run[f"{Paths().gguf}/adapter.gguf"]

    missing = weightdiff(REPO_ID, "--adapter", "elsewhere", token=WRITE)
    assert missing.returncode == 1 and "elsewhere holds no PEFT adapter" in missing.stderr


def test_missing_optional_parts_are_left_out_and_said(hub, tmp_path, caplog):
    make_run(tmp_path)
    paths = paths_under(tmp_path)
    (Path(paths.gguf) / "adapter.gguf").unlink()  # gguf-convert's directory, empty: it wrote no file
    for f in Path(paths.paper).iterdir():
        f.unlink()
    Path(paths.gguf_metrics).write_text(
        json.dumps({"written": False, "reason": "llama.cpp has no LoRA support for gpt_oss", "arch": None})
    )
    Path(paths.validate_metrics).unlink()
    caplog.set_level("INFO", logger="weightdiff")

    record = publish(PublishSettings(repo=REPO_ID), paths)

    assert record["left_out"] == [
        f"validate numbers: {paths.validate_metrics} not found",
        "GGUF: llama.cpp has no LoRA support for gpt_oss",
        f"paper: {paths.paper} holds no files",
    ]
    assert all(f"left out {line}" in caplog.text for line in record["left_out"])
    _, published = head(hub.repos, REPO_ID)
    assert not any(name.endswith(".gguf") or name.startswith("paper/") for name in published["files"])
    card = published["files"]["README.md"]
    assert "gguf" not in front_matter(card)["tags"] and b"## Fidelity" not in card and b"## The adapter" in card


def no_adapter(paths: Paths) -> str:
    (Path(paths.adapter) / "adapter_model.safetensors").unlink()
    return rf"{re.escape(paths.adapter)} holds no PEFT adapter \(adapter_model"


def cut_short_metrics(paths: Paths) -> str:
    Path(paths.validate_metrics).write_text('{"kl_adapted": 2e-06, "kl_b')
    return rf"{re.escape(paths.validate_metrics)} is not valid JSON .* line 1"


@pytest.mark.parametrize("spoil", [no_adapter, cut_short_metrics])
def test_an_unusable_input_is_an_error_naming_it_before_any_request(hub, tmp_path, spoil):
    """spoil(paths) breaks one input of a finished run and returns the error it must give."""
    make_run(tmp_path)
    paths = paths_under(tmp_path)
    with pytest.raises(WeightdiffError, match=spoil(paths)):
        publish(PublishSettings(repo=REPO_ID), paths)
    assert hub.requests == []


def test_an_adapter_made_by_the_command_is_described_by_its_own_numbers(hub, tmp_path):
    """`weightdiff extract` leaves its metrics beside the adapter: the card quotes them, not metrics/extract.json."""
    make_run(tmp_path)
    paths = paths_under(tmp_path)
    assert ADAPTER_METRICS == METRICS_FILE
    own = example('{"rank"') | {"rank": 64, "energy": 0.5}
    (Path(paths.adapter) / ADAPTER_METRICS).write_text(json.dumps(own))
    publish(PublishSettings(repo=REPO_ID), paths)
    card = head(hub.repos, REPO_ID)[1]["files"]["README.md"].decode()
    assert "| rank | 64, fixed policy |" in card and "| energy kept (Σ kept σ² / ‖ΔW‖²) | 0.5000 |" in card


def test_unset_repo_publishes_nothing_and_reaches_no_network(tmp_path, monkeypatch):
    make_run(tmp_path)
    monkeypatch.setattr(weightdiff.publish, "HfApi", lambda *a, **k: pytest.fail("publish.repo unset reached the Hub"))
    overrides = [f"paths.{k}={v}" for k, v in asdict(paths_under(tmp_path)).items()]
    cfg = run_config(overrides, params=REPO / "params.yaml")
    assert cfg.publish.repo is None  # the committed default
    stages.publish.main(cfg)
    assert json.loads(Path(cfg.paths.publish_record).read_text()) == {"published": False}


def test_offline_mode_is_named(hub, tmp_path, monkeypatch):
    make_run(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightdiffError, match="HF_HUB_OFFLINE is set"):
        publish(PublishSettings(repo=REPO_ID), paths_under(tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [("publish.repo='not a repo'", r"publish\.repo must be a Hub repo id"), ("publish.private=maybe", "private")],
)
def test_publish_settings_are_checked(override, message):
    with pytest.raises(WeightdiffError, match=message):
        run_config([override], params=REPO / "params.yaml")


def test_help_says_what_is_published():
    done = subprocess.run([str(SCRIPT), "publish", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert all(word in done.stdout for word in ("REPO_ID", "--adapter", "--gguf", "--paper", "--revision", "--private"))
