"""Layering rules of the package, checked on the source text (nothing is imported).

Every figure lives in ``sepsis_sc.pl`` (like scanpy's ``sc.pl``): the stage modules hold the
science and never import matplotlib, not even inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sepsis_sc"
PLOTTING_LIBS = ("matplotlib", "seaborn")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):  # importlib.import_module("matplotlib...")
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
    return found


def _is_plotting(module: str) -> bool:
    return any(module == lib or module.startswith(lib + ".") for lib in PLOTTING_LIBS)


def _stage_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "pl" not in p.relative_to(PACKAGE).parts)


@pytest.mark.parametrize("path", _stage_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_pl_imports_matplotlib(path):
    bad = [f"line {n}: {m}" for n, m in _imported_modules(path) if _is_plotting(m)]
    assert not bad, (
        f"{path.relative_to(PACKAGE)} imports a plotting library ({'; '.join(bad)}); "
        "figure code belongs in sepsis_sc.pl"
    )


def test_the_check_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n"
        "    import matplotlib.pyplot as plt\n"
        "def g():\n"
        "    from matplotlib import colors\n"
        "import importlib\n"
        "importlib.import_module('matplotlib')\n"
    )
    assert [m for _, m in _imported_modules(src) if _is_plotting(m)] == [
        "matplotlib.pyplot",
        "matplotlib",
        "matplotlib",
    ]


def test_pl_covers_the_stages():
    pl = PACKAGE / "pl"
    assert {p.stem for p in pl.glob("*.py")} >= {
        "qc",
        "integrate",
        "cluster",
        "annotate",
        "stats",
        "de",
        "patients",
        "style",
    }
    assert not (PACKAGE / "plotting.py").exists()  # one home for the palettes: pl/style.py


def test_stage_modules_have_no_figure_functions():
    for path in _stage_modules():
        tree = ast.parse(path.read_text())
        names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert not [n for n in names if n.startswith("plot_")], path.name


#: library calls in the rule scripts that read counts after QC, which must be told the
#: count layer of config qc.downstream_layer (ambient-corrected counts when QC made them)
_COUNT_READERS = {
    "annotate",
    "annotate_celltypist",
    "transfer_labels",
    "score_states",
    "sample_table",
    "pseudobulk_de",
    "pseudobulk",
    "profile",
    "select_hvgs",
    "select_hvgs_streamed",
    "marker_dotplot",
}


def test_rule_scripts_pass_the_downstream_count_layer():
    scripts = PACKAGE.parents[1] / "workflow" / "scripts"
    missing = []
    for path in sorted(scripts.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in _COUNT_READERS and "layer" not in {k.arg for k in node.keywords}:
                missing.append(f"{path.name}:{node.lineno} {name}()")
    assert not missing, f"calls without layer= (use sepsis_sc.data.counts_layer): {missing}"
    # scVI reads the layer through the integrate script's method arguments
    assert '"layer": layer' in (scripts / "integrate.py").read_text()


def test_cohort_rule_scripts_never_read_a_whole_h5ad():
    """Atlas scale (issue #23): the rule scripts after QC read the parts they use through
    sepsis_sc.store (no matrix, one layer, a gene subset) and write with store.write; a plain
    anndata.read_h5ad / write_h5ad would load or rewrite every matrix."""
    scripts = PACKAGE.parents[1] / "workflow" / "scripts"
    per_sample = {"qc_sample.py", "simulate_demo.py", "download.py", "unpack.py"}
    found = []
    for path in sorted(scripts.glob("*.py")):
        if path.name in per_sample:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("read_h5ad", "write_h5ad"):
                    found.append(f"{path.name}:{node.lineno} {name}()")
    assert not found, found
