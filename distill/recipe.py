"""Recipes: an ordered list of `distill` commands whose outputs feed each other by name.

A stage is `{name, command, ...settings}`; its settings are the command's flags with
underscores (`max_steps: 20` is `--max-steps 20`), so a recipe maps one-to-one onto
the CLI and its configs. A stage is checked and run by the same two functions its
command runs on its parsed flags (the command module's RUNNABLE: `settings_from` and
`execute`), in this process, with no command line in between. `@name` is the output of
stage `name`. Each stage is fingerprinted (its settings, the content of its inputs, the
code of its command);
a rerun skips stages whose fingerprint is unchanged and resumes an interrupted one.
What each stage has done and made is kept in its state file (`distill/recipe_state.py`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distill import code_fingerprint
from distill.cli import command_modules
from distill.commands.common import SWITCHES, Runnable
from distill.content_hash import NOT_INPUTS, content_hash, file_digest, named_inputs
from synth import safe_yaml
from synth.errors import ConfigError
from synth.generators.raw import RawGenerator
from synth.pipelines import curate, evol, feedback, label, self_instruct, self_knowledge
from trainers import METHODS

OUTPUT_KEYS = ("output", "output_dir", "out")
TOP_LEVEL = {"name", "description", "teacher", "vars", "work_dir", "stages"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# `@name`, or `hf:@name` where a flag takes a teacher spec (a stage's model served as a teacher).
_REF = re.compile(r"^(hf:)?@(.+)$")
# A stage name is also its state file's name: no path separators, no leading dot.
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SCALARS = (str, int, float, bool)


@dataclass
class Stage:
    """One step of a recipe, its command line and where its output goes."""

    name: str
    command: list[str]
    settings: dict[str, Any]
    argv: list[str]
    output: Path | None
    depends: list[str]
    fingerprint: str = ""


@dataclass
class Recipe:
    """A loaded, validated recipe."""

    path: Path
    name: str
    work_dir: Path
    stages: list[Stage]

    def state_path(self, stage: Stage) -> Path:
        """Where the stage's fingerprint and status are kept."""
        return self.work_dir / ".recipe" / f"{stage.name}.json"


def _apply_overrides(stages: list, overrides: dict[str, dict[str, Any]], path: Path) -> list:
    """The stage list with `--set` values put in; naming a stage the recipe lacks is an error."""
    names = [str(e.get("name")) for e in stages if isinstance(e, dict)]
    for stage in overrides:
        if stage not in names:
            raise ConfigError(f"{path}: --set {stage}.…: no stage '{stage}' (stages: {', '.join(names)})")
    return [{**e, **overrides.get(str(e.get("name")), {})} if isinstance(e, dict) else e for e in stages]


