"""YAML from users (recipes, configs, teacher files, taxonomies) read with limits, so a small file cannot explode.

`yaml.safe_load` runs no code, but an alias bomb ("billion laughs": nine aliases of nine
aliases of …) is a few hundred bytes whose expanded form has billions of nodes; PyYAML
shares the aliased objects, so loading is quick and the blow-up comes later, in whatever
walks the data (validation, fingerprints, printing). An alias that refers to itself makes
a structure without end, and deep nesting exhausts the parser's recursion. Each is
refused here, with the file named, before anything else sees the data; ordinary anchors
and aliases (a shared block of settings) still work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from synth.errors import ConfigError

#: The most nodes a document may have once every alias is expanded; real configs have hundreds.
MAX_NODES = 100_000
#: The deepest nesting a document may have.
MAX_DEPTH = 100


class YamlLimitError(ConfigError):
    """A YAML document over a limit (alias bomb, recursive alias, deep nesting, giant number)."""


def _expanded_size(root: yaml.Node, where: str) -> int:
    """Nodes in the document with aliases expanded; refuses cycles and documents over the limits.

    Iterative, and memoized per node object: a shared (aliased) node is measured once,
    however often it is used, so measuring a bomb costs as little as reading it.
    """
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            below = [measured[id(c)] for c in _children(node)]
            size, height = 1 + sum(s for s, _ in below), 1 + max(h for _, h in below)
            line = node.start_mark.line + 1
            if size > MAX_NODES:
                raise YamlLimitError(f"{where}: refused: more than {MAX_NODES:,} values once its aliases are expanded "
                                     f"(line {line}; an alias bomb?)")  # fmt: skip
            if height > MAX_DEPTH:
                raise YamlLimitError(f"{where}: refused: nested deeper than {MAX_DEPTH} levels (line {line})")
            measured[key] = size, height
            continue
        if key in measured:
            continue
        if key in on_path:
            raise YamlLimitError(f"{where}: refused: an alias refers to itself (line {node.start_mark.line + 1}): the data would never end")
        children = _children(node)
        if not children:
            measured[key] = 1, 1
            continue
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children)
    return measured[id(root)][0]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load(text: str, path: str | Path) -> Any:
    """Parse one YAML document like `yaml.safe_load`, refusing bombs with a YamlLimitError naming `path`.

    A syntax error is still a `yaml.YAMLError`, so callers keep their own message for it.
    """
    where = str(path)
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlLimitError(f"{where}: refused: nested deeper than {MAX_DEPTH} levels") from None
        if node is None:
            return None
        _expanded_size(node, where)
        try:
            return loader.construct_document(node)
        except ValueError as exc:
            # Python refuses to turn a number of over 4,300 digits into an int (a denial-of-service guard).
            raise YamlLimitError(f"{where}: refused: {exc}".split("; use sys.")[0]) from None
    finally:
        loader.dispose()
