"""Resolves model sources into local directories and a small manifest that downstream stages depend on.

The weights themselves are never a DVC dependency: hashing 70 GB on every run is what makes DVC slow for
model work. The manifest pins what was used instead: the commit sha of a Hub source (resolved before any
byte is fetched, so a rerun gets the same files even after the repo moves on), file names and sizes, and
for a local directory the files' modification times.

Interruptions: huggingface_hub resumes a dropped connection within a run (a Range request from the byte
reached), and files already in the cache are never fetched again. A killed run's partial file is not
resumed (huggingface_hub 2.x writes each attempt to a fresh temporary file, huggingface/huggingface_hub#4196):
the rerun fetches that file again from its start, so a kill costs at most the shards in flight.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from weightdiff.errors import WeightdiffError
from weightdiff.files import existing_ancestor
from weightdiff.remote import RemoteRepo, RequestError, is_remote, write_remote
from weightdiff.settings import DemoSettings, DownloadMode, Settings, plain

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
USED_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json")
# Unreachable Hub (connection refused, DNS, timeouts) raises RequestError, not an HfHubHTTPError or OSError.
HUB_ERRORS = (HfHubHTTPError, OfflineModeIsEnabled, OSError, RequestError)


@dataclass(frozen=True)
class Source:
    kind: str  # demo | local | hub
    ref: str  # demo variant, absolute path, or repo id
    revision: str | None = None


def parse_source(text: str) -> Source:
    """demo:a | an existing directory | org/name[@revision]; anything else is an error that says which."""
    if text.startswith("demo:"):
        variant = text.removeprefix("demo:")
        if variant not in ("a", "b"):
            raise WeightdiffError(f"unknown demo model {text!r}: use demo:a or demo:b")
        return Source("demo", variant)
    path = Path(text).expanduser()
    if path.is_dir():
        return Source("local", str(path.resolve()))
    if text.startswith(("/", ".", "~")) or not HUB_ID.match(text):
        raise WeightdiffError(f"model source {text!r}: no such local directory, and not a Hub id (org/name[@revision])")
    repo, _, revision = text.partition("@")
    return Source("hub", repo, revision or None)


def cache_root(cfg: Settings) -> Path:
    return Path(cfg.download.cache_dir or hf_constants.HF_HUB_CACHE).expanduser()


def demo_pair(cfg: Settings) -> tuple[Path, Path]:
    """The demo pair's directories, built on first use in a directory keyed by the demo settings and recipe, so
    changing either builds a new pair instead of reusing a stale one.

    The key holds what the chosen kind's output depends on: demo.pair, demo.seed, that kind's settings and its
    recipe version (the other kind's settings change nothing, so they do not rebuild the pair).
    """
    from weightdiff import demo  # imports peft and transformers (5 s), which Hub and local sources never need

    return demo.make_pair(cache_root(cfg) / "weightdiff-demo" / demo_key(cfg.demo), cfg.demo)


def demo_key(settings: DemoSettings) -> str:
    """The demo pair's cache directory name: a hash of the settings and recipe version its output depends on."""
    from weightdiff import demo

    kind = str(settings.pair)
    recipe = {
        "pair": kind,
        "seed": settings.seed,
        kind: plain(getattr(settings, kind)),
        "recipe": demo.RECIPE_VERSIONS[kind],
    }
    return f"{kind}-" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def resolve(source: Source, cfg: Settings) -> dict:
    """The manifest entry for one source, fetching Hub files or building the demo pair as needed."""
    if source.kind == "demo":
        path = demo_pair(cfg)[source.ref == "b"]
        return {"kind": "demo", "path": str(path), "revision": None, "files": file_list(path, with_mtime=False)}
    if source.kind == "local":
        path = Path(source.ref)
        return {"kind": "local", "path": str(path), "revision": None, "files": file_list(path, with_mtime=True)}
    if cfg.download.mode == DownloadMode.stream:
        path, files = streamed_snapshot(source, cfg)
        return {"kind": "hub", "mode": "stream", "path": str(path), "revision": path.name, "files": files}
    path = cached_snapshot(source, cfg) if hf_constants.HF_HUB_OFFLINE else hub_snapshot(source, cfg)
    return {
        "kind": "hub",
        "mode": "fetch",
        "path": str(path),
        "revision": path.name,
        "files": file_list(path, with_mtime=False),
    }


def streamed_snapshot(source: Source, cfg: Settings) -> tuple[Path, list[dict]]:
    """A directory named by the commit sha with the repo's small files and remote.json, the shards' headers
    (weightdiff.remote), and the manifest's file list: the same names and sizes a fetched snapshot gives, so a
    streamed and a fetched run share their resume store and write the same adapter.

    Nothing is fetched twice: the small files are skipped by huggingface_hub when present, and the headers of a
    commit never change, so an existing remote.json is kept.
    """
    if hf_constants.HF_HUB_OFFLINE:
        raise WeightdiffError(
            f"{source.ref}: download.mode=stream reads every tensor from the Hub, and HF_HUB_OFFLINE is set; "
            "unset it, or use download.mode=fetch to work from the local cache"
        )
    sha = hub_commit(source)
    sizes = hub_file_sizes(source, sha, cfg)
    shards = {n: size for n, size in sizes.items() if n.endswith(".safetensors")}
    directory = cache_root(cfg) / "weightdiff-stream" / ("models--" + source.ref.replace("/", "--")) / sha
    try:
        snapshot_download(
            source.ref,
            revision=sha,
            allow_patterns=sorted(sizes.keys() - shards.keys()),
            cache_dir=cfg.download.cache_dir,
            local_dir=directory,
        )
        if not is_remote(directory):
            write_remote(directory, RemoteRepo(source.ref, sha, hf_constants.ENDPOINT), shards)
    except HUB_ERRORS as e:
        raise WeightdiffError(f"download of the small files and headers of {source.ref}@{sha} failed: {e}") from e
    used = sorted(n for n in sizes if any(fnmatch(n, pattern) for pattern in USED_FILES))
    return directory, [{"name": n, "size": sizes[n]} for n in used]


def hub_file_sizes(source: Source, sha: str, cfg: Settings) -> dict[str, int]:
    """Name → size of the repo's top-level files at commit sha that download.allow_patterns admits."""
    try:
        info = HfApi().model_info(source.ref, revision=sha, files_metadata=True)
    except HUB_ERRORS as e:
        raise WeightdiffError(f"cannot list the files of {source.ref}@{sha} ({type(e).__name__}: {e})") from e
    return {
        s.rfilename: s.size or 0
        for s in info.siblings or []
        if "/" not in s.rfilename and any(fnmatch(s.rfilename, p) for p in cfg.download.allow_patterns)
    }


def hub_snapshot(source: Source, cfg: Settings) -> Path:
    """The snapshot directory of the commit the revision names now; its name is that commit's sha.

    Fetched by the revision's own name (not the sha found first) so that the cache records the branch or
    tag, and HF_HUB_OFFLINE=1 runs resolve it later from the cache alone.
    """
    sha = hub_commit(source)
    try:
        return Path(
            snapshot_download(
                source.ref,
                revision=source.revision,
                allow_patterns=list(cfg.download.allow_patterns),
                cache_dir=cfg.download.cache_dir,
            )
        )
    except HUB_ERRORS as e:
        raise WeightdiffError(f"download of {source.ref}@{sha} failed: {e}") from e


def cached_snapshot(source: Source, cfg: Settings) -> Path:
    """With HF_HUB_OFFLINE=1: the snapshot the cache already holds for the revision, without any request."""
    try:
        return Path(
            snapshot_download(
                source.ref,
                revision=source.revision,
                allow_patterns=list(cfg.download.allow_patterns),
                cache_dir=cfg.download.cache_dir,
                local_files_only=True,
            )
        )
    except (*HUB_ERRORS, ValueError) as e:
        raise WeightdiffError(
            f"HF_HUB_OFFLINE is set and the cache has no snapshot of "
            f"{source.ref}@{source.revision or 'main'} ({type(e).__name__}: {e})"
        ) from e


def hub_commit(source: Source) -> str:
    """The commit sha that source.revision (branch, tag, sha or default branch) names now."""
    try:
        info = HfApi().model_info(source.ref, revision=source.revision)
    except HUB_ERRORS as e:
        raise WeightdiffError(
            f"cannot resolve {source.ref}@{source.revision or 'main'} on the Hub ({type(e).__name__}: {e}); "
            "if you meant a local directory, it does not exist"
        ) from e
    if info.sha is None:  # always sent by the Hub, but optional in huggingface_hub's types
        raise WeightdiffError(f"{source.ref}@{source.revision or 'main'}: the Hub returned no commit hash")
    names = [s.rfilename for s in info.siblings or []]
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        raise WeightdiffError(
            f"{source.ref}@{info.sha} has no safetensors weights"
            + (f" (only pickle files {pickles[:3]}, which weightdiff never unpickles)" if pickles else "")
        )
    return info.sha


def file_list(model_dir: Path, with_mtime: bool) -> list[dict]:
    """The files extraction reads, with sizes (and mtimes for local directories, which can change in place)."""
    files = sorted({p for pattern in USED_FILES for p in model_dir.glob(pattern)})
    if not (model_dir / "config.json").is_file():
        raise WeightdiffError(f"{model_dir} has no config.json")
    return [
        {"name": p.name, "size": p.stat().st_size} | ({"mtime_ns": p.stat().st_mtime_ns} if with_mtime else {})
        for p in files
    ]


def missing_files(source: Source, sha: str, cfg: Settings) -> dict[str, int]:
    """Snapshot path → size of each allowed file at commit sha that the cache does not hold yet.

    huggingface_hub's own dry run decides, so a file counts as held exactly when the download would skip it
    (its blob already fetched, even for another commit). Sizes come from the Hub's file metadata.
    """
    try:
        plan = snapshot_download(
            source.ref,
            revision=sha,
            allow_patterns=list(cfg.download.allow_patterns),
            cache_dir=cfg.download.cache_dir,
            dry_run=True,
        )
    except HUB_ERRORS as e:
        raise WeightdiffError(f"cannot list the files of {source.ref}@{sha} ({type(e).__name__}: {e})") from e
    return {f.local_path: f.file_size or 0 for f in plan if f.will_download}


def check_free_space(sources: list[Source], cfg: Settings) -> None:
    """Before any weight is fetched: the missing files of all Hub sources together must fit in the cache.

    Checking both models up front is the point: finding out that B does not fit after A's 70 GB arrived
    costs hours.
    """
    missing: dict[str, int] = {}
    for source in sources:
        missing |= missing_files(source, hub_commit(source), cfg)
    needed = sum(missing.values())
    directory = existing_ancestor(cache_root(cfg))  # the cache may not exist before the first download
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise WeightdiffError(
            f"not enough disk space: {len(missing)} files still to download need {needed:,} bytes "
            f"({needed / 1e9:.1f} GB), {directory} has {free:,} bytes ({free / 1e9:.1f} GB) free; free some space "
            "or point download.cache_dir (or HF_HUB_CACHE) at a larger disk"
        )


def manifest(cfg: Settings) -> dict:
    sources = {side: parse_source(getattr(cfg, side)) for side in ("model_a", "model_b")}
    hub = [s for s in sources.values() if s.kind == "hub"]
    if hub and not hf_constants.HF_HUB_OFFLINE and cfg.download.mode == DownloadMode.fetch:
        check_free_space(hub, cfg)
    return {side: {"source": getattr(cfg, side)} | resolve(source, cfg) for side, source in sources.items()}
