"""dvc.yaml against the code: each stage's code deps are exactly what `python -m stages.<name>` imports, and its
params are real keys of params.yaml, fine-grained where a key cannot change the stage's result.

The import closure is read from the source with `ast` (nothing is imported): every `import weightdiff.x`,
`from weightdiff import x`, `from weightdiff.x import y` and relative import, at module level or inside a
function, followed through stages/ and weightdiff/. Imports under `if TYPE_CHECKING:` do not run and are left
out, and so are docstring-only `__init__.py` files, which cannot change a result. Package data (a non-.py file
under weightdiff/) belongs to a stage when a module of its closure names the file in a string literal, as
evalset.py names "eval_texts.jsonl".
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from weightdiff.settings import RUN_ONLY_KEYS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "weightdiff")
# Keys that cannot change what extract writes: how far it reads ahead, and where it computes (both devices run the
# same float32 decomposition of the same ΔW).
EXTRACT_NOT_PARAMS = set(RUN_ONLY_KEYS)  # what cannot change the result: not in the resume key either


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = re.fullmatch(r"python -m (stages\.\w+)(?: .*)?", stage["cmd"])
    assert match, f"cmd {stage['cmd']!r} is not `python -m stages.<name>`"
    return match.group(1)


def module_file(name: str) -> Path | None:
    """The file of a module of this repository (stages.*, weightdiff.*), or None for any other module."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(tree: ast.AST):
    """Every node of the tree except those under `if TYPE_CHECKING:` (whose `else:` does run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imported_modules(path: Path, top_level: bool = False) -> set[str]:
    """Dotted names of every module this file's imports load: each package on the way, and `from p import m`'s
    submodule m; top_level: only the module's own import statements, not those inside functions."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body if top_level else runtime_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def is_trivial(path: Path) -> bool:
    """An `__init__.py` with nothing but a docstring (and `from __future__` imports)."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str))
        or (isinstance(s, ast.ImportFrom) and s.module == "__future__")
        for s in body
    )


def import_closure(path: Path) -> set[Path]:
    closure, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in closure:
            continue
        closure.add(current)
        todo.extend(f for f in map(module_file, imported_modules(current)) if f is not None)
    return {p for p in closure if not is_trivial(p)}


def package_data() -> list[Path]:
    """The non-Python files under weightdiff/ (what pyproject.toml's package-data installs)."""
    files = (p for p in (ROOT / "weightdiff").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return sorted(p for p in files if p.suffix not in (".py", ".pyc", ".pyi"))


def string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def expected_code_deps(stage: dict) -> list[str]:
    """The stage's module, then the rest of its closure, then the package data it names, as dvc.yaml lists them."""
    entry = module_file(stage_module(stage))
    assert entry is not None, f"{stage_module(stage)} not found"
    closure = import_closure(entry)
    literals = set().union(*map(string_literals, closure))
    data = [p for p in package_data() if p.name in literals]
    return [rel(entry), *sorted(rel(p) for p in closure - {entry}), *map(rel, data)]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_code_deps_are_each_stages_import_closure():
    wrong = {}
    for name, stage in dvc_stages().items():
        deps = stage.get("deps", [])
        listed = [d for d in deps if d.startswith(("stages/", "weightdiff/"))]
        expected = expected_code_deps(stage)
        if sorted(listed) != sorted(expected):
            line = ", ".join([*expected, *(d for d in deps if d not in listed)])
            missing, extra = sorted(set(expected) - set(listed)), sorted(set(listed) - set(expected))
            wrong[name] = f"  {name}:  (missing {missing}, not imported {extra})\n    deps: [{line}]"
    if wrong:
        pytest.fail(
            "dvc.yaml code deps differ from the stages' import closures; use these:\n" + "\n".join(wrong.values()),
            pytrace=False,
        )


def lookup(params: dict, key: str) -> bool:
    node: object = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def stage_params(stage: dict) -> list[str]:
    keys = stage.get("params", [])
    assert all(isinstance(k, str) for k in keys), f"params must be keys of params.yaml, not {keys}"
    return keys


def test_params_are_keys_of_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in dvc_stages().items():
        keys = stage_params(stage)
        assert len(set(keys)) == len(keys), f"{name}: a param listed twice in {keys}"
        assert [k for k in keys if not lookup(params, k)] == [], f"{name}: params missing from params.yaml"
        nested = [(a, b) for a in keys for b in keys if b.startswith(f"{a}.")]
        assert not nested, f"{name}: {nested}: a key listed with its parent"


def test_extract_lists_every_key_that_can_change_its_result():
    """All of extract.* but device: a new extract key must be added here, or to RUN_ONLY_KEYS."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    listed = {k.removeprefix("extract.") for k in stage_params(dvc_stages()["extract"])}
    assert "extract" not in listed, "extract lists all of extract.*, device too"
    top = {k.split(".")[0] for k in listed}
    assert not top & EXTRACT_NOT_PARAMS, f"extract lists {top & EXTRACT_NOT_PARAMS}, which cannot change its result"
    assert top == set(params["extract"]) - EXTRACT_NOT_PARAMS


def cfg_reads(path: Path) -> set[str]:
    """The dotted keys a stage module reads off its `cfg` argument (`cfg.extract.dtype` → "extract.dtype")."""
    reads = set()
    for node in ast.walk(ast.parse(path.read_text())):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == "cfg" and chain:
            reads.add(".".join(reversed(chain)))
    return {r for r in reads if not any(o.startswith(f"{r}.") for o in reads)}  # the longest chains only


def test_the_params_a_stage_module_reads_are_listed():
    """A stage module that reads cfg.<key> depends on <key> (or on a part of it, such as extract.rank)."""
    for name, stage in dvc_stages().items():
        keys = stage_params(stage)
        path = module_file(stage_module(stage))
        assert path is not None
        for read in cfg_reads(path):
            if read.split(".")[0] == "paths":
                continue
            covered = any(read == k or read.startswith(f"{k}.") or k.startswith(f"{read}.") for k in keys)
            assert covered, f"{name} reads cfg.{read}, but dvc.yaml lists only params {keys}"


def test_readme_layout_names_every_module():
    """The README's layout block lists each module of weightdiff/ by name, and nothing that is not there."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    rows = [line for line in block.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    named = {word for row in rows for word in row.split("  ")[1].split()}
    modules = {p.stem for p in (ROOT / "weightdiff").glob("*.py") if p.stem != "__init__"} | {"report/"}
    assert named == modules, f"README lists {sorted(named - modules)} not in the tree; misses {sorted(modules - named)}"


def test_each_stage_declares_the_files_it_reads_and_writes():
    """The paths a stage module uses (settings.Paths) are its deps or outs in dvc.yaml, and dvc.yaml names no data
    file that Paths does not: the two places paths are written agree."""
    from dataclasses import asdict

    from weightdiff.settings import Paths

    paths = asdict(Paths())
    declared_anywhere = set()
    for name, stage in dvc_stages().items():
        entries = [e for key in ("deps", "outs", "metrics", "plots") for e in stage.get(key) or []]
        declared = {next(iter(e)) if isinstance(e, dict) else str(e) for e in entries}  # {path: {cache: false}}
        declared_anywhere |= {d for d in declared if not d.startswith(("stages/", "weightdiff/"))}
        used = set(
            re.findall(r"\b(?:p|paths)\.(\w+)", (ROOT / (stage_module(stage).replace(".", "/") + ".py")).read_text())
        )
        missing = sorted(paths[k] for k in used - {"resume"} if paths[k] not in declared)
        assert not missing, f"stage {name} uses {missing}, which dvc.yaml does not list for it"
    assert declared_anywhere <= set(paths.values()), sorted(declared_anywhere - set(paths.values()))


def test_no_import_cycles_inside_weightdiff():
    """Module-level imports between weightdiff's modules form no cycle (imports inside functions, made late on
    purpose, and under TYPE_CHECKING are left out)."""
    import networkx as nx

    graph = nx.DiGraph()
    for path in (ROOT / "weightdiff").rglob("*.py"):
        for name in imported_modules(path, top_level=True):
            target = module_file(name)
            if target is not None and not is_trivial(target) and target != path:
                graph.add_edge(module_name(path), module_name(target))
    assert graph.number_of_edges() > 20
    assert list(nx.simple_cycles(graph)) == []
