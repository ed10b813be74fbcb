"""The house's shape (docs/design.md §2): ``engine/`` is math only, and no module grows past 500 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "apexctl"


def _top_imports(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names (function-level and TYPE_CHECKING ones included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the engine by construction
                found.add("apexctl.engine")
            elif node.module:
                found.add(node.module)
    return found


def _allowed(module: str) -> bool:
    root = module.split(".")[0]
    return (
        module == "apexctl.engine"
        or module.startswith("apexctl.engine.")
        or root in ("torch", "__future__")
        or root in sys.stdlib_module_names
    )


def test_engine_imports_only_torch_the_standard_library_and_itself():
    files = sorted((PACKAGE / "engine").glob("*.py"))
    assert len(files) >= 8  # cond, denoiser, config, flow, shift, objectives, sampler, ema
    bad = {p.name: sorted(m for m in _top_imports(p) if not _allowed(m)) for p in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_import_rule_is_not_vacuous(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import json\nimport torch.nn\nfrom apexctl.models.base import Backbone\nimport numpy\n")
    assert sorted(m for m in _top_imports(probe) if not _allowed(m)) == ["apexctl.models.base", "numpy"]


def test_no_module_over_500_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {k: n for k, n in sizes.items() if n > 500} == {}


def test_the_engine_test_double_is_only_the_denoiser_protocol():
    """The objectives' tests run on a double with the four Denoiser methods: the engine needs nothing else."""
    from conftest import LinearDenoiser

    from apexctl.engine.denoiser import Denoiser
    from apexctl.models.base import Backbone

    double = LinearDenoiser()
    assert isinstance(double, Denoiser) and not isinstance(double, Backbone)
    public = {n for n in vars(LinearDenoiser) if not n.startswith("_")}
    assert public == {"velocity", "condition_site", "guidance_combine", "teacher_sigmas"}
