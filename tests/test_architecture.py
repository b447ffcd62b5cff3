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
    "label_pseudobulk",
    "levels_pseudobulk",
    "tested_units",
    "profile",
    "select_hvgs",
    "dotplot_markers",
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


# ---- the library's house (issue #31) -------------------------------------------------
#: most lines a module of the package may hold (one sitting's read)
MAX_MODULE_LINES = 800


def _package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    """The module an ``from ... import`` names, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = _module_name(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _cross_module_privates(path: Path) -> list[str]:
    """``from sepsis_sc.x import _name`` (and ``x._name`` on an imported sepsis_sc module)
    where ``x`` is another module than the file's own."""
    own = _module_name(path)
    tree = ast.parse(path.read_text())
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(path, node)
            if not target.startswith("sepsis_sc"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and target != own:
                    found.append(f"line {node.lineno}: from {target} import {alias.name}")
                # `from sepsis_sc import store` binds a module
                aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sepsis_sc") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and aliases[node.value.id] != own
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("path", _package_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_small_enough_to_read(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, (
        f"{path.relative_to(PACKAGE)} has {n} lines (> {MAX_MODULE_LINES})"
    )


@pytest.mark.parametrize("path", _package_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_crosses_modules(path):
    bad = _cross_module_privates(path)
    assert not bad, (
        f"{path.relative_to(PACKAGE)} uses private names of other modules ({'; '.join(bad)}); "
        "make what another module needs public"
    )


def test_the_private_import_check_finds_them(tmp_path):
    pkg = tmp_path / "sepsis_sc" / "stage"
    pkg.mkdir(parents=True)
    mod = pkg / "m.py"
    mod.write_text(
        "from sepsis_sc.other import _hidden, shown\n"
        "from .sibling import _x\n"
        "from sepsis_sc import store\n"
        "store._read_matrix\n"
        "from . import m as me\n"
    )
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "sepsis_sc"
    try:
        found = _cross_module_privates(mod)
    finally:
        PACKAGE = saved
    assert [f.split(": ", 1)[1] for f in found] == [
        "from sepsis_sc.other import _hidden",
        "from sepsis_sc.stage.sibling import _x",
        "store._read_matrix",
    ]


def test_one_way_to_read_counts():
    """Stages take a store.CountSource (``counts=``): no ``counts_file`` parameter, no
    ``*_streamed`` twin of a function."""
    bad = []
    for path in _package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.args + node.args.kwonlyargs + node.args.posonlyargs
                if any(a.arg == "counts_file" for a in args):
                    bad.append(
                        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}(counts_file=)"
                    )
                if "_streamed" in node.name:
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not bad, bad


def test_one_definition_of_pseudobulk_and_log2cpm():
    """Counts summed per group and log2-CPM are defined once, in the data contract."""
    defs = []
    for path in _package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in (
                "pseudobulk",
                "log2cpm",
                "log_cpm",
                "group_sums",
                "column_sums",
                "pseudobulk_log2cpm",
            ):
                defs.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert sorted(defs) == ["data.py:log2cpm", "data.py:pseudobulk"], defs


def test_settings_defaults_are_the_schema_defaults():
    """Each config section has one settings class whose fields are the section's keys and
    whose defaults are the schema's (the one place a default is written)."""
    import dataclasses

    from sepsis_sc.config import SETTINGS, load_schema

    schema = load_schema("config")["properties"]
    sections = {k for k, v in schema.items() if "properties" in v and k not in ("contrast",)}
    assert set(SETTINGS) == sections
    for name, cls in SETTINGS.items():
        props = schema[name]["properties"]
        obj = cls()
        assert [f.name for f in dataclasses.fields(cls)] == list(cls.__annotations__)
        assert {f.name for f in dataclasses.fields(cls)} == set(props), name
        for key, sub in props.items():
            want = sub["default"]
            got = getattr(obj, key)
            got = list(got) if isinstance(got, tuple) else got
            assert got == want, f"{name}.{key}: {got!r} != schema {want!r}"


def test_settings_are_built_in_one_place():
    """No settings dataclass outside sepsis_sc.config: nothing else defines from_config."""
    bad = []
    for path in _package_modules():
        if path.relative_to(PACKAGE).parts[0] == "config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "from_config":
                bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not bad, bad


def test_stage_functions_take_settings_not_copies_of_them():
    """A public function that takes a settings object takes no keyword named like one of
    its fields (those are overrides, ``**overrides``, read from the one definition)."""
    import dataclasses
    import importlib
    import inspect
    import typing

    from sepsis_sc.config import Settings

    bad = []
    for path in _package_modules():
        name = _module_name(path)
        if name.startswith("sepsis_sc.pl") or name.endswith("__main__"):
            continue
        mod = importlib.import_module(name)
        for fname, fn in vars(mod).items():
            if fname.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != name:
                continue
            try:
                hints = typing.get_type_hints(fn)
            except Exception:  # noqa: BLE001 - unresolvable forward references
                continue
            for hint in hints.values():
                classes = [a for a in typing.get_args(hint) if isinstance(a, type)] or [hint]
                for cls in classes:
                    if isinstance(cls, type) and issubclass(cls, Settings) and cls is not Settings:
                        fields = {f.name for f in dataclasses.fields(cls)}
                        dup = sorted(fields & set(inspect.signature(fn).parameters))
                        if dup:
                            bad.append(f"{name}.{fname}: {dup}")
    assert not bad, bad


def test_pl_functions_return_figures():
    """``sepsis_sc.pl`` draws: each public figure function returns a matplotlib Figure (the
    caller saves it with ``pl.savefig``), none takes a path to write."""
    bad = []
    for path in sorted((PACKAGE / "pl").glob("*.py")):
        if path.name in ("__init__.py", "style.py"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                ret = ast.unparse(node.returns) if node.returns else ""
                params = [a.arg for a in node.args.args + node.args.kwonlyargs]
                if "Figure" not in ret or "path" in params:
                    bad.append(f"pl/{path.name}:{node.name} -> {ret or '?'} ({', '.join(params)})")
    assert not bad, bad
