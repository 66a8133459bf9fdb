"""A killed extraction resumes where it stopped and writes the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from helpers import REPO, local_manifest, run_extract
from weightdiff.extract import extract
from weightdiff.index import build_index
from weightdiff.settings import plain

SLOW_EXTRACT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import weightdiff.extract as ex
    from weightdiff.actions import ACTIONS
    from weightdiff.settings import ExtractSettings, typed

    def slowed(action):
        def slow(*args, **kwargs):  # a unit every 0.3 s: time to kill it half way
            time.sleep(0.3)
            return action(*args, **kwargs)
        return slow
    for name, action in list(ACTIONS.items()):  # the table both executors dispatch through
        ACTIONS[name] = slowed(action)
    manifest, index, settings = (json.loads(Path(p).read_text()) for p in sys.argv[1:4])
    ex.extract(index, manifest, typed(ExtractSettings, settings), Path(sys.argv[4]), Path(sys.argv[5]))
""")


def test_kill_9_half_way_then_resume_gives_identical_adapter(tiny_pair, tmp_path, cfg, caplog):
    manifest = local_manifest(*tiny_pair)
    index = build_index(manifest)
    settings = plain(cfg.extract)
    for name, obj in (("manifest", manifest), ("index", index), ("settings", settings)):
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_EXTRACT,
            *(str(tmp_path / f"{n}.json") for n in ("manifest", "index", "settings")),
            str(tmp_path / "resumed"),
            str(ckpt),
        ],
        env=os.environ | {"PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while len(list(ckpt.glob("*/*.safetensors"))) < 6:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(ckpt.glob("*/*.safetensors")))
    assert 6 <= done < 21 and not (tmp_path / "resumed").exists()  # half way, nothing that looks finished

    caplog.set_level("INFO", logger="weightdiff")
    extract(index, manifest, cfg.extract, tmp_path / "resumed", ckpt)
    assert f"resuming: {done} of 21 units already done" in caplog.text
    run_extract(*tiny_pair, tmp_path / "straight", cfg)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "resumed" / f).read_bytes() == (tmp_path / "straight" / f).read_bytes()
    assert not any(ckpt.iterdir())  # the checkpoint is gone once the adapter is written


def test_checkpoint_of_other_settings_is_not_reused(tiny_pair, tmp_path, cfg, caplog):
    manifest = local_manifest(*tiny_pair)
    index = build_index(manifest)
    caplog.set_level("INFO", logger="weightdiff")
    ckpt = tmp_path / "ckpt"
    (ckpt / "0123456789abcdef").mkdir(parents=True)  # an older run's leftovers
    extract(index, manifest, cfg.extract, tmp_path / "a", ckpt)
    assert "resuming" not in caplog.text and not any(ckpt.iterdir())
