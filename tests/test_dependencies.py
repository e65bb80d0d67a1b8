"""Every package the library imports at run time is a declared runtime dependency (a runtime-only
install, without [dev], runs every command), the optional ones are imported only where used, and
tinyrecipe's own imports point down the layers of docs/design.md."""

import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.fast  # make test-fast

# the [gpu] extra, imported lazily: flash_attn (fallen back from), torchao (model.speed.float8 only,
# one line without it); and FlashAttention-3's flash_attn_interface, built from
# flash-attention's hopper/ (no package index has it), fallen back from; all tested
OPTIONAL = {"flash_attn", "flash_attn_interface", "torchao"}


def declared_runtime() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def imported_top_level() -> set[str]:
    names = set()
    for path in (ROOT / "src/tinyrecipe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"tinyrecipe", "__future__"}


def test_runtime_imports_are_declared_dependencies():
    providers = packages_distributions()
    declared = declared_runtime()
    missing = {}
    for name in sorted(imported_top_level() - OPTIONAL):
        dists = {d.lower().replace("_", "-") for d in providers.get(name, [name])}
        if not dists & declared:
            missing[name] = sorted(dists)
    assert not missing, (
        f"imported by src/ but not runtime dependencies in pyproject.toml: {missing}"
    )


def design_layers() -> dict[str, int]:
    """tinyrecipe.<package or module> -> its layer, from the table in docs/design.md."""
    layers = {}
    for line in (ROOT / "docs/design.md").read_text().splitlines():
        match = re.match(r"\| (\d) \| (.+?) \|", line)
        if match:
            for name in re.findall(r"`tinyrecipe\.(\w+)`", match.group(2)):
                layers[name] = int(match.group(1))
    return layers


def test_imports_point_down_the_layers_of_the_design():
    """No module imports one of a higher layer of docs/design.md (lazy imports included), and
    every package and top-level module is in the table."""
    layers = design_layers()
    src = ROOT / "src/tinyrecipe"
    tops = {p.stem for p in src.iterdir() if p.suffix == ".py" and p.stem != "__init__"}
    tops |= {p.name for p in src.iterdir() if (p / "__init__.py").is_file()}
    assert tops <= set(layers), f"not in docs/design.md's layers: {sorted(tops - set(layers))}"
    upward = []
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[0] == "__init__":
            continue
        mine = layers[parts[0]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
                if node.module == "tinyrecipe":
                    targets = [f"tinyrecipe.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                name = target.split(".")
                if name[0] == "tinyrecipe" and len(name) > 1 and layers.get(name[1], 0) > mine:
                    upward.append(f"{'/'.join(parts)}.py:{node.lineno} imports {target}")
    assert not upward, upward
