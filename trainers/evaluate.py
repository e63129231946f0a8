"""Evaluation: students against their teacher on held-out prompts (`distill eval`).

For each held-out prompt the teacher answers once, greedily, through the response
cache (a rerun never pays twice); each student (and an optional "before" student)
answers greedily with transformers. Per model: accuracy on checkable answers,
agreement with the teacher's final answers, per-token NLL of the teacher's answers
under the model (teacher-forced, answer tokens only) with the teacher's own NLL as
the floor, the fraction of the NLL gap closed since "before", and a judge's win rate
against the teacher with the order swapped. Writes eval.json, report.md and plots.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from itertools import islice
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from synth.errors import ConfigError, InputError
from synth.filters.verify import get_checker, reference_answer
from synth.generators.label import load_demonstrations
from synth.io import read_jsonl
from synth.job import open_cache
from synth.prompts import load_template
from synth.redact import redact
from synth.records import Message
from synth.teachers import ChatRequest, SamplingParams, build_teacher, parse_teacher_spec
from synth.teachers.base import TeacherError
from synth.teachers.cached import CachedTeacher
from trainers import eval_metrics as em
from trainers.common import check_output_dir, pick_device, resolve_model
from trainers.report import write_report
from trainers.settings import EvalSettings


class Item(BaseModel):
    """One held-out prompt: the chat to answer, the question a judge sees, and the reference answer if any."""

    id: str
    messages: list[dict[str, str]]
    question: str
    reference: str | None = None


def load_items(config: EvalSettings) -> list[Item]:
    """The held-out prompts, rendered like labeling renders them; errors name file:line."""
    template = load_template(config.template, config.lang) if config.template else None
    # The same prompt the student was trained on: demonstrations included.
    demos = [d.model_dump() for d in load_demonstrations(config.demonstrations, config.lang, template)]
    stop = None if config.limit is None else config.skip + config.limit
    items = []
    for lineno, row in islice(read_jsonl(config.prompts), config.skip, stop):
        where = f"{config.prompts}:{lineno}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object with 'question' or 'prompt'")
        ref = row.get("answer", row.get("reference"))
        if isinstance(row.get("question"), str) and row["question"].strip():
            question = row["question"]
            content = template.render(where, question=question, demonstrations=demos) if template else question
            messages = [{"role": "user", "content": content}]
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            question = row["prompt"]
            messages = [{"role": "user", "content": question}]
        elif isinstance(row.get("prompt"), list) and row["prompt"]:
            try:
                messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["prompt"]]
            except (TypeError, KeyError):
                raise InputError(f"{where}: field 'prompt': a list of {{role, content}} messages expected") from None
            question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        else:
            raise InputError(f"{where}: needs a 'question' or a 'prompt' (text or chat messages)")
        reference = reference_answer(ref) if isinstance(ref, (str, int, float)) else None
        items.append(Item(id=str(row.get("id", lineno)), messages=messages, question=question, reference=reference))
    if not items:
        raise InputError(f"{config.prompts}: no prompts to evaluate (skip={config.skip}, limit={config.limit})")
    return items


def ask(teacher_spec: str, requests: list, config: EvalSettings) -> tuple[list, dict[str, Any]]:
    """Send requests through the response cache in the teacher's batch size and concurrency; (results, costs)."""
    teacher = build_teacher(parse_teacher_spec(teacher_spec))
    cache = open_cache(config.cache_dir, config.cache_mode)
    cached = CachedTeacher(teacher, cache)
    size = max(1, cached.batch_size)
    chunks = [requests[i : i + size] for i in range(0, len(requests), size)]

    async def main() -> list:
        limit = asyncio.Semaphore(max(1, cached.concurrency))

        async def one(chunk):
            async with limit:
                return await cached.generate(chunk)

        try:
            return [r for part in await asyncio.gather(*(one(c) for c in chunks)) for r in part]
        finally:
            await cached.aclose()

    try:
        results = asyncio.run(main())
    finally:
        cache.close()
    costs = {
        "spec": redact(teacher.spec),
        "requests_sent": teacher.stats.requests_sent,
        "cache_hits": cached.cache_stats.hits,
        "prompt_tokens": teacher.stats.prompt_tokens,
        "completion_tokens": teacher.stats.completion_tokens,
        "errors": sum(isinstance(r, TeacherError) for r in results),
    }
    return results, costs


def teacher_model_dir(spec: str) -> Path | None:
    """The local HF directory of a teacher, when it has one (its NLL is then the floor)."""
    config = parse_teacher_spec(spec)
    if config.backend == "openai":
        return None
    if config.model == "embedded":
        return resolve_model("embedded")
    path = Path(config.model).expanduser()
    return path if (path / "config.json").is_file() else None


