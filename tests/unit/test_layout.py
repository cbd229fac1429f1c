"""The architecture, enforced: who may import whom, and one exception tree.

Read statically (every import statement, also those inside functions), so a rule holds
for code paths no other test runs.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent.wire.errors
from agent.wire.errors import EdgefleetError
from testkit.env import REPO_ROOT

# The pure update core: values in, values out.
CORE = ("agent.update.statemachine", "agent.update.decision", "agent.update.compat")
# What the core may import besides the wire formats and itself: nothing that touches a clock,
# a file, a socket or a process.
CORE_ALLOWED = {"__future__", "enum", "typing", "re", "dataclasses", "collections.abc", "pydantic"}


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def _imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names (absolute; `from x import y` gives x and x.y)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _project(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in ("agent", "builder", "testkit", "tests", "bench")}


@pytest.mark.parametrize(("module", "path"), list(_modules("agent")), ids=lambda v: str(v))
def test_agent_never_imports_the_host_side_or_test_support(module: str, path: Path) -> None:
    bad = {n for n in _project(_imports(path)) if n.split(".")[0] != "agent"}
    assert not bad, f"{module} imports {sorted(bad)}: the device must not depend on the host side or tests"


@pytest.mark.parametrize(("module", "path"), list(_modules("agent/wire")), ids=lambda v: str(v))
def test_the_wire_imports_nothing_of_the_project_but_itself(module: str, path: Path) -> None:
    bad = {n for n in _project(_imports(path)) if not n.startswith("agent.wire") and n != "agent"}
    assert not bad, f"{module} imports {sorted(bad)}: the wire formats must stand alone"


@pytest.mark.parametrize(("module", "path"), list(_modules("builder")), ids=lambda v: str(v))
def test_builder_imports_only_the_wire_formats_of_the_agent(module: str, path: Path) -> None:
    bad = {n for n in _project(_imports(path))
           if n.split(".")[0] in ("tests", "testkit", "bench")
           or (n.startswith("agent") and not n.startswith("agent.wire"))}
    assert not bad, f"{module} imports {sorted(bad)}: the host side takes only agent.wire from the device"


@pytest.mark.parametrize("module", CORE)
def test_the_update_core_does_no_io(module: str) -> None:
    def allowed(name: str) -> bool:
        if name.startswith("agent.wire") or name in CORE or name.rsplit(".", 1)[0] in CORE:
            return True
        return any(name == a or name.startswith(a + ".") for a in CORE_ALLOWED)

    path = REPO_ROOT / (module.replace(".", "/") + ".py")
    outside = {name for name in _imports(path) if not allowed(name)}
    assert not outside, f"{module} imports {sorted(outside)}: the core takes values and returns values"


def _exception_classes() -> list[tuple[str, str]]:
    """(module, class) of every error class defined in agent/ and builder/, read from the source:
    a class is one when a base is a builtin Exception or another such class (to a fixed point)."""
    import builtins

    classes: list[tuple[str, str, list[str]]] = []
    for package in ("agent", "builder"):
        for module, path in _modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                             for b in node.bases]
                    classes.append((module, node.name, bases))
    # Exception, not BaseException: a signal that unwinds like Ctrl-C (the demo's _Stop) is no error.
    errors = {n for n, v in vars(builtins).items() if inspect.isclass(v) and issubclass(v, Exception)}
    while True:
        more = {name for _, name, bases in classes if name not in errors and set(bases) & errors}
        if not more:
            break
        errors |= more
    return [(module, name) for module, name, _ in classes if name in errors]


def test_every_error_is_in_the_one_tree_and_drawn_in_its_header() -> None:
    drawing = agent.wire.errors.__doc__ or ""
    seen = _exception_classes()
    assert len(seen) > 20, f"only {seen} found: the scan is broken"
    for module, name in seen:
        assert module == "agent.wire.errors", f"{module}.{name}: define errors in agent/wire/errors.py"
        cls = getattr(agent.wire.errors, name)
        assert issubclass(cls, EdgefleetError), f"{name} does not derive from EdgefleetError"
        assert f"x {name} " in drawing or f"* {name}\n" in drawing, f"{name} is not drawn in the tree's header"


def test_errors_crossing_a_process_take_one_message() -> None:
    for name, cls in agent.wire.errors.CROSS_PROCESS_ERRORS.items():
        assert cls.__name__ == name and isinstance(cls("why"), EdgefleetError)


def test_children_import_this_very_checkout() -> None:
    """A child started as `python -m agent.<module>` / `builder.<module>` finds the package it came
    from: the first PYTHONPATH entry is the folder that holds it, wherever the module sits."""
    import agent
    import builder
    from agent.system.childproc import python_child_env
    from builder.demo.story import _child_env

    for package, env in ((agent, python_child_env({})), (builder, _child_env())):
        first = Path(env["PYTHONPATH"].split(":")[0])
        assert (first / package.__name__ / "__init__.py").resolve() == Path(package.__file__).resolve()


@pytest.mark.parametrize(("module", "path"), [*_modules("agent"), *_modules("builder")])
def test_no_module_locates_the_checkout_by_its_own_depth(module: str, path: Path) -> None:
    """`Path(__file__).parent.parent` breaks silently when a module moves to another folder;
    the checkout is located from the top package (`builder.IMPORT_ROOT`, `agent.__file__`)."""
    if module == "builder":
        return
    assert not re.search(r"Path\(__file__\)\S*\.parent", path.read_text()), \
        f"{path}: locate the checkout from the top package"
