"""A dataset card (README.md with YAML front matter) beside a JSONL dataset, from its records and rejects.

The Hugging Face Hub and `datasets` read the front matter (`configs`, `license`, `tags`,
`task_categories`); people read the rest: method, teacher, templates, parameters, and
what was kept and rejected, by reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import yaml

from synth.io import rejects_path

#: Licenses of the seed sets shipped in data/, by the folder a job's input came from.
SEED_LICENSES = {"gsm8k": "MIT (GSM8K, Cobbe et al. 2021)", "self_instruct": "Apache-2.0 (Self-Instruct seed tasks)",
                 "taxonomies": "Apache-2.0 (written for blackbox-distill)"}
_TASKS = {"sft": "text-generation", "preference": "text-generation", "critique": "text-generation"}


def _reason_kind(reason: str) -> str:
    """Group reasons like 'wrong answer (got 3, expected 4)' under 'wrong answer'."""
    # Multi-stage jobs tag their reasons ('[round 2] sample 1: truncated: ...'): the kind comes after the tag.
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason)
    head = reason.split(":", 1)[1] if reason.startswith("sample ") and ":" in reason else reason
    head = head.strip()
    for sep in (" (", ": "):
        head = head.split(sep, 1)[0]
    return head.strip()[:80] or "unknown"


def summarize(dataset: Path) -> dict:
    """Counts and provenance gathered from the records and rejects files."""
    kinds, methods, teachers, templates, params = Counter(), Counter(), Counter(), {}, {}
    records = 0
    with dataset.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            records += 1
            kinds[row.get("kind", "sft")] += 1
            prov = row.get("provenance") or {}
            methods[prov.get("method", "?")] += 1
            teachers[prov.get("teacher", "?")] += 1
            if prov.get("template"):
                templates[prov["template"]] = prov.get("template_hash")
            params.setdefault(prov.get("method", "?"), prov.get("params", {}))
    rejected = Counter()
    rejects = rejects_path(dataset)
    if rejects.exists():
        with rejects.open(encoding="utf-8") as fh:
            for line in fh:
                rejected[_reason_kind(json.loads(line).get("reason", ""))] += 1
    return {"records": records, "kinds": kinds, "methods": methods, "teachers": teachers, "templates": templates,
            "params": params, "rejected": rejected}


def seed_license(inputs: list[str | Path]) -> str | None:
    """The license of a shipped seed set a job read, if it read one."""
    for item in inputs:
        parts = Path(str(item)).parts
        for folder, license_text in SEED_LICENSES.items():
            if folder in parts:
                return license_text
    return None


def write_data_card(dataset: Path, inputs: list[str | Path] = (), extra: dict | None = None) -> Path:
    """Write README.md in the dataset's folder describing it; returns its path."""
    s = summarize(dataset)
    kind = s["kinds"].most_common(1)[0][0] if s["kinds"] else "sft"
    seeds = seed_license(inputs)
    front = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": dataset.name}]}],
        "task_categories": [_TASKS.get(kind, "text-generation")],
        "tags": ["synthetic", "distillation", "blackbox-distill", *sorted(s["methods"])],
        "license": "other" if seeds else "unknown",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {dataset.stem}", ""]
    lines.append(f"Synthetic {kind} data written by blackbox-distill: {s['records']} records in `{dataset.name}`.")
    lines += ["", "## How it was made", ""]
    lines += [f"- method: {m} ({n} records)" for m, n in s["methods"].items()]
    lines += [f"- teacher: `{t}` ({n} records)" for t, n in s["teachers"].items()]
    lines += [f"- template: `{name}` (sha256 prefix {h})" for name, h in s["templates"].items()]
    for method, p in s["params"].items():
        lines.append(f"- parameters ({method}): `{json.dumps(p, sort_keys=True)}`")
    if inputs:
        lines.append("- inputs: " + ", ".join(f"`{i}`" for i in inputs))
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", "## Kept and rejected", "", f"- kept: {s['records']}"]
    total_rejected = sum(s["rejected"].values())
    lines.append(f"- rejected: {total_rejected}" + (f" (in `{rejects_path(dataset).name}`)" if total_rejected else ""))
    lines += [f"  - {reason}: {n}" for reason, n in s["rejected"].most_common()]
    lines += ["", "## License", ""]
    lines.append(
        f"Seeds: {seeds}. Generated text is also subject to the teacher's terms of use." if seeds
        else "Check the license of your inputs and the teacher's terms of use before sharing."
    )
    card = dataset.parent / "README.md"
    card.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return card