def model_names(specs: list[str]) -> list[str]:
    """Short distinct names for the table: the directory name, numbered when two collide."""
    names = []
    for spec in specs:
        base = "embedded" if spec == "embedded" else (Path(spec).name or spec)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def evaluate(config: EvalSettings) -> dict[str, Any]:
    """Run the evaluation, write eval.json, report.md and the plots; returns what eval.json holds."""
    if not config.students:
        raise ConfigError("students: give at least one student model directory")
    checker = get_checker(config.checker)
    # The "before" student is evaluated like the others (once, even when it is also listed as a student).
    specs = list(dict.fromkeys(([config.before] if config.before else []) + list(config.students)))
    paths = [resolve_model(s, config.trust_remote_code) for s in specs]  # fail on a bad path before any teacher call
    device, dtype, _ = pick_device(config)  # and on a missing GPU
    check_output_dir(config.output_dir, "--output-dir")  # and where the results cannot go
    names = model_names(specs)
    items = load_items(config)
    notes: list[str] = []
    seconds: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        seconds[name] = round(now - clock, 2)
        clock = now

    # 1. The teacher's greedy answers, cached.
    params = SamplingParams(temperature=0.0, max_tokens=config.teacher_max_tokens or config.max_new_tokens)
    requests = [ChatRequest(messages=[Message(**m) for m in it.messages], params=params) for it in items]
    results, teacher_costs = ask(config.teacher, requests, config)
    answered = [i for i, r in enumerate(results) if not isinstance(r, TeacherError)]
    if not answered:
        raise ConfigError(redact(f"the teacher {config.teacher} answered none of the {len(items)} prompts: {getattr(results[0], 'reason', '')}"))
    if len(answered) < len(items):
        notes.append(f"the teacher failed on {len(items) - len(answered)} prompts; they are left out (rerun to retry them)")
    teacher_text = {i: results[i].completions[0].text for i in answered}
    teacher_ended = {i: results[i].completions[0].finish_reason != "length" for i in answered}
    teacher_answer = {i: em.answer_of(teacher_text[i], config.checker, items[i].reference) for i in answered}
    prompts = [items[i].messages for i in answered]
    targets = [(teacher_text[i], teacher_ended[i]) for i in answered]
    lap("teacher")

    def nll_under(path: Path):
        model, tokenizer = em.load_local(path, device, dtype, config.trust_remote_code)
        return model, tokenizer, em.completion_nll(model, tokenizer, prompts, targets, config.batch_size)

    # 2. The teacher's own NLL of its answers: the floor no student goes below (on average).
    floor_dir = teacher_model_dir(config.teacher)
    teacher_nll = None
    if floor_dir is not None:
        model, _, values = nll_under(floor_dir)
        teacher_nll = em.mean_nll(values)
        del model
    else:
        notes.append(f"the teacher {redact(config.teacher)} is not a local model: no NLL floor, no gap closed")
    lap("teacher_nll")

    # 3. Each model answers and scores the teacher's answers.
    models = []
    for spec, name, path in zip(specs, names, paths):
        model, tokenizer, values = nll_under(path)
        texts = em.generate_greedy(model, tokenizer, [it.messages for it in items], config.max_new_tokens, config.batch_size)
        del model
        gc.collect()
        answers = [em.answer_of(t, config.checker, it.reference) for t, it in zip(texts, items)]
        models.append({
            "name": name, "path": str(path), "spec": spec, "role": "before" if spec == config.before else "student",
            "texts": texts, "answers": answers, "nll_values": dict(zip(answered, values)),
        })  # fmt: skip
        lap(f"model:{name}")

    # 4. The judge: student vs teacher, twice with the order swapped.
    judge_costs = None
    if config.judge:
        judge_costs = judge_all(config, items, answered, teacher_text, models)
        if judge_costs["errors"]:
            notes.append(f"the judge failed on {judge_costs['errors']} requests; those pairs count as ties (rerun to retry them)")
        lap("judge")

    summary = em.summarize(items, answered, teacher_answer, teacher_nll, models, checker)
    teacher_row = {
        "name": "teacher", **teacher_costs,
        "accuracy": em.rate([em.same(checker, teacher_answer[i], items[i].reference) for i in answered if items[i].reference]),
        "answered": em.rate([teacher_answer[i] is not None for i in answered]),
        **(teacher_nll or {"nll": None, "nll_per_byte": None, "nll_tokens": 0}),
    }  # fmt: skip
    result = {
        "config": shown_config(config),
        "prompts": len(items),
        "teacher": teacher_row,
        "judge": judge_costs,
        "models": summary,
        "notes": notes,
        "seconds": seconds,
        "items": [em.item_record(i, it, teacher_text, teacher_answer, models) for i, it in enumerate(items)],
    }
    config.output_dir.mkdir(parents=True, exist_ok=True)
    (config.output_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_report(result, config.output_dir)
    return result


def shown_config(config: EvalSettings) -> dict[str, Any]:
    """The settings as eval.json records them: teacher and judge specs (URLs) without their credentials."""
    shown = config.model_dump(mode="json")
    for key in ("teacher", "judge"):
        if shown[key]:
            shown[key] = redact(shown[key])
    return shown


def judge_all(config: EvalSettings, items: list[Item], answered: list[int], teacher_text: dict, models: list[dict]) -> dict[str, Any]:
    """Ask the judge about every (student, prompt) twice, student first then teacher first; verdicts go into `models`."""
    params = SamplingParams(temperature=0.0, max_tokens=config.judge_max_tokens)
    requests, owners = [], []
    for m in models:
        for i in answered:
            for a, b in ((m["texts"][i], teacher_text[i]), (teacher_text[i], m["texts"][i])):
                content = em.JUDGE_PROMPT.format(question=items[i].question, a=a, b=b)
                requests.append(ChatRequest(messages=[Message(role="user", content=content)], params=params))
            owners.append((m, i))
    results, costs = ask(config.judge, requests, config)
    replies = [None if isinstance(r, TeacherError) else r.completions[0].text for r in results]
    for k, (m, i) in enumerate(owners):
        first, second = replies[2 * k], replies[2 * k + 1]
        verdicts = (em.judge_verdict(first) if first else None, em.judge_verdict(second) if second else None)
        m.setdefault("judge", {})[i] = {"outcome": em.combine_verdicts(*verdicts), "replies": [first, second]}
    return costs
