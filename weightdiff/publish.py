"""Publishing a run: its adapter, model card, GGUF and paper as one commit to a Hub model repo.

Opt-in (`publish.repo`), and the only step that writes to the network. The repo is laid out so that it loads as it
is: the PEFT files at its root (`PeftModel.from_pretrained(base, repo)`), the GGUF beside them, the paper under
paper/ with the figures its Typst source reads under figures/ (as reports/ holds them). The optional parts (GGUF,
paper, figures, the metrics the card quotes) are left out, and said so, when the run has none: a run on an
architecture llama.cpp cannot load still publishes. A missing adapter is an error: there is nothing to publish.

Whatever the Hub answers is one WeightdiffError naming the repo and what to do; the token is huggingface_hub's
own (HF_TOKEN, or what `hf auth login` stored), as is the endpoint (HF_ENDPOINT).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from typing_extensions import NotRequired, TypedDict

from weightdiff.card import model_card
from weightdiff.errors import WeightdiffError
from weightdiff.files import read_json
from weightdiff.remote import RequestError  # huggingface_hub's HTTP client's: an unreachable Hub raises it
from weightdiff.settings import Paths, PublishSettings

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What `weightdiff extract` writes beside its adapter (commands.METRICS_FILE): that adapter's own numbers.
ADAPTER_METRICS = "weightdiff_metrics.json"


class PublishRecord(TypedDict):
    """metrics/publish.json: what was published where, or that nothing was (publish.repo unset)."""

    published: bool
    repo: NotRequired[str]
    revision: NotRequired[str]
    commit: NotRequired[str]  # the commit's sha on the Hub
    url: NotRequired[str]  # the commit's page
    files: NotRequired[list[str]]  # repo paths the commit holds, the card included
    left_out: NotRequired[list[str]]  # optional parts the run did not have, each with why


def run_outputs(paths: Paths) -> tuple[dict, list[str]]:
    """The stage outputs the card quotes, by the names model_card takes, and a line for each one missing.

    The extraction's numbers are the adapter's own when `weightdiff extract` left them beside it, else
    metrics/extract.json's: an adapter made outside the pipeline is never described by the pipeline's last run.
    """
    beside = Path(paths.adapter) / ADAPTER_METRICS
    sources = {
        "manifest": Path(paths.manifest),
        "extract": beside if beside.is_file() else Path(paths.extract_metrics),
        "validate": Path(paths.validate_metrics),
        "gguf": Path(paths.gguf_metrics),
    }
    run, missing = {}, []
    for name, path in sources.items():
        if path.is_file():
            run[name] = read_json(path)
        else:
            missing.append(f"{name} numbers: {path} not found")
    return run, missing


def gguf_files(path: Path, summary: dict | None) -> tuple[list[Path], str | None]:
    """The .gguf file(s) at `path` (a file, or gguf-convert's directory), or why there are none."""
    if path.is_file():
        return [path], None
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if found:
        return found, None
    why = (summary or {}).get("reason") or f"{path} holds no .gguf file"
    return [], f"GGUF: {why}"


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows one (adapters reach gigabytes), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def tree_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def assemble(folder: Path, paths: Paths, run: dict) -> tuple[list[str], list[str]]:
    """Fills `folder` with the repo's files but the card; returns their repo paths and what was left out."""
    adapter = Path(paths.adapter)
    absent = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
    if absent:
        raise WeightdiffError(
            f"{adapter} holds no PEFT adapter ({', '.join(absent)} missing): run extract first (dvc repro does), "
            "or name the adapter directory"
        )
    placed: dict[str, Path] = {p.relative_to(adapter).as_posix(): p for p in tree_files(adapter)}
    ggufs, no_gguf = gguf_files(Path(paths.gguf), run.get("gguf"))
    placed |= {p.name: p for p in ggufs}
    left_out = [no_gguf] if no_gguf else []
    for prefix, directory in (("paper", Path(paths.paper)), ("figures", Path(paths.figures))):
        files = tree_files(directory) if directory.is_dir() else []
        placed |= {f"{prefix}/{p.relative_to(directory).as_posix()}": p for p in files}
        if not files:
            left_out.append(f"{prefix}: {directory} holds no files")
    for name, source in placed.items():
        link_or_copy(source, folder / name)
    return sorted(placed), left_out


def commit_message(run: dict) -> str:
    """The run in one line: what a reader of the repo's history needs to tell its commits apart."""
    parts = []
    if "extract" in run:
        parts.append(f"rank {run['extract']['rank']}, energy kept {run['extract']['energy']:.4f}")
    if "validate" in run and run["validate"].get("gap_closed") is not None:
        parts.append(f"gap closed {run['validate']['gap_closed']:.5f} ({run['validate']['verdict']})")
    return "weightdiff adapter" + (f": {'; '.join(parts)}" if parts else "")


def refusal(error: HfHubHTTPError, repo_id: str) -> str:
    status = error.response.status_code if error.response is not None else None
    if status == 401:
        return (
            f"the Hub refused the token (401) for {repo_id}: log in with `hf auth login` or set HF_TOKEN "
            "(a token with write access)"
        )
    if status == 403:
        return (
            f"the Hub refused to let this token write to {repo_id} (403): it needs write access to "
            f"{repo_id.rpartition('/')[0] or 'your namespace'} (a write token: `hf auth login`, or HF_TOKEN)"
        )
    detail = error.server_message or str(error).splitlines()[0]
    return f"the Hub answered {status} while publishing {repo_id}: {detail}"


@contextmanager
def hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    """Whatever huggingface_hub raises, as one WeightdiffError naming the repo and what to do."""
    try:
        yield
    except OfflineModeIsEnabled:
        raise WeightdiffError(
            f"cannot publish {repo_id}: HF_HUB_OFFLINE is set, and publishing needs the Hub"
        ) from None
    except HfHubHTTPError as e:
        raise WeightdiffError(refusal(e, repo_id)) from e
    except RuntimeError as e:  # an LFS upload's error, wrapped by huggingface_hub with the file's name
        if isinstance(e.__cause__, HfHubHTTPError):
            raise WeightdiffError(f"{refusal(e.__cause__, repo_id)} ({e})") from e
        raise
    except RequestError as e:
        raise WeightdiffError(f"cannot reach the Hub at {endpoint} to publish {repo_id}: {e}") from e
    except ValueError as e:  # an invalid repo id, or card metadata the Hub refuses
        raise WeightdiffError(f"cannot publish {repo_id}: {str(e).splitlines()[0]}") from e


def publish(
    settings: PublishSettings, paths: Paths, endpoint: str | None = None, token: str | None = None
) -> PublishRecord:
    """Uploads the run to `settings.repo` at `settings.revision` (repo and branch made when missing) as one commit.

    `endpoint` and `token` default to huggingface_hub's (HF_ENDPOINT; HF_TOKEN or the stored login).
    """
    repo_id = settings.repo
    if repo_id is None:
        raise WeightdiffError("publish.repo is unset: name the Hub repo to publish to (org/name)")
    run, left_out = run_outputs(paths)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="weightdiff-publish-") as tmp:
        folder = Path(tmp)
        files, absent = assemble(folder, paths, run)
        left_out += absent
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        card = model_card(repo_id, settings.revision, adapter_config, run, files)
        (folder / constants.REPOCARD_NAME).write_text(card)
        for line in left_out:
            logger.info("publish: left out %s", line)
        with hub_errors(repo_id, api.endpoint):
            api.create_repo(repo_id, exist_ok=True, private=settings.private)
            if settings.revision != constants.DEFAULT_REVISION:
                api.create_branch(repo_id, branch=settings.revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=settings.revision,
                commit_message=settings.commit_message or commit_message(run),
            )
    logger.info("published %s files to %s@%s: %s", len(files) + 1, repo_id, settings.revision, info.commit_url)
    return PublishRecord(
        published=True,
        repo=repo_id,
        revision=settings.revision,
        commit=info.oid,
        url=info.commit_url,
        files=sorted([constants.REPOCARD_NAME, *files]),
        left_out=left_out,
    )
