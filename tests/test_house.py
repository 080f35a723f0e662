"""Rules of the code base that no other test would notice breaking."""
import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("lora_da/*.py"), *ROOT.glob("lora_da/kernels/*.py")])
# Triton's own switch: Triton reads it when the kernels are defined, so their configs must too
IMPORT_TIME_VARIABLES = {"TRITON_INTERPRET"}
# a figure with a unit of time or a share, as measurements are written (they belong in RESULTS.md)
MEASURED = re.compile(r"\d(?:\.\d+)?\s?(?:s|ms|us|µs|%|x faster|TFLOP/s|GB/s)(?![\w/])")


def ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


def module_level_nodes(tree: ast.Module):
    """Every node that runs at import: outside function bodies (decorators and defaults included)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(node.decorator_list if not isinstance(node, ast.Lambda) else [])
            stack.extend(d for d in node.args.defaults + node.args.kw_defaults if d is not None)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


@pytest.mark.parametrize("path", SOURCES, ids=ids)
def test_no_environment_variable_is_read_at_import(path):
    tree = ast.parse(path.read_text())
    for node in module_level_nodes(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "getenv"):
            owner = ast.unparse(node.func.value)
            if owner in ("os.environ", "os") and node.args:
                name = ast.literal_eval(node.args[0])
                assert name in IMPORT_TIME_VARIABLES, f"{ids(path)}:{node.lineno} reads {name} at import"
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            raise AssertionError(f"{ids(path)}:{node.lineno} reads os.environ at import")


@pytest.mark.parametrize("path", SOURCES, ids=ids)
def test_no_attribute_proxies(path):
    tree = ast.parse(path.read_text())
    proxies = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"]
    assert not proxies, f"{ids(path)}: __getattr__ at lines {proxies}"


@pytest.mark.parametrize("path", SOURCES + sorted(ROOT.glob("csrc/*")), ids=ids)
def test_measured_figures_live_in_results_not_in_code(path):
    text = path.read_text()
    if path.suffix == ".py":
        tokens = tokenize.generate_tokens(io.StringIO(text).readline)
        prose = [(t.start[0], t.string) for t in tokens if t.type in (tokenize.COMMENT, tokenize.STRING)]
    else:
        prose = [(number, line[line.index("//"):]) for number, line in enumerate(text.splitlines(), 1) if "//" in line]
    found = [(line, MEASURED.search(words).group(0)) for line, words in prose if MEASURED.search(words)]
    assert not found, f"{ids(path)}: measured figures {found}; move them to benchmarks/RESULTS.md"


def test_one_cholesky_of_the_input_factors():
    """Both solvers and every batch of modules reach an input's Zd through ``InputFactors``, whose
    one factorisation calls ``damped_cholesky``."""
    tree = ast.parse((ROOT / "lora_da" / "input_factors.py").read_text())
    callers = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
               and any(isinstance(call, ast.Call) and ast.unparse(call.func).endswith("damped_cholesky")
                       for call in ast.walk(node))]
    assert [node.name for node in callers] == ["_factor"]
    assert "\n".join(path.read_text() for path in SOURCES).count("cholesky_ex(") == 1


def test_no_module_is_named_like_a_public_function():
    """``import lora_da.solver as m`` gives a module, never the function ``lora_da.solve``."""
    import inspect

    import lora_da

    functions = [name for name in lora_da.__all__ if inspect.isfunction(getattr(lora_da, name))]
    assert functions and not [name for name in functions if (ROOT / "lora_da" / f"{name}.py").exists()]


def test_sequence_sums_are_written_once_in_the_dispatch_layer():
    """The kernels compute Z, G and y; the per-sequence sums are written by the accumulators, after
    whichever backend ran, through the one ``write_sequence_sums``."""
    calls = {path.relative_to(ROOT).as_posix(): path.read_text().count("write_sequence_sums(") for path in SOURCES}
    assert {path: count for path, count in calls.items() if count} == {
        "lora_da/kernels/reference.py": 1, "lora_da/accumulators.py": 1}  # the definition and the one call
