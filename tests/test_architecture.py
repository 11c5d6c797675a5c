"""The library's shape (issue #16): only ``gissl/cli.py`` reads an argparse Namespace, no task
module imports another, and the training loop stays small enough to read."""
import ast
import pathlib
import re

import pytest

LIBRARY = pathlib.Path(__file__).resolve().parent.parent / "gissl"
TASKS = {"classification", "detection", "segmentation", "depth", "retrieval"}


def _library_files():
    return sorted(p for p in LIBRARY.rglob("*.py") if p.name != "cli.py" or p.parent != LIBRARY)


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _parameters(fn):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return names + [x.arg for x in (a.vararg, a.kwarg) if x is not None]


def test_only_cli_reads_flags():
    offences = []
    for path in _library_files():
        tree = ast.parse(path.read_text())
        rel = path.relative_to(LIBRARY.parent)
        for fn in _functions(tree):
            if "args" in _parameters(fn):
                offences.append(f"{rel}:{fn.lineno} {fn.name}() takes 'args'")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                offences.append(f"{rel}:{node.lineno} reads args.{node.attr}")
    assert not offences, "\n".join(offences)


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            if node.module == "gissl":
                yield from (f"gissl.{a.name}" for a in node.names)


def test_no_task_module_imports_another():
    offences = []
    for task in sorted(TASKS):
        tree = ast.parse((LIBRARY / f"{task}.py").read_text())
        for module in _imported_modules(tree):
            other = module.split(".")[1] if module.startswith("gissl.") else None
            if other in TASKS and other != task:
                offences.append(f"gissl/{task}.py imports {module}")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("name, max_lines", [("fit", 80), ("train_one_epoch", 60)])
def test_the_training_loop_is_short(name, max_lines):
    fn = next(f for f in _functions(ast.parse((LIBRARY / "engine.py").read_text())) if f.name == name)
    assert fn.end_lineno - fn.lineno + 1 <= max_lines
    assert len(_parameters(fn)) <= 12, _parameters(fn)


def test_no_library_function_is_longer_than_100_lines():
    long = [f"{p.relative_to(LIBRARY.parent)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in sorted(LIBRARY.rglob("*.py")) for f in _functions(ast.parse(p.read_text()))
            if f.end_lineno - f.lineno + 1 > 100]
    assert not long, "\n".join(long)


def test_comments_cite_nothing_outside_the_repository():
    root = LIBRARY.parent
    files = sorted(root.glob("*.py")) + sorted(LIBRARY.rglob("*.py")) + sorted((root / "tests").glob("*.py"))
    offences = []
    for path in files + [root / "README.md"]:
        if path.name == "test_architecture.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "../shared" in line:
                offences.append(f"{path.relative_to(root)}:{i} cites ../shared")
            for doc in re.findall(r"([\w/.-]*?)([\w-]+\.md) §", line):
                if doc[0] != "docs/" or not (root / "docs" / doc[1]).is_file():
                    offences.append(f"{path.relative_to(root)}:{i} cites {''.join(doc)}, which is not in docs/")
    assert not offences, "\n".join(offences)
