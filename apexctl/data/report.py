"""``CACHE_DIR/prepare_report.json``: what prepare skipped and why, the final counts and the throughput."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from apexctl.atomic import write_text

REPORT_NAME = "prepare_report.json"


@dataclass
class Skip:
    """One skipped item (``caption`` set when only that caption of a multi-caption item was dropped)."""

    index: int
    item: str
    reason: str
    caption: str | None = None

    def to_json(self) -> dict:
        out = {"index": self.index, "item": self.item, "reason": self.reason}
        if self.caption is not None:
            out["caption"] = self.caption
        return out


@dataclass
class Report:
    source: str
    skipped: list[Skip] = field(default_factory=list)

    def skip(self, index: int, item: str, reason: str, caption: str | None = None) -> None:
        self.skipped.append(Skip(index, item, reason, caption))

    def write(self, cache_dir: Path, counts: dict, timing: dict) -> Path:
        path = Path(cache_dir) / REPORT_NAME
        body = {
            "source": self.source,
            "counts": counts,
            "timing": timing,
            "skipped": [s.to_json() for s in sorted(self.skipped, key=lambda s: s.index)],
        }
        write_text(path, json.dumps(body, indent=1) + "\n")
        return path


def read_report(cache_dir: str | Path) -> dict | None:
    p = Path(cache_dir) / REPORT_NAME
    return json.loads(p.read_text()) if p.is_file() else None
