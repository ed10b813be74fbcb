"""Shared loading pieces of the family adapters: one-line errors instead of tracebacks or silent empty tokenizers,
and an import graph without cycles (the hub helpers live in ``apexctl/hub.py``, which imports no model code)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from apexctl.errors import BadInput
from apexctl.hub import load_component, load_tokenizer

PACKAGE = Path(__file__).resolve().parent.parent / "apexctl"


class _Tok:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def test_empty_tokenizer_is_refused_with_one_line():
    # transformers 5 offline returns an empty tokenizer for an uncached hub id instead of raising
    with pytest.raises(BadInput, match=r"^org/model: tokenizer_2/ loaded empty \(3 tokens\): not a local folder"):
        load_tokenizer("org/model", "tokenizer_2", lambda: _Tok(3), min_tokens=10)
    assert len(load_tokenizer("org/model", "tokenizer", lambda: _Tok(11), min_tokens=10)) == 11


def test_component_load_failure_is_one_line():
    def fail():
        raise OSError("no file named config.json\nsecond line")

    with pytest.raises(BadInput, match=r"^/m: cannot load vae/ \(OSError: no file named config.json\)$"):
        load_component("/m", "vae", fail)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``module → apexctl modules it imports`` from every import statement (function-level ones included).

    Importing ``a.b.c`` also runs ``a.b``'s ``__init__``, so an edge goes to each parent package too, except the
    importer's own ancestors (a package's submodules importing their siblings is no cycle).
    """
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in filter(None, map(known, names)):
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # not the top package: every module is inside it
                    dep = ".".join(parts[:i])
                    if dep in modules and dep != module and not module.startswith(dep + "."):
                        edges.add(dep)
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of ``graph`` that import each other in a circle: its strongly connected components of more than
    one module (Tarjan), each sorted."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(m: str) -> None:
        order[m] = low[m] = len(order)
        stack.append(m)
        for dep in graph.get(m, ()):
            if dep not in order:
                visit(dep)
                low[m] = min(low[m], low[dep])
            elif dep in stack:
                low[m] = min(low[m], order[dep])
        if low[m] == order[m]:
            component = []
            while not component or component[-1] != m:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for m in sorted(graph):
        if m not in order:
            visit(m)
    return found


def test_import_cycles_are_seen_through_a_parent_package():
    # lora → models.loading runs models/__init__, which imports base, which imports lora
    graph = {"p.lora": {"p.models.loading", "p.models"}, "p.models": {"p.models.base"}, "p.models.base": {"p.lora"}}
    assert import_cycles(graph) == [["p.lora", "p.models", "p.models.base"]]
    assert import_cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_lora_hub_and_models_are_in_no_import_cycle():
    """The LoRA code reaches the hub helpers without importing ``apexctl.models`` (whose base imports it)."""
    graph = import_graph()
    assert "apexctl.hub" in graph["apexctl.lora"] and "apexctl.lora" in graph["apexctl.models.base"]
    ours = [
        c
        for c in import_cycles(graph)
        if any(m in ("apexctl.lora", "apexctl.hub") or m.startswith("apexctl.models") for m in c)
    ]
    assert ours == []
