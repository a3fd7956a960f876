"""The package's structural rules (ARCHITECTURE.md): they fail on the offending file and line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"core": "promptmux.core", "kinds": "promptmux.kinds", "export": "promptmux.export",
            "runtime": "promptmux.runtime", "bench": "promptmux.bench", "kernels": "promptmux.kernels",
            "library": "promptmux.library", "promptmux": "promptmux"}


def _modules():
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text(), str(path))


def _typing_only(tree) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only: they never run)."""
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
            for stmt in node.body for n in ast.walk(stmt)}


def _imports(tree, path: Path):
    """(absolute module, imported names, line) of every import that runs, relative ones resolved within the
    package."""
    parts = path.relative_to(ROOT).parts
    package = ".".join([PACKAGES[parts[0]], *parts[1:-1]]) if parts[0] != "promptmux" else ".".join(parts[:-1])
    typing_only = _typing_only(tree)
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            yield module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def test_runtime_never_imports_the_exporter():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {m}" for p, tree in _modules() if p.parts[-2] == "runtime"
           or "runtime" in p.relative_to(ROOT).parts[:1]
           for m, _, line in _imports(tree, p) if m.startswith("promptmux.export")]
    assert not bad, bad


def test_core_and_kinds_import_neither_export_nor_runtime():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {m}" for p, tree in _modules()
           if p.relative_to(ROOT).parts[0] in ("core", "kinds")
           for m, _, line in _imports(tree, p) if m.startswith(("promptmux.export", "promptmux.runtime"))]
    assert not bad, bad


def test_no_private_name_is_imported_across_modules():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {n} from {m}" for p, tree in _modules()
           for m, names, line in _imports(tree, p) if m.startswith("promptmux")
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p, _ in _modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_nothing_outside_kinds_branches_on_a_task_kind():
    """No `x.kind` compared with a string, and no PEFT method name compared with anything, outside promptmux.kinds."""
    from promptmux.kinds import BY_PEFT_TYPE

    methods = set(BY_PEFT_TYPE)
    bad = []
    for path, tree in _modules():
        if path.relative_to(ROOT).parts[0] == "kinds":
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            on_kind = any(isinstance(x, ast.Attribute) and x.attr == "kind" for x in sides)
            strings = [x.value for x in sides if isinstance(x, ast.Constant) and isinstance(x.value, str)]
            if (on_kind and strings) or any(v in methods for v in strings):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def _reads_a_family(x) -> bool:
    """`spec.family`, `spec.family.name`, `family`, `manifest["base"]["family"]`."""
    if isinstance(x, ast.Attribute) and x.attr == "name":
        x = x.value
    return ((isinstance(x, ast.Attribute) and x.attr == "family") or (isinstance(x, ast.Name) and x.id == "family")
            or (isinstance(x, ast.Subscript) and isinstance(x.slice, ast.Constant) and x.slice.value == "family"))


def test_nothing_outside_the_family_modules_branches_on_a_family():
    """No family compared with a string (or a literal tuple of them), and no table indexed by a family, outside
    core/families: code asks the family (`spec.family.classifies`, ...). A Family compared with a string also
    raises at run time. Tables of which families a backend or kind runs name them as data, and stay allowed."""
    def strings(x):
        items = x.elts if isinstance(x, (ast.Tuple, ast.List, ast.Set)) else [x]
        return any(isinstance(i, ast.Constant) and isinstance(i.value, str) for i in items)

    bad = []
    for path, tree in _modules():
        if path.relative_to(ROOT).parts[:2] == ("core", "families"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_reads_a_family(x) for x in sides) and any(strings(x) for x in sides):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:60]}")
            elif isinstance(node, ast.Subscript) and _reads_a_family(node.slice):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:60]} (a table by family)")
    assert not bad, bad


def test_every_peft_prompt_learning_method_has_a_kind():
    """PEFT's six prompt-learning methods (CPT and CARTRIDGE included) each map to a kind module."""
    from peft.utils.peft_types import PeftType

    from promptmux.kinds import BY_PEFT_TYPE

    wanted = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE"}
    assert wanted <= {t.value for t in PeftType}
    assert set(BY_PEFT_TYPE) == wanted


def test_no_test_reads_the_cpu_capabilities_itself():
    """A test that asks whether this CPU has bf16 and branches on it covers one branch per machine: tests go
    through conftest's bf16_cpu fixture (the hardware path, skipped with the reason) and force the capability off
    with monkeypatch for the refusal, so both branches run wherever they can (PROMPTMUX_TEST_CPU=no-bf16 too)."""
    bad = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name == "cpu_has_bf16":
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} calls cpu_has_bf16()")
    assert not bad, bad


def _test_modules():
    for path in sorted((ROOT / "tests").glob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _fixture_names(tree) -> set[str]:
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            and any("fixture" in ast.unparse(d) for d in node.decorator_list)}


def test_no_test_module_redefines_a_shared_fixture():
    """Fixtures the modules share live in conftest.py, built once per run (its `built_once`), not copied."""
    shared = _fixture_names(ast.parse((ROOT / "tests" / "conftest.py").read_text()))
    bad = [f"tests/{p.name} defines {n}" for p, tree in _test_modules() if p.name != "conftest.py"
           for n in sorted(_fixture_names(tree) & shared)]
    assert not bad, bad


