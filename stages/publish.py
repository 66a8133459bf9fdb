"""Stage 9 (opt-in): the run on the Hub, when publish.repo names a repo; metrics/publish.json says what went where.

With publish.repo unset the stage records {"published": false} and never reaches the network, so `dvc repro` stays
offline by default.
"""

import logging
from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.files import require_writable, write_json
from weightdiff.publish import PublishRecord, publish
from weightdiff.settings import Settings

logger = logging.getLogger("weightdiff.publish")


def main(cfg: Settings) -> None:
    p = cfg.paths
    require_writable(Path(p.publish_record).parent)
    if cfg.publish.repo is None:
        logger.info("publish.repo is unset: nothing published (set it to a Hub repo, e.g. -S publish.repo=org/name)")
        record = PublishRecord(published=False)
    else:
        record = publish(cfg.publish, p)
    write_json(Path(p.publish_record), record)


if __name__ == "__main__":
    run_stage(main)
