"""The layer order stated in docs/architecture.md holds: every import in ``src/viscpm`` (module
level or inside a function) points to a lower layer or stays inside its own package."""
from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "viscpm"
ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"


def stated_layers() -> dict[str, int]:
    """``{unit: layer}`` from the ``## Layers`` block of docs/architecture.md."""
    section = ARCHITECTURE.read_text(encoding="utf-8").split("## Layers", 1)[1]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    layers = {}
    for line in block.strip().splitlines():
        number, *units = line.split()
        layers.update({unit: int(number) for unit in units})
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute ``viscpm…`` name) of every import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # ``from . import x``: x is a module of the package or a name in its __init__
            found += ([(node.lineno, f"{target}.{a.name}") for a in node.names] if not node.module
                      else [(node.lineno, target)])
    return [(line, target) for line, target in found if target == "viscpm" or target.startswith("viscpm.")]


def unit(module: str) -> str:
    """The layered unit of a module: its top-level module or package under viscpm, or the package itself."""
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and not _is_module(parts[1])):
        return "viscpm"  # the package __init__ (or a name defined in it, like __version__)
    return parts[1]


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def test_every_module_has_a_stated_layer():
    layers = stated_layers()
    units = {unit(module_name(path)) for path in PACKAGE.rglob("*.py")}
    missing = sorted(units - set(layers))
    assert not missing, f"give these modules a layer in the '## Layers' block of {ARCHITECTURE}: {missing}"


def test_no_module_imports_a_higher_layer():
    layers = stated_layers()
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = unit(module_name(path))
        for line, target in imported_modules(path):
            dest = unit(target)
            if dest != source and layers.get(dest, -1) >= layers.get(source, -1):
                upward.append(f"{path.relative_to(REPO_ROOT)}:{line} ({source}, layer {layers.get(source)}) imports "
                              f"{target} ({dest}, layer {layers.get(dest)})")
    assert not upward, "imports that do not point to a lower layer:\n" + "\n".join(upward)


def test_the_check_reads_relative_absolute_and_lazy_imports():
    """So that an empty list of upward imports means something."""
    assert "viscpm.checkpoints" in {t for _, t in imported_modules(PACKAGE / "rerank" / "clip.py")}  # from ..x import
    in_init = {t for _, t in imported_modules(PACKAGE / "__init__.py")}
    assert "viscpm.pipelines.paint" in in_init  # inside a function
    assert unit("viscpm.models.cpmbee") == "models" and unit("viscpm.cli") == "cli"
    assert unit("viscpm") == "viscpm" and unit("viscpm.__version__") == "viscpm"