def test_no_test_asserts_on_the_clock():
    """Tests wait on events (a status, a log line, a closed connection), not on how long something took: speed
    belongs in bench/, and a clock bound fails on a busy machine. An assert may not read a clock, nor a name set
    from one in the same function."""
    clocks = ("time.monotonic", "time.time", "time.perf_counter")

    def reads_clock(node, timed: set[str]) -> bool:
        return any(isinstance(c, ast.Call) and ast.unparse(c.func) in clocks
                   or isinstance(c, ast.Name) and c.id in timed for c in ast.walk(node))

    bad = []
    for p, tree in _test_modules():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            timed = {t.id for node in ast.walk(fn) if isinstance(node, ast.Assign) and reads_clock(node.value, set())
                     for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)}
            timed -= {"deadline"}  # a wait's own deadline (until ... or give up), not a measurement
            bad += [f"tests/{p.name}:{node.lineno}" for node in ast.walk(fn)
                    if isinstance(node, ast.Assert) and reads_clock(node.test, timed)]
    assert not bad, sorted(set(bad))


def test_one_pad_id_rule():
    """Padded graph inputs get core/archs.pad_id(config); no module writes its own fallback for a missing pad token
    (bench/baseline.generate_pad_id is the one for PEFT's generate(), which is HF's matter, not a graph input)."""
    import re

    fallback = re.compile(r"pad_token_id\s+(or\b|if\b[^\n]*\bis not None else)")
    bad = [f"{p.relative_to(ROOT)}:{n}" for p, _ in _modules()
           if p.relative_to(ROOT).as_posix() not in ("core/archs.py", "bench/baseline.py")
           for n, line in enumerate(p.read_text().splitlines(), 1) if fallback.search(line)]
    assert not bad, bad


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join([PACKAGES[parts[0]], *parts[1:]] if parts[0] != "promptmux" else parts)
    return name.removesuffix(".__init__")


def test_no_import_cycle():
    """No two modules import each other, directly or through others, counting imports inside functions (an
    in-function import only hides a cycle). `from package import name` leads to the submodule where `name` is
    one, else to the package."""
    trees = {_module_name(p): (p, tree) for p, tree in _modules()}
    edges: dict[str, dict[str, str]] = {m: {} for m in trees}
    for module, (path, tree) in trees.items():
        for target, names, line in _imports(tree, path):
            for name in names or [None]:
                full = f"{target}.{name}" if name and f"{target}.{name}" in trees else target
                while full and full not in trees:
                    full = full.rpartition(".")[0]
                if full and full != module:
                    edges[module].setdefault(full, f"{path.relative_to(ROOT)}:{line}")
    cycles, done = [], set()

    def visit(module, stack):  # depth-first; a module met again on the stack closes a cycle
        if module in stack:
            loop = stack[stack.index(module):] + [module]
            cycles.append(" -> ".join(f"{a} ({edges[a][b]})" for a, b in zip(loop, loop[1:])))
            return
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, stack + [module])
        done.add(module)

    for module in sorted(trees):
        visit(module, [])
    assert not cycles, cycles


def test_no_private_attribute_is_used_across_modules():
    """`obj._name` outside `self`/`cls` only where this module defines `_name`: another module's private state is
    reached through a public name (as `test_no_private_name_is_imported_across_modules` does for imports)."""
    defined: dict[Path, set[str]] = {}
    uses = []
    for path, tree in _modules():
        mine = defined.setdefault(path, set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                mine.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                mine.add(node.id)
            elif isinstance(node, ast.Attribute):
                on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if on_self and isinstance(node.ctx, ast.Store):
                    mine.add(node.attr)  # defined here: set on its own object
                elif not on_self and node.attr.startswith("_") and not node.attr.startswith("__"):
                    uses.append((path, node.lineno, ast.unparse(node)[:60], node.attr))  # read or written
    ours = set().union(*defined.values())
    bad = [f"{p.relative_to(ROOT)}:{line} {text}" for p, line, text, attr in uses
           if attr in ours and attr not in defined[p]]
    assert not bad, bad


def test_recorded_results_live_outside_the_package_and_each_is_indexed():
    inside = [str(p.relative_to(ROOT)) for folder in PACKAGES for p in (ROOT / folder).rglob("results") if p.is_dir()]
    index = (ROOT / "results" / "README.md").read_text()
    unlisted = [p.name for p in (ROOT / "results").iterdir() if p.name != "README.md" and f"({p.name})" not in index]
    assert not inside and not unlisted, (inside, unlisted)


def test_the_repository_root_holds_only_the_project_files():
    """A study's by-products (ONNX Runtime profiles once) belong in results/ or nowhere, not at the root."""
    project = {".gitignore", "ARCHITECTURE.md", "README.md", "pyproject.toml"}
    stray = [p.name for p in ROOT.iterdir() if p.is_file() and p.name not in project
             and not any(p.match(g) for g in ("*.tmp", ".coverage*"))]
    assert not stray, f"files at the repository root that are not the project's: {stray}"
