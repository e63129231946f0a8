"""The evaluation report: report.md with one table comparing every model, and PNG plots beside it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from synth.redact import redact

ACCURACY_PNG = "accuracy.png"
NLL_PNG = "nll.png"
JUDGE_PNG = "judge.png"


def fmt(value: Any, digits: int = 3, percent: bool = False) -> str:
    """A table cell: a number rounded, a percentage, or '–' when not measured."""
    if value is None:
        return "–"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.{digits}f}"


def write_report(result: dict[str, Any], out_dir: Path) -> Path:
    """Write report.md and its plots for an eval.json-shaped `result`; returns the report's path."""
    plots = write_plots(result, out_dir)
    teacher, models, judge = result["teacher"], result["models"], result.get("judge")
    config = result["config"]
    lines = [
        "# Evaluation",
        "",
        f"- teacher: `{redact(teacher['spec'])}` ({teacher['requests_sent']} requests sent, {teacher['cache_hits']} answers from the cache)",
        f"- prompts: `{config['prompts']}` ({result['prompts']} evaluated), students answer greedily, at most {config['max_new_tokens']} new tokens",
    ]
    if judge:
        lines.append(f"- judge: `{redact(judge['spec'])}`, each pair asked twice with the order swapped; inconsistent verdicts count as ties "
                     f"({judge['requests_sent']} requests sent, {judge['cache_hits']} from the cache)")  # fmt: skip
    lines += [
        "",
        "| model | accuracy | agreement with teacher | NLL / token | NLL / byte | gap to teacher | gap closed | judge win rate (W/T/L) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        j = m.get("judge")
        judged = f"{fmt(j['win_rate'], percent=True)} ({j['wins']}/{j['ties']}/{j['losses']})" if j else "–"
        name = f"{m['name']} (before)" if m["role"] == "before" else m["name"]
        lines.append(
            f"| {name} | {fmt(m['accuracy'], percent=True)} | {fmt(m['agreement'], percent=True)} | {fmt(m['nll'])} "
            f"| {fmt(m['nll_per_byte'])} | {fmt(m['nll_gap'])} | {fmt(m['gap_closed'], percent=True)} | {judged} |"
        )
    lines.append(
        f"| **teacher** | {fmt(teacher['accuracy'], percent=True)} | – | {fmt(teacher['nll'])} (floor) "
        f"| {fmt(teacher['nll_per_byte'])} | 0 | – | – |"
    )
    lines += [
        "",
        "Accuracy counts prompts with a reference answer; agreement, prompts where the teacher stated an answer. "
        "NLL is the teacher's answers' negative log-likelihood (nats) under each model, teacher-forced, answer tokens only; "
        "per token depends on the tokenizer, per byte does not. Gap closed = (NLL before − NLL after) / (NLL before − teacher's NLL).",
        "",
    ]
    lines += [f"![{name}]({name})" for name in plots]
    curves = [(m["name"], Path(m["path"]) / "training_curves.png") for m in models if m.get("path")]
    curves = [(name, png) for name, png in curves if png.is_file()]
    if curves:  # the students' training loss, where a trainer of ours wrote it
        lines += ["", "## Training", ""] + [f"![{name}: training curves]({os.path.relpath(png, out_dir)})" for name, png in curves]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    lines += ["", "## Examples", ""] + examples(result, 3)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def examples(result: dict[str, Any], count: int) -> list[str]:
    """The first prompts with the reference, the teacher's answer and each model's, as markdown."""
    lines = []
    for item in result["items"][:count]:
        question = " ".join(item["question"].split())
        lines += [f"**{item['id']}**: {question[:300]}{'…' if len(question) > 300 else ''}", ""]
        lines.append(f"- reference: {item['reference'] if item['reference'] is not None else '–'}")
        lines.append(f"- teacher: {item['teacher']['answer'] or '(no answer)'}")
        for name, m in item["models"].items():
            lines.append(f"- {name}: {m['answer'] or '(no answer)'}")
        lines.append("")
    return lines


def write_plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    """accuracy.png (accuracy and agreement per model), nll.png (NLL per model, teacher floor), judge.png; their names."""
    # Figures of their own, not pyplot: no global backend or figure list (PNG is drawn with Agg either way).
    models, teacher = result["models"], result["teacher"]
    names = [m["name"] for m in models]
    written = []

    fig = Figure(figsize=(max(4, 1.4 * len(names) + 2), 3.2))
    ax = fig.subplots()
    xs = range(len(names) + 1)
    acc = [m["accuracy"] for m in models] + [teacher["accuracy"]]
    agree = [m["agreement"] for m in models] + [None]
    for offset, values, label in ((-0.2, acc, "accuracy"), (0.2, agree, "agreement with teacher")):
        bars = ax.bar([x + offset for x in xs], [v or 0 for v in values], width=0.4, label=label)
        ax.bar_label(bars, labels=["" if v is None else f"{100 * v:.0f}%" for v in values], fontsize=7)
    ax.set_xticks(list(xs), names + ["teacher"], rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Answers")
    written.append(_save(fig, out_dir / ACCURACY_PNG))

    fig = Figure(figsize=(max(4, 1.2 * len(names) + 2), 3.2))
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), [m["nll"] or 0 for m in models], color="tab:gray")
    ax.bar_label(bars, labels=[fmt(m["nll"], 2) for m in models], fontsize=7)
    if teacher["nll"] is not None:
        ax.axhline(teacher["nll"], color="tab:red", linestyle="--", label=f"teacher floor {teacher['nll']:.2f}")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("nats / token")
    ax.set_title("NLL of the teacher's answers")
    written.append(_save(fig, out_dir / NLL_PNG))

    judged = [m for m in models if m.get("judge")]
    if judged:
        fig = Figure(figsize=(max(4, 1.2 * len(judged) + 2), 3.2))
        ax = fig.subplots()
        ax.bar(range(len(judged)), [m["judge"]["win_rate"] or 0 for m in judged], color="tab:green")
        ax.axhline(0.5, color="black", linestyle=":", label="par with the teacher")
        ax.set_xticks(range(len(judged)), [m["name"] for m in judged], rotation=20, ha="right")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Judge win rate vs teacher (ties ½)")
        written.append(_save(fig, out_dir / JUDGE_PNG))
    return written


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path.name
