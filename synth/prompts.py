"""Finds and renders the Jinja templates in prompts/, in a sandbox so seed data cannot run code or exhaust the machine.

Jinja's sandbox stops a template from reaching Python internals, but not from asking for
too much: `{{ "x" * 10**9 }}`, `{{ 10 ** 10 ** 10 }}`, loops inside loops, a string doubled
in a loop. Here every loop iteration counts against a budget, the operators that can
grow a value (`*`, `**`, `+`, `%`, `~`) are checked before or right after they run, and the
output stops at a size no prompt needs. `{% include %}` and its kin are refused when the
template is loaded: a template stands alone. Whatever goes wrong while rendering becomes
one error naming the template (and the input line that set it off).
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment
from jinja2.visitor import NodeTransformer

from synth.errors import ConfigError, InputError
from synth.paths import resource_dir

#: The longest text a template may make, in characters (far beyond any model's context).
MAX_TEXT = 1_000_000
#: Loop iterations one rendering may run, all loops together.
MAX_ITERATIONS = 100_000
#: Statements that read other templates: refused, so a template is all there is to check.
_REFUSED = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from … import", nodes.Extends: "extends"}
_ITER, _CONCAT = "__bbd_iter", "__bbd_concat"


class TemplateLimit(Exception):
    """A rendering went over one of the limits above."""


_iterations: contextvars.ContextVar[list[int]] = contextvars.ContextVar("template_iterations")


def _counted(iterable: Iterable) -> Iterator:
    budget = _iterations.get()
    for item in iterable:
        budget[0] += 1
        if budget[0] > MAX_ITERATIONS:
            raise TemplateLimit(f"loops ran more than {MAX_ITERATIONS:,} times")
        yield item


def _checked(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_TEXT:
        raise TemplateLimit(f"a value of more than {MAX_TEXT:,} characters or items")
    return value


def _concat(*parts: Any) -> str:
    return _checked("".join(map(str, parts)))


def _predicted_size(op: str, left: Any, right: Any) -> float:
    """How big the result of `left op right` would be, before computing it (0 when it cannot grow much)."""
    if op == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                return len(seq) * times
    if op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        return right * math.log10(abs(left))  # digits of the result
    return 0


class _Sandbox(SandboxedEnvironment):
    """The sandbox with the operators that can grow a value checked."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, op: str, left: Any, right: Any) -> Any:
        """Refuse a `*` or `**` whose result would be huge; check the size of every result."""
        if _predicted_size(op, left, right) > MAX_TEXT:
            raise TemplateLimit(f"'{op}' would make a value of more than {MAX_TEXT:,} characters, items or digits")
        return _checked(self.binop_table[op](left, right))

    # Jinja's own parameter names: a template may pass any keyword, `self` and `context` included.
    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:
        """Call as the sandbox does, and check the size of what came back (`"x".center(10**8)`)."""
        return _checked(super().call(__context, __obj, *args, **kwargs))


def _checking(fn: Callable) -> Callable:
    @functools.wraps(fn)  # keeps Jinja's pass_context/pass_environment marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        return _checked(fn(*args, **kwargs))

    return checked


class _Guard(NodeTransformer):
    """Rewrites a parsed template: every loop's iterable counted, every `~` checked."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(_ITER, "load", lineno=node.lineno), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.Name(_CONCAT, "load", lineno=node.lineno), node.nodes, [], None, None, lineno=node.lineno)


_ENV = _Sandbox(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
_ENV.globals.update({_ITER: _counted, _CONCAT: _concat})
# Filters that pad or repeat (center, indent, wordwrap, format, …): their results are checked too.
_ENV.filters = {name: _checking(f) for name, f in _ENV.filters.items()}


@dataclass(frozen=True)
class PromptTemplate:
    """A template's name, source and content hash (the hash goes into provenance and record ids)."""

    name: str
    source: str
    path: Path

    @property
    def hash(self) -> str:
        """Short sha256 of the source: editing a template changes the records it makes."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    @cached_property
    def _compiled(self) -> Template:
        return _ENV.from_string(_Guard().visit(_ENV.parse(self.source)))

    def render(self, where: str = "", **variables: Any) -> str:
        """Fill the template; any failure is one error naming the template and `where` (file:line).

        A missing variable, a runtime error (division by zero, …), a limit reached, or text
        that comes out empty are InputErrors (the input line set them off); something the
        sandbox refuses is a ConfigError (the template's own fault).
        """
        prefix = f"{where}: " if where else ""
        token = _iterations.set([0])
        try:
            text = "".join(_limited(self._compiled.generate(**variables))).strip()
        except UndefinedError as exc:
            raise InputError(f"{prefix}template {self.name}: {exc.message}") from None
        except SecurityError as exc:
            raise ConfigError(f"template {self.name}: refused by the sandbox: {exc}") from None
        except TemplateLimit as exc:
            raise InputError(f"{prefix}template {self.name}: stopped: {exc} (a template may not ask for that much)") from None
        except RecursionError:
            raise InputError(f"{prefix}template {self.name}: stopped: calls nested too deeply (a macro calling itself?)") from None
        except MemoryError:
            raise InputError(f"{prefix}template {self.name}: stopped: out of memory") from None
        except Exception as exc:  # a runtime error of the template's own code: ZeroDivisionError, TypeError, …
            raise InputError(f"{prefix}template {self.name}: {exc or type(exc).__name__}") from None
        finally:
            _iterations.reset(token)
        if not text:
            raise InputError(f"{prefix}template {self.name}: renders empty text; nothing to send")
        return text


def _limited(chunks: Iterable[str]) -> Iterator[str]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > MAX_TEXT:
            raise TemplateLimit(f"more than {MAX_TEXT:,} characters of output")
        yield chunk


def load_template(name: str, lang: str = "en") -> PromptTemplate:
    """Load `method/name` from prompts/ in language `lang` (e.g. label/cot → prompts/label/cot.en.jinja), or a .jinja path."""
    if name.endswith(".jinja"):
        path = Path(name)
    else:
        path = resource_dir("prompts") / f"{name}.{lang}.jinja"
    if not path.is_file():
        available = sorted(
            str(p.relative_to(resource_dir("prompts"))).rsplit(".", 2)[0]
            for p in resource_dir("prompts").rglob(f"*.{lang}.jinja")
        )
        raise ConfigError(f"template {name!r} (language {lang}) not found at {path}; available: {', '.join(available) or 'none'}")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the template: {exc}") from None
    try:
        tree = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from None
    except RecursionError:
        raise ConfigError(f"{path}: template nested too deeply") from None
    for kind, statement in _REFUSED.items():
        found = next(tree.find_all(kind), None)
        if found is not None:
            raise ConfigError(f"{path}:{found.lineno}: {{% {statement} %}} is not supported: a template must stand alone")
    return PromptTemplate(name=name, source=source, path=path)
