"""Every package the library imports at run time is a declared runtime dependency (a runtime-only
install, without [dev], runs every command), and the optional ones are imported only where used."""

import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.fast  # make test-fast

# the [gpu] extra, imported lazily: flash_attn (fallen back from), torchao (model.float8 only,
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
