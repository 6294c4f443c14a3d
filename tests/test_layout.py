"""The package's layers import only downwards: ops < core, datasets < flatness < generalization < apps."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "relflat_ext"
LAYERS = {"ops": 0, "core": 1, "datasets": 1, "flatness": 2, "generalization": 3, "apps": 4}


def _layer(parts):
    return LAYERS.get(parts[0]) if parts else None


def _imported_subpackages(path: pathlib.Path):
    """The top-level subpackages of relflat_ext that a module imports."""
    module_parts = path.relative_to(PACKAGE).with_suffix("").parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(module_parts[:-1])[:len(module_parts) - node.level]
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [alias.name] for alias in node.names] if not node.module else [target]
            elif node.module and node.module.startswith("relflat_ext"):
                names = [node.module.split(".")[1:]]
            else:
                continue
            for parts in names:
                if parts:
                    yield parts[0]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("relflat_ext."):
                    yield alias.name.split(".")[1]


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_downwards(path):
    own = path.relative_to(PACKAGE).parts[0]
    for sub in _imported_subpackages(path):
        if sub in LAYERS and sub != own:
            assert LAYERS[sub] < LAYERS[own], f"{path.relative_to(PACKAGE)} (layer {own}) imports {sub}"


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(LAYERS)