def parse_assignments(items: list[str], flag: str, dotted: bool) -> dict:
    """`NAME=VALUE` (or `STAGE.KEY=VALUE` when dotted) strings as a dict; values are read as YAML scalars."""
    out: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or (dotted and "." not in name):
            shape = "STAGE.KEY=VALUE" if dotted else "NAME=VALUE"
            raise ConfigError(f"{flag} {item!r}: expected {shape}")
        if dotted:
            stage, key = name.split(".", 1)
            try:
                out.setdefault(stage, {})[key] = safe_yaml.load(value, f"{flag} {name}") if value else ""
            except yaml.YAMLError as exc:
                raise ConfigError(f"{flag} {item!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
        else:
            out[name] = value
    return out


def expand_vars(text: str, variables: dict[str, str], where: Path) -> str:
    """Replace ${VAR} from the recipe's vars, then the environment; an unknown one is an error."""

    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key in variables:
            return str(variables[key])
        if key in os.environ:
            return os.environ[key]
        raise ConfigError(f"{where}: ${{{key}}} is not set (not in the recipe's vars nor the environment)")

    return _VAR.sub(sub, text)


def load_recipe(path: str | Path, variables: dict[str, str] | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Recipe:
    """Read, expand and validate a recipe: every stage's keys are checked as its command checks its flags.

    `variables` replace the recipe's vars (`--var NAME=VALUE`); `overrides` replace or add stage
    keys (`--set STAGE.KEY=VALUE`), checked like the recipe's own keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    text = _read_text(path)
    raw = _yaml(text, path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with a 'stages' list")
    given = {k: expand_vars(v, {}, path) for k, v in _vars(raw.get("vars"), path).items()}
    data = _expand_all(raw, {**given, **(variables or {})}, path)
    for key in ("name", "work_dir"):
        if data.get(key) is not None and not isinstance(data[key], _SCALARS):
            raise ConfigError(f"{path}: key '{key}': expected a string, got {_kind(data[key])}")
    unknown = set(data) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{sorted(unknown)[0]}' (known: {', '.join(sorted(TOP_LEVEL))})")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    stages_raw = _apply_overrides(stages_raw, overrides or {}, path)
    name = str(data.get("name") or path.stem)
    work_dir = Path(data.get("work_dir") or f"out/{name}")
    teacher_arg = _teacher_arg(data.get("teacher"), work_dir, path)

    stages: list[Stage] = []
    outputs: dict[str, Path | None] = {}
    written: dict[str, tuple[list[str], str | None]] = {}
    for i, entry in enumerate(stages_raw):
        if not isinstance(entry, dict) or "name" not in entry or "command" not in entry:
            raise ConfigError(f"{path}: stage {i + 1} needs a 'name' and a 'command'")
        stage_name, command = str(entry["name"]), entry["command"]
        if not isinstance(entry["name"], (str, int)) or not _STAGE_NAME.match(stage_name):
            raise ConfigError(f"{path}: stage {i + 1}: 'name' {entry['name']!r}: use letters, digits, '-', '_' and '.' (it names the stage's state file)")
        if not isinstance(command, str) or not command.split():
            raise ConfigError(f"{path}: stage '{stage_name}': key 'command': expected a command such as 'generate' or 'train sft', got {_kind(command)}")
        command = command.split()
        if stage_name in outputs:
            raise ConfigError(f"{path}: two stages are named '{stage_name}'")
        settings = {k: v for k, v in entry.items() if k not in ("name", "command")}
        for key, value in settings.items():
            if not _setting_ok(value):
                raise ConfigError(f"{path}: stage '{stage_name}': key '{key}': expected a string, number, true/false or a list of them, got {_kind(value)}")
        runnable = _runnable(command, stage_name, path)
        if "teacher" in runnable.keys and "teacher" not in settings and teacher_arg is not None:
            settings["teacher"] = teacher_arg
        depends = sorted({m.group(2) for v in settings.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str) and (m := _REF.match(r))})
        check_kinds(stage_name, command, settings, written, path)
        written[stage_name] = (command, output_kind(command, settings))
        settings = {k: _resolve_refs(v, outputs, stage_name, path) for k, v in settings.items()}
        for key in settings:
            if key not in runnable.keys:
                raise ConfigError(f"{path}: stage '{stage_name}' ({' '.join(command)}): unknown key '{key}'")
        try:
            runnable.settings_from(flag_values(settings))  # checked now, built again when the stage runs
        except ConfigError as exc:
            why = re.sub(r"--([\w-]+):", lambda m: f"key '{m.group(1).replace('-', '_')}':", str(exc))
            raise ConfigError(f"{path}: stage '{stage_name}': {why}") from None
        argv = [*command, *(arg for key, value in settings.items() for arg in _to_argv(runnable, key, value))]
        output = next((Path(str(settings[k])) for k in OUTPUT_KEYS if k in settings), None)
        outputs[stage_name] = output
        stages.append(Stage(stage_name, command, settings, argv, output, depends))
    return Recipe(path=path, name=name, work_dir=work_dir, stages=stages)


def runnables() -> dict[str, Runnable]:
    """Every command a recipe stage can run, by its words ('label', 'train sft'): each command module's RUNNABLE."""
    found: dict[str, Runnable] = {}
    for module in command_modules():
        found.update(getattr(importlib.import_module(f"distill.commands.{module}"), "RUNNABLE", {}))
    return found


def stage_runnable(stage: Stage) -> Runnable:
    """The command a stage runs."""
    return runnables()[" ".join(stage.command)]


def flag_values(settings: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings as a command line would give them: text (read as the flag's type), true/false, lists of text."""

    def text(value: Any) -> Any:
        return value if isinstance(value, bool) else str(value)

    return {key: [text(v) for v in value] if isinstance(value, list) else text(value) for key, value in settings.items()}


def _runnable(command: list[str], stage: str, path: Path) -> Runnable:
    """The command a stage names; an unknown one, or a group without its subcommand, is an error naming the stage."""
    words = " ".join(command)
    known = runnables()
    if words in known:
        return known[words]
    if any(name.startswith(words + " ") for name in known):
        raise ConfigError(f"{path}: stage '{stage}': 'distill {words}' needs a subcommand")
    raise ConfigError(f"{path}: stage '{stage}': unknown command 'distill {words}'")


def _expand_all(value: Any, variables: dict[str, str], where: Path) -> Any:
    """The parsed recipe with ${VAR} replaced in every string (see `expand_vars`)."""
    if isinstance(value, str):
        return expand_vars(value, variables, where)
    if isinstance(value, list):
        return [_expand_all(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand_all(v, variables, where) for k, v in value.items()}
    return value


#: The record kind each synthesis command writes, given its stage's settings (its pipeline's `output_kind`).
_WRITERS = {
    ("label",): label.output_kind,
    ("expand", "self-instruct"): self_instruct.output_kind,
    ("expand", "evol"): evol.output_kind,
    ("curate",): curate.output_kind,
    ("feedback",): feedback.output_kind,
    ("self",): self_knowledge.output_kind,
    ("generate",): lambda settings: RawGenerator.emits,
}
_KIND_NOUNS = {"sft": "SFT examples", "preference": "preference pairs", "critique": "critiques"}


def output_kind(command: list[str], settings: dict[str, Any]) -> str | None:
    """The record kind a stage's output holds, or None when it is not records or not known before it runs."""
    writer = _WRITERS.get(tuple(command))
    return writer(settings) if writer else None


def check_kinds(stage: str, command: list[str], settings: dict[str, Any], written: dict[str, tuple[list[str], str | None]], path: Path) -> None:
    """A `train METHOD` stage whose data is `@name` must read the kind of record stage `name` writes."""
    data = settings.get("data")
    match = _REF.match(data) if command[0] == "train" and len(command) == 2 and isinstance(data, str) else None
    method = METHODS.get(command[-1])
    if match is None or method is None or not method.reads or match.group(2) not in written:
        return
    producer = match.group(2)
    producer_command, kind = written[producer]
    if kind is not None and kind not in method.reads:
        reads = " or ".join(_KIND_NOUNS.get(k, k) for k in method.reads)
        raise ConfigError(
            f"{path}: stage '{stage}' ({' '.join(command)}) reads {reads}, "
            f"but stage '{producer}' ({' '.join(producer_command)}) writes {_KIND_NOUNS.get(kind, kind)}"
        )


def _read_text(path: Path) -> str:
    """The recipe's text; bytes that are not UTF-8 are named by line and byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the recipe as UTF-8") from None


def _vars(block: Any, path: Path) -> dict[str, str]:
    """The recipe's `vars:` as NAME → text; anything but a mapping of scalars is an error naming the key."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: key 'vars': expected a mapping of NAME: value, got {_kind(block)}")
    for key, value in block.items():
        if not isinstance(value, _SCALARS):
            raise ConfigError(f"{path}: key 'vars.{key}': expected a string or number, got {_kind(value)}")
    return {str(k): str(v) for k, v in block.items()}


def _setting_ok(value: Any) -> bool:
    """A stage setting is a scalar or a list of scalars: what a flag can take."""
    if isinstance(value, list):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def _kind(value: Any) -> str:
    """How a YAML value reads, for messages: 'a list', 'a mapping', 'nothing'."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {value!r}"


def _yaml(text: str, path: Path) -> Any:
    """Parse YAML; a syntax error names file:line."""
    try:
        return safe_yaml.load(text, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None


def _teacher_arg(block: Any, work_dir: Path, path: Path) -> str | None:
    """The recipe's teacher as a --teacher value: a spec string, or a mapping written to a YAML file.

    Stage command lines are printed and saved, and the mapping is saved as `.recipe/teacher.yaml`:
    a base URL's credentials (`user:pass@`, `?api_key=`) are masked in both, and the real URL is
    kept in this process's memory only (`synth.redact.remember`). The stages run in this process,
    and the openai backend puts the credentials back when it connects; the saved file alone,
    read by another process, fails with a message instead of sending the mask.
    """
    from synth.redact import redact, remember
    from synth.teachers.config import TeacherSettings, parse_teacher_spec

    if block is None:
        return None
    if isinstance(block, str):
        config = parse_teacher_spec(block) if block.startswith("openai:") else None
        if config is None or not config.base_url:
            return block
        return f"openai:{config.model}@{remember(config.base_url)}"
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: 'teacher' is a spec string or a mapping of teacher settings")
    try:
        TeacherSettings.model_validate(block)
    except Exception as exc:  # pydantic's ValidationError, named for the user
        from synth.errors import describe_validation_error

        raise ConfigError(redact(f"{path}: teacher: {describe_validation_error(exc, 'key')}")) from None
    saved = dict(block)
    if saved.get("base_url"):
        saved["base_url"] = remember(saved["base_url"])
    if isinstance(saved.get("base_urls"), list):
        saved["base_urls"] = [remember(url) for url in saved["base_urls"]]
    if saved.get("api_key_env"):  # a key pasted where its variable's name belongs
        saved["api_key_env"] = redact(saved["api_key_env"])
    target = work_dir / ".recipe" / "teacher.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(saved, sort_keys=True), encoding="utf-8")
    return str(target)


def _resolve_refs(value: Any, outputs: dict[str, Path | None], stage: str, path: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_refs(v, outputs, stage, path) for v in value]
    match = _REF.match(value) if isinstance(value, str) else None
    if match:
        prefix, ref = match.groups()
        if ref not in outputs:
            raise ConfigError(f"{path}: stage '{stage}': '@{ref}' names no earlier stage")
        if outputs[ref] is None:
            raise ConfigError(f"{path}: stage '{stage}': stage '{ref}' has no output to use")
        return (prefix or "") + str(outputs[ref])
    return value


def _to_argv(runnable: Runnable, key: str, value: Any) -> list[str]:
    """One setting as the command line that would give it, for printing and the state file."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        if key in SWITCHES:
            return [flag] if value else []
        return [flag if value else "--no-" + flag[2:]]
    values = value if isinstance(value, list) else [value]
    if key in runnable.repeated:
        return [x for v in values for x in (flag, str(v))]
    return [flag, *map(str, values)]


def fingerprint(stage: Stage, root: Path | None = None) -> str:
    """Hash of the stage's arguments, the content of the files and models it reads and the code it runs.

    The code is found by walking the imports of the stage's command (`distill.code_fingerprint`);
    `root` is the checkout holding it (default: this one).
    """
    h = hashlib.sha256(json.dumps([stage.command, flag_values(stage.settings)], sort_keys=True).encode())
    for key, value in sorted(stage.settings.items()):
        if key in NOT_INPUTS:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                for path in named_inputs(item):
                    h.update(key.encode() + content_hash(path).encode())
    root = Path(root or code_fingerprint.ROOT)
    for source in code_fingerprint.stage_code_files(stage.command, stage.settings, root):
        h.update(f"{source.relative_to(root).as_posix()}\0{file_digest(source)}\n".encode())
    return h.hexdigest()[:24]
