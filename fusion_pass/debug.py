"""Debugging aid: ``FUSION_PASS_DUMP=1`` logs every graph before and after each stage on the
``fusion_pass`` logger (DEBUG level); ``FUSION_PASS_DUMP=/some/dir`` writes them as files."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from torch import fx

log = logging.getLogger("fusion_pass")


def dump(path: str, stage: str, graph: fx.Graph) -> None:
    target = os.environ.get("FUSION_PASS_DUMP")
    if not target:
        return
    label = path or "root"
    if target == "1":
        log.debug("graph %s after %s:\n%s", label, stage, graph)
        return
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
    (folder / f"{safe}.{stage}.txt").write_text(str(graph))
