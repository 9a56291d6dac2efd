"""Import layering: the library packages never import the runner (``core``) or the command-line layer (``tools``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBRARY = ("model_zoo", "data", "optim", "dl_utils")


def imported_modules(path: Path) -> set[str]:
    """Top-level package names a module imports (absolute imports, anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", LIBRARY)
def test_library_packages_do_not_import_core_or_tools(package: str) -> None:
    offenders = {str(p.relative_to(REPO)): sorted(imported_modules(p) & {"core", "tools"})
                 for p in sorted((REPO / package).rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}


def test_core_does_not_import_tools() -> None:
    offenders = {str(p.relative_to(REPO)): sorted(imported_modules(p) & {"tools"})
                 for p in sorted((REPO / "core").rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_check_sees_an_import() -> None:
    assert imported_modules(REPO / "tools" / "step_sweep.py") >= {"model_zoo", "torch"}


def capability_probes(source: str) -> list[str]:
    """``getattr``/``hasattr`` calls on a model (first argument ``model``, ``self.model``, ``ctx.model``, ...)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and node.args and "model" in ast.unparse(node.args[0]).lower()):
            found.append(ast.unparse(node))
    return found


def test_runners_never_probe_a_model_for_capabilities() -> None:
    # what the evaluation and prediction ask of a model is declared in model_zoo/base.py (TrainableModel,
    # AnomalyModel, MaskThresholdModel), never discovered by getattr/hasattr
    offenders = {str(p.relative_to(REPO)): capability_probes(p.read_text(encoding="utf-8"))
                 for package in ("core", "tools", "dl_utils") for p in sorted((REPO / package).rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}
    assert capability_probes("label = getattr(self.model, 'inference_label', None)\nhasattr(model, 'x')") == [
        "getattr(self.model, 'inference_label', None)", "hasattr(model, 'x')"]


def manifest_writers(source: str) -> list[str]:
    """Calls that write a file while naming the manifest (``MANIFEST``, ``"manifest.json"``) in the same statement."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name in ("write_text", "write_bytes", "dump", "open", "replace", "rename", "write_text_atomic",
                    "write_atomic"):
            text = ast.unparse(node)
            if "manifest" in text.lower():
                found.append(text)
    return found


def test_the_manifest_has_one_writer() -> None:
    # dl_utils/run.py (Run) writes a run's manifest.json; everything else reads it or asks the Run to update it
    # (data/ is not checked: a dataset preparer writes its cache folder's own manifest.json, not a run's)
    offenders = {str(p.relative_to(REPO)): manifest_writers(p.read_text(encoding="utf-8"))
                 for package in ("core", "tools", "dl_utils", "model_zoo", "optim")
                 for p in sorted((REPO / package).rglob("*.py")) if p != REPO / "dl_utils" / "run.py"}
    assert not {k: v for k, v in offenders.items() if v}
    assert manifest_writers("(run_dir / MANIFEST).write_text(json.dumps(m))") != []
    assert manifest_writers((REPO / "dl_utils" / "run.py").read_text(encoding="utf-8")) != []  # the check sees it
