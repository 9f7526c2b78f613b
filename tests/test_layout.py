"""The shape of the code: no import cycles among the project's modules (imports inside functions count),
modules of a readable size, a short README, and a layout page that names every script and util module."""
import ast
import glob
import os
import re

from conftest import ROOT


def project_modules():
    """Module name -> file, for the top-level scripts and util/."""
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "util", "*.py"))
    return {os.path.relpath(f, ROOT)[:-3].replace(os.sep, "."): f for f in files}


def imports_of(path, modules):
    """Project modules that a file imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found - {"util"}


def test_no_import_cycles():
    modules = project_modules()
    graph = {m: imports_of(f, modules) for m, f in modules.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert graph["util.cpu"] <= {"util.compat"} and not graph["util.compat"]  # imports nothing else of the project
    assert not {"util.misc", "util.dist", "util.checkpoint", "util.datasets"} & _reachable(graph, "layer")


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_module_sizes():
    sizes = {m: sum(1 for _ in open(f, encoding="utf-8")) for m, f in project_modules().items()}
    assert sizes["util.misc"] <= 250
    assert {m: n for m, n in sizes.items() if n > 350} == {}


def test_readme_is_a_short_guide_with_the_depth_in_docs():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(readme.encode()) <= 15000
    links = set(re.findall(r"\]\((docs/[\w.]+)\)", readme))
    assert links == {os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))}
    assert readme.splitlines()[14].startswith("pip install -r requirements.txt pytest")  # .ci/run reads it


def test_layout_page_names_every_module():
    design = open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8").read()
    layout = re.search(r"^## Repository layout\n(.*?)(?=^## |\Z)", design, re.S | re.M).group(1)
    named = set(re.findall(r"`([\w/.]+)`", layout))
    missing = [os.path.relpath(f, ROOT) for f in project_modules().values()
               if os.path.basename(f) != "__init__.py" and os.path.relpath(f, ROOT) not in named]
    assert missing == []


def test_the_vit_blocks_are_device_free():
    """layer.py holds the ViT blocks only: no device checks, no native code; the CPU paths attach from
    util/cpu_layer.py."""
    tree = ast.parse(open(os.path.join(ROOT, "layer.py")).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"math", "paddle", "nn", "F", "recompute"}, imported
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} | {
        node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"get_device", "place", "is_cpu_place", "is_gpu_place", "in_dynamic_mode", "cpu_kernels"}


def test_errors_end_a_script_in_one_place():
    """No module exits with its own `error: ...` line; every script's entry point goes through
    util.errors.run, which turns the one error type into that line and the exit code."""
    for name, path in project_modules().items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exit"
                    and name != "util.errors"):
                assert False, f"{path}:{node.lineno}: sys.exit outside util/errors.py"
        if "." in name or name in ("hubconf", "models_mae", "models_vit", "layer", "engine_pretrain",
                                   "engine_finetune"):
            continue
        main = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert main and "run(" in ast.unparse(main[0]), f"{path}: the entry point does not go through run"
