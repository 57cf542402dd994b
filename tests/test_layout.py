"""The house rules of docs/architecture.md, checked on the source tree itself.

A module's path says its role: ``shoal.wire`` is the contract and ``shoal.logic`` is pure
logic, so neither may reach the network, an event loop or another part of shoal.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "shoal"

# What each pure package may import from shoal, and what it may never import at all.
ALLOWED_SHOAL = {
    "wire": {"shoal.wire", "shoal.errors"},
    "logic": {"shoal.wire", "shoal.logic", "shoal.errors"},
}
FORBIDDEN = {"nats", "asyncio", "socket", "aiohttp", "ssl", "subprocess", "asyncssh", "time"}


def imports_of(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports, relative imports resolved."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(SRC.parent).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names if module.startswith("shoal")]
    return names


def pure_modules() -> list[tuple[str, Path]]:
    return [(pkg, p) for pkg in ALLOWED_SHOAL for p in sorted((SRC / pkg).glob("*.py"))]


@pytest.mark.parametrize(
    ("package", "path"), pure_modules(), ids=[f"{k}/{p.name}" for k, p in pure_modules()]
)
def test_pure_packages_import_only_what_their_role_allows(package: str, path: Path) -> None:
    for name in imports_of(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{path.relative_to(SRC)} imports {name}"
        if top == "shoal" and name != "shoal":
            assert any(name == a or name.startswith(a + ".") for a in ALLOWED_SHOAL[package]), (
                f"{path.relative_to(SRC)} imports {name}"
            )


def test_the_rule_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The check itself can fail: a logic module importing nats is caught."""
    bad = SRC / "logic" / "_layout_probe.py"
    bad.write_text("from ..natsio import bus\nimport asyncio\n")
    try:
        found = imports_of(bad)
    finally:
        bad.unlink()
    assert "shoal.natsio.bus" in found and "asyncio" in found


def test_no_flat_modules_beyond_the_few_that_name_their_role() -> None:
    flat = sorted(p.name for p in SRC.glob("*.py"))
    assert flat == ["__init__.py", "config.py", "errors.py", "pki.py", "up.py"]


def test_config_needs_no_part_of_shoal_that_runs() -> None:
    """Reading a config file must not import the agent, the controller or NATS code."""
    for name in imports_of(SRC / "config.py"):
        if name.startswith("shoal."):
            assert name.split(".")[1] in {"errors", "logic", "wire"}, name
