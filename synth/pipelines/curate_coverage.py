"""The coverage report of a curation run: questions and records per cell, as JSON and a Markdown table beside the output."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from synth.generators.curate.taxonomy import Cell
from synth.layout import stem, write_text_atomic


def beside(output: str | Path, suffix: str) -> Path:
    """A file next to the output: `out.jsonl` + `.coverage.json` → `out.coverage.json`."""
    output = Path(output)
    return output.with_name(stem(output) + suffix)


def coverage(cells: list[Cell], cells_total: int, questions: list, records: list[dict[str, Any]], rejected: int, per_cell: int) -> dict[str, Any]:
    """Counts per cell (in cell order) and totals; `questions` are the kept question records, `records` the output's meta dicts."""
    asked = Counter(q.meta["cell"] for q in questions)
    answered = Counter(m.get("cell") for m in records)
    rows = [
        {
            "cell": c.id, "topic": list(c.topic), "task_type": c.task_type.name, "difficulty": c.difficulty.name,
            "knowledge_point": c.knowledge_point, "questions": asked[c.id], "records": answered[c.id],
        }  # fmt: skip
        for c in cells
    ]
    empty = [r for r in rows if r["records"] == 0]
    return {
        "totals": {
            "cells_in_taxonomy": cells_total, "cells": len(cells), "cells_with_records": len(rows) - len(empty),
            "cells_without_records": len(empty), "questions_per_cell_asked": per_cell, "questions": len(questions),
            "records": len(records), "rejects": rejected,
        },  # fmt: skip
        "cells_without_records": [r["cell"] for r in empty],
        "cells": rows,
    }


def _cell_text(value: Any) -> str:
    text = " > ".join(value) if isinstance(value, list) else ("—" if value is None else str(value))
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(summary: dict[str, Any], title: str) -> str:
    """A short report: totals, then one table row per cell."""
    t = summary["totals"]
    lines = [
        f"# Coverage of {title}",
        "",
        f"{t['cells']} of {t['cells_in_taxonomy']} cells used, {t['questions_per_cell_asked']} questions asked per cell: "
        f"{t['questions']} questions kept, {t['records']} records, {t['rejects']} rejects; "
        f"**{t['cells_without_records']} cells without records**.",
        "",
        "| topic | task type | difficulty | knowledge point | questions | records |",
        "| --- | --- | --- | --- | ---: | ---: |",
    ]
    for r in summary["cells"]:
        flag = " ⚠" if r["records"] == 0 else ""
        cols = [_cell_text(r[k]) for k in ("topic", "task_type", "difficulty", "knowledge_point")]
        lines.append(f"| {' | '.join(cols)} | {r['questions']} | {r['records']}{flag} |")
    return "\n".join(lines) + "\n"


def write_coverage(output: Path, cells: list[Cell], cells_total: int, questions: list, records: list[dict[str, Any]], rejected: int, config) -> tuple[Path, Path, int]:
    """Write `out.coverage.json` and `out.coverage.md`; returns their paths and the number of cells without records."""
    summary = coverage(cells, cells_total, questions, records, rejected, config.per_cell)
    summary = {"output": str(output), "source": config.taxonomy or f"root topic {config.root_topic!r}", "seed": config.seed, **summary}
    json_path, md_path = beside(output, ".coverage.json"), beside(output, ".coverage.md")
    write_text_atomic(json_path, json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    write_text_atomic(md_path, markdown(summary, output.name))
    return json_path, md_path, summary["totals"]["cells_without_records"]
