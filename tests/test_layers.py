"""The layers of the house, in the order of a round: training <- export <- hw <- fedfinn; client_pynq alone.

Every import of every module (at module top and inside functions, read with ``ast``) must point at
its own package or at a layer below it. ``client_pynq/`` (what runs on a board) imports nothing of
the project; ``export/`` imports ``training.models`` only; ``hw/`` imports ``export`` and
``training.models``, never ``client_pynq``; ``fedfinn/`` (host-side wiring and the CLI) may import
everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("training", "export", "hw", "client_pynq", "fedfinn")

#: package -> what it may import of the project (its own package is always allowed)
ALLOWED = {
    "training": (),
    "export": ("training.models",),
    "hw": ("export", "training.models"),
    "client_pynq": (),
    "fedfinn": ("training", "export", "hw", "client_pynq"),
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module in PACKAGES else [node.module]
            out += [(node.lineno, n) for n in names]
    return out


def violations(path: Path) -> list[str]:
    own = path.relative_to(ROOT).parts[0]
    bad = []
    for line, name in imports_of(path):
        top = name.split(".")[0]
        if top not in PACKAGES or top == own:
            continue
        if not any(name == a or name.startswith(a + ".") for a in ALLOWED[own]):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_import_follows_the_layer_order():
    assert len(modules()) > 40
    bad = [v for p in modules() for v in violations(p)]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


@pytest.mark.parametrize("source,expected", [
    ("from training.data import normalize\n", "client_pynq/x.py:1 imports training.data"),
    ("def f():\n    import hw.emulate\n", "client_pynq/x.py:2 imports hw.emulate"),
    ("from fedfinn import boards\n", "client_pynq/x.py:1 imports fedfinn.boards"),
])
def test_the_check_catches_a_board_module_importing_the_project(tmp_path, monkeypatch, source, expected):
    fake = tmp_path / "client_pynq" / "x.py"
    fake.parent.mkdir()
    fake.write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations(fake) == [expected]


def test_the_check_catches_training_importing_upwards_and_export_importing_training(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "training").mkdir()
    (tmp_path / "export").mkdir()
    up = tmp_path / "training" / "server_app.py"
    up.write_text("def hook():\n    from export import export_round\n")
    side = tmp_path / "export" / "run.py"
    side.write_text("from training.models import build_model\nfrom training.compress import load_values\n")
    assert violations(up) == ["training/server_app.py:2 imports export.export_round"]
    assert violations(side) == ["export/run.py:2 imports training.compress"]
