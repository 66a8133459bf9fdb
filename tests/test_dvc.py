"""`dvc repro` and `dvc exp` on a fresh copy of this repository, as a user runs them (minutes: marked slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow
STAGES = ["download", "verify", "index", "extract", "validate", "gguf-convert", "figures", "paper", "publish"]


class Project:
    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env

    def run(self, *cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    def repro(self) -> list[str]:
        """Names of the stages that really ran (not restored from the run cache)."""
        return re.findall(r"Running stage '([\w-]+)'", self.run("dvc", "repro"))

    def experiments(self) -> list[dict]:
        """One {params, metrics} per experiment row of `dvc exp show`, workspace and baseline excluded."""
        rows = []

        def walk(node):
            if isinstance(node, dict):
                if node.get("name") and node.get("data"):
                    data = node["data"]
                    rows.append(
                        {
                            "name": node["name"],
                            "params": data["params"]["params.yaml"]["data"],
                            "metrics": {k: v["data"] for k, v in data.get("metrics", {}).items()},
                        }
                    )
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(json.loads(self.run("dvc", "exp", "show", "--json")))
        return [r for r in rows if r["name"] not in ("workspace", "main", "master")]


@pytest.fixture(scope="module")
def project(tmp_path_factory, hub_cache, smollm2_pair) -> Project:
    """A fresh clone of the working tree: tracked and untracked-but-not-ignored files, a new git history; the
    HF cache already holds the demo pair (built once per session by the smollm2_pair fixture)."""
    root = tmp_path_factory.mktemp("clone")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (REPO / f).is_file() and f != "dvc.lock":  # a clone has no lock file: this working tree's is local
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    env = os.environ | {
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    p = Project(root, env)
    p.run("git", "init", "-q")
    p.run("git", "add", "-A")
    p.run("git", "commit", "-qm", "fresh clone")
    return p


@pytest.fixture(scope="module")
def reproduced(project) -> list[str]:
    """The stages the clone's first `dvc repro` ran; its results are committed as the baseline that every later
    test starts from and leaves as it found it, so each test also runs alone (-k) or in any order."""
    stages = project.repro()
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "baseline run")
    return stages


def test_first_repro_runs_every_stage(project, reproduced):
    assert reproduced == STAGES
    for out in [
        "artifacts/adapter/adapter_model.safetensors",
        "artifacts/gguf/adapter.gguf",
        "metrics/validate.json",
        "reports/figures/energy_vs_rank.png",
        "reports/paper/paper.typ",
        "reports/paper/paper.pdf",
    ]:
        assert (project.root / out).is_file(), out
    validate = json.loads((project.root / "metrics/validate.json").read_text())
    assert validate["kl_adapted"] <= 1e-4 and validate["gap_closed"] >= 0.999 and validate["texts"] == "built-in"
    assert validate["verdict"] == "reproduces", validate["verdict_summary"]
    assert json.loads((project.root / "metrics/gguf.json").read_text())["written"] is True
    assert json.loads((project.root / "metrics/publish.json").read_text()) == {"published": False}  # opt-in


def test_second_repro_runs_nothing(project, reproduced):
    assert project.repro() == []
    assert "up to date" in project.run("dvc", "status")


def test_rank_change_reruns_extract_and_what_follows_only(project, reproduced):
    params = project.root / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("  rank: auto\n", "  rank: 8\n"))
    status = project.run("dvc", "status")
    assert "extract:" in status and not re.search(r"^(download|verify|index):", status, re.M)
    assert project.repro() == ["extract", "validate", "gguf-convert", "figures", "paper", "publish"]
    assert json.loads((project.root / "metrics/extract.json").read_text())["rank"] == 8
    params.write_text(original)
    project.repro()  # back to the baseline, from the run cache
    assert project.run("git", "status", "--porcelain") == ""


def test_exp_run_with_override_is_listed_with_its_metrics(project, reproduced):
    project.run("dvc", "exp", "remove", "--all-commits")
    project.run("dvc", "exp", "run", "-S", "extract.rank=8")
    [exp] = project.experiments()
    assert exp["params"]["extract"]["rank"] == 8
    assert exp["metrics"]["metrics/extract.json"]["rank"] == 8
    assert exp["metrics"]["metrics/validate.json"]["kl_adapted"] > 0
    project.run("git", "checkout", "--", ".")  # `dvc exp run` applied the experiment: back to the baseline
    project.run("dvc", "checkout", "--force")
    assert "up to date" in project.run("dvc", "status")


def test_queued_rank_sweep_ends_with_both_experiments(project, reproduced):
    project.run("dvc", "exp", "remove", "--all-commits")
    project.run("dvc", "exp", "run", "--queue", "-S", "extract.rank=4,12")
    project.run("dvc", "queue", "start", "-j", "1")
    deadline = time.time() + 600
    while re.search(r"\b(Queued|Running)\b", project.run("dvc", "queue", "status")):
        assert time.time() < deadline, project.run("dvc", "queue", "status")
        time.sleep(3)
    exps = {e["params"]["extract"]["rank"]: e for e in project.experiments()}
    assert set(exps) == {4, 12}, project.run("dvc", "queue", "status")
    energy = {r: e["metrics"]["metrics/extract.json"]["energy"] for r, e in exps.items()}
    kl = {r: e["metrics"]["metrics/validate.json"]["kl_adapted"] for r, e in exps.items()}
    assert energy[4] < energy[12] and kl[4] > kl[12]
