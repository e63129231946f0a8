"""A dataset card (README.md with YAML front matter) beside a JSONL dataset, from its records and rejects.

The Hugging Face Hub and `datasets` read the front matter (`configs`, `license`, `tags`,
`task_categories`); people read the rest: method, teacher, templates, parameters, and
what was kept and rejected, by reason.

The `configs:` block names the data file, so rejects and work files beside it are never
loaded as rows. Its config name carries the data file's content hash: `datasets` keys
its cache of a local folder by the folder's name and the config name alone (not by the
files' content), so with a fixed name every folder called `labeled` would load as the
first one ever loaded, and a rewritten folder as its old rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import yaml

from synth.errors import ConfigError
from synth.layout import rejects_path, stem, write_text_atomic

#: A line of every card we write (after the front matter): a README.md without it is the user's, never replaced.
CARD_MARK = "<!-- dataset card written by blackbox-distill; rewritten whenever the data is -->"

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
    digest = hashlib.sha256()
    with dataset.open("rb") as fh:
        for line in fh:
            digest.update(line)
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
            "params": params, "rejected": rejected, "sha256": digest.hexdigest()}


def card_path(dataset: Path) -> Path:
    """Where the card of `dataset` goes: README.md in its folder."""
    return Path(dataset).parent / "README.md"


def check_card_target(dataset: Path) -> None:
    """Refuse a README.md beside `dataset` that we did not write: a card must never replace a user's file."""
    card = card_path(dataset)
    if card.is_symlink() or (card.exists() and not card.is_file()):
        raise ConfigError(f"{card}: in the way of the dataset card and not a plain file; move it or write the dataset elsewhere")
    if card.is_file():
        with card.open("rb") as fh:
            head = fh.read(1 << 16).decode("utf-8", "replace")
        # Cards from before the mark existed said so in their first sentence.
        if CARD_MARK not in head and "data written by blackbox-distill:" not in head:
            raise ConfigError(f"{card}: a README.md that blackbox-distill did not write is where the dataset card goes; "
                              "move it or write the dataset elsewhere")  # fmt: skip


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
    check_card_target(dataset)
    s = summarize(dataset)
    kind = s["kinds"].most_common(1)[0][0] if s["kinds"] else "sft"
    seeds = seed_license(inputs)
    config_name = f"{stem(dataset)}-{s['sha256'][:12]}"
    front = {
        "configs": [{"config_name": config_name, "default": True, "data_files": [{"split": "train", "path": dataset.name}]}],
        "task_categories": [_TASKS.get(kind, "text-generation")],
        "tags": ["synthetic", "distillation", "blackbox-distill", *sorted(s["methods"])],
        "license": "other" if seeds else "unknown",
    }
    # The mark goes after the front matter: the Hub and `datasets` need `---` on the first line.
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", CARD_MARK, "", f"# {dataset.stem}", ""]
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
    lines += ["", "## Loading", "", "```python", "from datasets import load_dataset",
              f'ds = load_dataset("path/to/{dataset.parent.name}", split="train")  # this folder, or its Hub repo once pushed', "```", "",
              f"The config name `{config_name}` ends with the data file's content hash, so `datasets` never serves",
              "another folder's rows, or this folder's older rows, from its cache."]
    card = card_path(dataset)
    return write_text_atomic(card, "\n".join(lines) + "\n")

