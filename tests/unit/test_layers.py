"""The layers of the code base, checked from every import (function-level and
type-checking-only ones included: each is a dependency all the same).

Every layer is imported as `captionstream.<layer>`: the folders `schemas/`, `ingest/`,
`processor/` and `gateway/` sit at the top of the repository and are linked into
`captionstream/` (the wheel installs only `captionstream`). Importing one under its bare
folder name would load a second copy of its modules, so no file may.

- `schemas` is pure: the events any client can read, so it imports nothing of the
  project but itself, and no Kafka, web or model library.
- `captionstream.kafka` is the Kafka layer every service builds on: it imports no service.
- `ingest` (validation, blob store, submission, bulk ingest) is shared by the gateway and
  the `ingest` command: it imports neither the gateway nor the processor.
- `processor` does not import the gateway.

`captionstream/cli.py` and `captionstream/__main__.py` wire everything together and are
not checked.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("schemas", "ingest", "processor", "gateway")  # top-level folders, in captionstream
SCANNED = (*LAYERS, "captionstream")
WIRING = frozenset({"captionstream/cli.py", "captionstream/__main__.py"})
PROJECT = ("captionstream", "bench", "tests")
NOT_PURE = ("kafka", "aiokafka", "faust", "fastapi", "httpx", "torch")


@dataclass(frozen=True)
class Rule:
    scope: str  # a dotted package: the rule holds for every module in it
    forbidden: tuple[str, ...]  # dotted module prefixes it must not import
    why: str

    def breaks(self, module: str) -> bool:
        if self.scope == SCHEMAS and within(module, SCHEMAS):
            return False  # itself
        return any(within(module, prefix) for prefix in self.forbidden)


SCHEMAS = "captionstream.schemas"
RULES = (
    Rule(
        SCHEMAS,
        (*PROJECT, *NOT_PURE),
        "schemas is pure: nothing of the project but itself, no Kafka, web or model library",
    ),
    Rule(
        "captionstream.kafka",
        ("captionstream.gateway", "captionstream.processor", "captionstream.ingest"),
        "the Kafka layer imports no service",
    ),
    Rule(
        "captionstream.ingest",
        ("captionstream.gateway", "captionstream.processor"),
        "ingest imports neither gateway nor processor",
    ),
    Rule(
        "captionstream.processor",
        ("captionstream.gateway",),
        "processor does not import gateway",
    ),
)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repository root
    line: int
    module: str  # absolute, dotted


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] in LAYERS:
        parts = ("captionstream", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool, path: str) -> Iterator[Import]:
    """Every module `source` imports, relative imports made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            if node.module is None:  # `from . import x`: x may be a module
                for alias in node.names:
                    yield Import(path, node.lineno, f"{base}.{alias.name}")
            else:
                yield Import(path, node.lineno, base)


def python_files(tops: tuple[str, ...]) -> list[Path]:
    """The .py files under the top-level folders `tops`, not through the layers' links
    inside captionstream/ (each file once, under its own folder)."""
    found = []
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            inside = path.relative_to(ROOT).parts
            if not (inside[0] == "captionstream" and inside[1] in LAYERS):
                found.append(path)
    return found


def project_imports() -> list[tuple[str, Import]]:
    """(importing module, import) for every checked file."""
    found = []
    for path in python_files(SCANNED):
        relative = path.relative_to(ROOT).as_posix()
        if relative in WIRING:
            continue
        module = module_name(path)
        source = path.read_text(encoding="utf-8")
        for imported in imports_of(source, module, path.name == "__init__.py", relative):
            found.append((module, imported))
    return found


def test_no_file_imports_a_layer_by_its_folder_name() -> None:
    everywhere = (*SCANNED, "bench", "tests")
    bare = []
    for path in python_files(everywhere):
        relative = path.relative_to(ROOT).as_posix()
        source = path.read_text(encoding="utf-8")
        for i in imports_of(source, module_name(path), path.name == "__init__.py", relative):
            if any(within(i.module, layer) for layer in LAYERS):
                bare.append(f"{i.path}:{i.line} imports {i.module}")
    assert len(python_files(everywhere)) > 150, "the scan looks in the wrong place"
    assert not bare, "import layers as captionstream.<layer>:\n" + "\n".join(bare)


@pytest.mark.parametrize("rule", RULES, ids=[rule.scope for rule in RULES])
def test_layers_import_only_what_they_may(rule: Rule) -> None:
    checked = [(m, i) for m, i in project_imports() if within(m, rule.scope)]
    assert checked, f"no imports found in {rule.scope}: the scan looks in the wrong place"
    violations = [
        f"{i.path}:{i.line} imports {i.module}" for m, i in checked if rule.breaks(i.module)
    ]
    assert not violations, f"{rule.why}:\n" + "\n".join(violations)


def test_the_import_scan_resolves_every_form_of_import() -> None:
    source = "\n".join(
        [
            "import gateway.app",
            "from processor import worker",
            "from . import sibling",
            "from .. import kafka",
            "from ..kafka.readers import polls",
            "def f():",
            "    import fastapi",
        ]
    )
    found = [i.module for i in imports_of(source, "captionstream.kafka.x", False, "x.py")]
    assert sorted(found) == [
        "captionstream.kafka",
        "captionstream.kafka.readers",
        "captionstream.kafka.sibling",
        "fastapi",
        "gateway.app",
        "processor",
    ]
    in_package = imports_of(
        "from .files import a", "captionstream.ingest.bulk", True, "ingest/bulk/__init__.py"
    )
    assert [i.module for i in in_package] == ["captionstream.ingest.bulk.files"]
    assert module_name(ROOT / "ingest" / "bulk" / "files.py") == "captionstream.ingest.bulk.files"
