"""The code a recipe stage runs, found by walking imports rather than listed by hand.

A stage runs its command's module (`distill/commands/*.py`, found by the name it registers) and,
for `train METHOD`, that method's trainer module (named in trainers/__init__.py's table). Its code is every project module
those import, at any depth, at module or function level, and the prompt templates those modules
load. A fix anywhere in that code reruns the stage; a change elsewhere leaves it done.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

#: The checkout (or site-packages) holding the project's packages; tests point it at a copy.
ROOT = Path(__file__).resolve().parents[1]
#: The project's own packages: imports of anything else are libraries, not the stage's code.
PACKAGES = ("synth", "trainers", "distill")


def stage_code_files(command: list[str], settings: dict[str, Any] | None = None, root: Path | None = None) -> list[Path]:
    """The modules and prompt templates a stage with this command (and these settings) runs."""
    root = Path(root or ROOT)
    key = tuple(command[:2]) if command[0] == "train" else (command[0],)
    modules, templates = _code_of(key, root)
    named = {t for name in _template_settings(settings or {}) for t in _templates_in(name, root)}
    return [*modules, *sorted(set(templates) | named)]


@cache
def _code_of(command: tuple[str, ...], root: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """The import closure of a command's modules and the templates they load (once per process)."""
    entries = [command_module(command[0], root)]
    if command[0] == "train" and len(command) > 1:
        entries.append(trainer_module(command[1], root))
    modules = import_closure(entries, root)
    templates = {t for name in template_names(_parse(m) for m in modules) for t in _templates_in(name, root)}
    return tuple(sorted(modules)), tuple(sorted(templates))


def command_module(word: str, root: Path) -> Path:
    """The module under distill/commands whose `register(sub)` adds the command `word`."""
    for path in sorted((root / "distill" / "commands").glob("*.py")):
        if word in registered_commands(_parse(path)):
            return path
    raise LookupError(f"no module in {root / 'distill' / 'commands'} registers the command '{word}'")


def registered_commands(tree: ast.Module) -> set[str]:
    """The names a command module's `register(sub)` passes to `sub.add_parser(...)`."""
    names = set()
    for func in tree.body:
        if not isinstance(func, ast.FunctionDef) or func.name != "register" or not func.args.args:
            continue
        sub = func.args.args[0].arg
        for node in ast.walk(func):
            if (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_parser"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == sub
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value)
    return names


def trainer_module(method: str, root: Path) -> Path:
    """The trainer of `distill train METHOD`: the module trainers/__init__.py's table names for it
    (`"sft": Method("trainers.sft", ...)`), or the one declaring `METHOD = "sft"`, or trainers/<method>.py."""
    package = root / "trainers" / "__init__.py"
    for node in ast.walk(_parse(package)) if package.is_file() else ():
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == method:
                    for text in sorted(_texts(value)):
                        module = root.joinpath(*text.split(".")).with_suffix(".py")
                        if text.startswith("trainers.") and module.is_file():
                            return module
    for path in sorted((root / "trainers").glob("*.py")):
        for node in _parse(path).body:
            if (
                isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "METHOD" for t in node.targets)
                and isinstance(node.value, ast.Constant) and node.value.value == method
            ):
                return path
    fallback = root / "trainers" / f"{method}.py"
    if fallback.is_file():
        return fallback
    raise LookupError(f"no trainer module in {root / 'trainers'} for the method {method!r}")


def import_closure(entries: Iterable[Path], root: Path) -> set[Path]:
    """Every project module the entry modules import, transitively, with the packages' __init__ files."""
    todo = [f for e in entries for f in _files_of(_module_name(e, root), root)]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imported_files(path, root)
    return seen


def imported_files(path: Path, root: Path) -> Iterator[Path]:
    """The project files one module imports anywhere in it (top level, functions, relative imports)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _files_of(alias.name, root)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            if base is None:
                continue
            yield from _files_of(base, root)
            for alias in node.names:  # `from pkg import name`: the submodule pkg/name.py when there is one
                if alias.name != "*":
                    yield from _files_of(f"{base}.{alias.name}", root)
        elif _called(node) == "import_module" and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            yield from _files_of(node.args[0].value, root)


def template_names(trees: Iterable[ast.Module]) -> set[str]:
    """Template names the modules may load: the text in their `load_template(...)` name arguments
    (literals, and f-strings' literal parts: f"feedback/{mode}" → "feedback/"); and where some call
    computes the name (`load_template(config.template)`), the defaults of the settings, fields and
    parameters named `*template*` in those modules (`template: str = Field("label/cot")`)."""
    names: set[str] = set()
    defaults: set[str] = set()
    computed = False
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called(node) == "load_template":
                for arg in node.args[:1] + [k.value for k in node.keywords if k.arg == "name"]:
                    names |= _texts(arg)
                    computed = computed or not isinstance(arg, (ast.Constant, ast.JoinedStr))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any("template" in _target_name(t) for t in targets):
                    defaults |= _default_texts(node.value)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                positional = a.posonlyargs + a.args
                pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
                defaults |= {t for arg, default in pairs if default is not None and "template" in arg.arg for t in _default_texts(default)}
    return names | defaults if computed else names


def prompts_dir(root: Path) -> Path:
    """The shipped templates: prompts/ in a checkout, distill/_resources/prompts in a wheel."""
    checkout = root / "prompts"
    return checkout if checkout.is_dir() else root / "distill" / "_resources" / "prompts"


def _templates_in(name: str, root: Path) -> list[Path]:
    """Every template in the folder a name like `feedback/rate` (or the prefix `feedback/`) points into."""
    folder, sep, _ = name.partition("/")
    if not sep or not folder or folder in (".", "..") or name.endswith(".jinja"):
        return []  # a .jinja path is an input file, hashed by its content with the other inputs
    directory = prompts_dir(root) / folder
    return sorted(directory.rglob("*.jinja")) if directory.is_dir() else []


def _template_settings(settings: dict[str, Any]) -> Iterator[str]:
    """Template names a stage's settings give (`template: label/cot`, `answer_template: ...`)."""
    for key, value in settings.items():
        if "template" in key:
            yield from (v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files_of(module: str, root: Path) -> Iterator[Path]:
    """The files importing `module` runs: each package's __init__.py on the way and the module itself."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return
    for i in range(1, len(parts) + 1):
        here = root.joinpath(*parts[:i])
        if (here / "__init__.py").is_file():
            yield here / "__init__.py"
        elif i == len(parts) and here.with_suffix(".py").is_file():
            yield here.with_suffix(".py")
        elif not here.is_dir():
            return


def _absolute(module: str | None, level: int, package: str) -> str | None:
    """The absolute name of `from .module import ...` seen from `package`."""
    if level == 0:
        return module
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else [])) or None


def _called(node: ast.AST) -> str | None:
    """The bare name a call calls: `f(...)` and `x.f(...)` are both 'f'."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _texts(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _default_texts(value: ast.AST) -> set[str]:
    """The text a default gives: `"label/cot"`, or `Field("label/cot", ...)` / `Field(default=...)`."""
    if isinstance(value, ast.Call):
        given = value.args[:1] + [k.value for k in value.keywords if k.arg == "default"]
        return {v.value for v in given if isinstance(v, ast.Constant) and isinstance(v.value, str)}
    return {value.value} if isinstance(value, ast.Constant) and isinstance(value.value, str) else set()


def _target_name(target: ast.AST) -> str:
    return target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else ""


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_bytes(), filename=str(path))
