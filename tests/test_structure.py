"""The layout's rules, checked on the source tree: one direction of import, no cycles.

Every import statement counts, those inside functions included (an import hidden in a function
is still a dependency; it only moves the failure to run time).
"""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = "ijepa_fast"


def source_modules() -> dict[str, Path]:
    """Module name -> file, for the engine and for kernels/ (installed as ijepa_fast.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "ijepa_fast", PACKAGE), (ROOT / "kernels", f"{PACKAGE}.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports, anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule, else pkg itself
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    deps = set()
    for mod in found:
        while mod and mod not in known:  # `import a.b.c` of an attribute: the module that holds it
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            deps.add(mod)
    return deps


def import_graph() -> dict[str, set[str]]:
    mods = source_modules()
    return {name: imported_modules(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_structure_checker_sees_hidden_cycles(tmp_path):
    """The checker itself: an import inside a function closes a cycle it must report."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    (pkg / "c.py").write_text("from . import a\n")
    names = {"p": pkg / "__init__.py", "p.a": pkg / "a.py", "p.b": pkg / "b.py", "p.c": pkg / "c.py"}
    graph = {n: imported_modules(n, p, set(names)) for n, p in names.items()}
    assert graph["p.c"] == {"p.a"}
    assert cycles(graph) == [["p.a", "p.b"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and any("ijepa_fast.kernels.ema" in deps for deps in graph.values())
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_kernels_import_nothing_from_the_engine():
    """kernels/ is the bottom layer: the engine imports it, never the reverse."""
    graph = import_graph()
    kernels = {n for n in graph if n.startswith(f"{PACKAGE}.kernels")}
    assert len(kernels) >= 6
    bad = {n: sorted(d for d in graph[n] if not d.startswith(f"{PACKAGE}.kernels")) for n in kernels}
    bad = {n: d for n, d in bad.items() if d}
    assert not bad, f"kernels/ imports the engine: {bad}"
    for path in (ROOT / "kernels").rglob("*.py"):  # nor reaches above itself by a relative import
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith(PACKAGE), f"{path.name}: {ast.dump(node)}"


# the step's assembly: the calls that build a run model, and the one module allowed to make them
ASSEMBLER = f"{PACKAGE}.training.engine"
ASSEMBLY_CALLS = {f"{PACKAGE}.perf.switches": {"apply", "optimizer_impl", "fused_tail"},
                  f"{PACKAGE}.perf.tail": {"FusedTail"}}


def assembly_calls(name: str, path: Path) -> set[str]:
    """The assembly calls (``perf.apply``, ``perf.optimizer_impl``, ``perf.fused_tail``,
    ``tail.FusedTail``, and ``make_optimizer(..., impl=...)``) made anywhere in a file, as
    'module.function', whatever name they were imported under."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    funcs, mods = {}, {}  # local name -> 'module.function' / guarded module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = name.split(".")
            mod = ".".join(base[:len(base) - node.level + (1 if is_pkg else 0)] + [node.module or ""]).strip(".") \
                if node.level else node.module or ""
            for a in node.names:
                if f"{mod}.{a.name}" in ASSEMBLY_CALLS:
                    mods[a.asname or a.name] = f"{mod}.{a.name}"
                elif a.name in ASSEMBLY_CALLS.get(mod, ()) or a.name == "make_optimizer":
                    funcs[a.asname or a.name] = f"{mod}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ASSEMBLY_CALLS:
                    mods[a.asname or a.name] = a.name
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        target = funcs.get(f.id) if isinstance(f, ast.Name) else None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in mods \
                and f.attr in ASSEMBLY_CALLS[mods[f.value.id]]:
            target = f"{mods[f.value.id]}.{f.attr}"
        if target and target.endswith(".make_optimizer"):
            target = target if any(k.arg == "impl" for k in node.keywords) else None
        if target:
            found.add(target)
    return found


def test_assembly_checker_sees_every_spelling(tmp_path):
    """The checker itself: aliases, module imports and keyword use are all seen."""
    src = tmp_path / "m.py"
    src.write_text("from ..perf import switches as P\nfrom ..perf.switches import fused_tail as ft\n"
                   "from .step import make_optimizer\n"
                   "def f(m):\n    P.apply(m)\n    ft(m)\n    make_optimizer(m)\n    make_optimizer(m, impl='x')\n")
    assert assembly_calls(f"{PACKAGE}.training.m", src) == {
        f"{PACKAGE}.perf.switches.apply", f"{PACKAGE}.perf.switches.fused_tail",
        f"{PACKAGE}.training.step.make_optimizer"}


def test_the_engine_alone_assembles_the_step():
    """Only the engine applies the perf switches, picks the AdamW implementation and builds the
    fused tail (perf/switches.py and perf/tail.py, which define them, aside): the trainer, the bench, the
    profiler, the Lightning module and the examples get their step from it."""
    files = dict(source_modules())
    for folder in ("benchmarks", "examples"):
        files.update({f"{folder}.{p.stem}": p for p in sorted((ROOT / folder).glob("*.py"))})
    calls = {n: assembly_calls(n, p) for n, p in files.items() if n not in ASSEMBLY_CALLS}
    assert calls[ASSEMBLER] == {f"{PACKAGE}.perf.switches.apply", f"{PACKAGE}.perf.switches.optimizer_impl",
                                f"{PACKAGE}.perf.switches.fused_tail", f"{PACKAGE}.training.step.make_optimizer"}
    bad = {n: sorted(c) for n, c in calls.items() if c and n != ASSEMBLER}
    assert not bad, f"the step is assembled outside {ASSEMBLER}: {bad}"


def test_the_package_is_grouped_by_concern():
    """ijepa_fast/ holds a few top-level modules beside its packages: a shared name prefix
    (config_*, train_*, bench_*) is a package, not a set of modules."""
    top = sorted(p.stem for p in (ROOT / PACKAGE).glob("*.py"))
    assert len(top) <= 10, top
    stems = [s for s in top if not s.startswith("_")]
    prefixes = {s.split("_")[0] for s in stems if "_" in s}
    assert not [p for p in prefixes if sum(s.startswith(p + "_") or s == p for s in stems) > 1], stems
    for pkg in ("config", "training", "perf", "checkpoint", "interop", "runlog", "bench"):
        assert (ROOT / PACKAGE / pkg / "__init__.py").is_file(), pkg


def test_state_layouts_live_in_the_checkpoint_package():
    """Every state layout (published checkpoint, run files, Engine state, the resume and Lightning entries)
    is built and read in ijepa_fast/checkpoint/: no other module saves or restores RNG states itself."""
    names = {"rng_state", "set_rng_state", "engine_state", "load_engine_state", "resume_entry", "lightning_entry"}
    bad = []
    for name, path in source_modules().items():
        if name.startswith(f"{PACKAGE}.checkpoint"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                bad.append(f"{name} defines {node.name}")
            if isinstance(node, ast.ImportFrom) and {a.name for a in node.names} & {"rng_state", "set_rng_state"}:
                bad.append(f"{name} imports the RNG state functions")
    assert not bad, bad
