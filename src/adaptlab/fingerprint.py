"""Code fingerprints: which adaptlab modules a kind of run depends on, and a hash of their code (not their text).

A run's code is the transitive closure of the adaptlab modules its entry module imports (every ``import`` and
``from … import`` anywhere in a module, function-local ones included, plus the packages a module sits in, whose
``__init__`` runs on import). Each module is hashed over its syntax tree with docstrings removed, so comments,
docstrings and formatting do not count and any change to the code does. Imports are read from the source, not
executed: fingerprinting imports no torch and takes milliseconds, so the Snakefile can afford it at parse time.
Written by hand: no library fingerprints a Python import closure by its syntax tree.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path

import adaptlab

ROOT = Path(adaptlab.__file__).resolve().parent  # the adaptlab package directory
CORE_KINDS = ("pretrain", "finetune")  # run by adaptlab.runner; every other kind by its study's run module
# Modules that never compute a run's results: the tables, figures and claims built from finished records (a
# study package imports them for its surface), the run states, the CLI and this fingerprinting itself. Editing
# them must not make runs stale.
NOT_RUN_CODE = ("adaptlab.aggregate", "adaptlab.claims", "adaptlab.cli", "adaptlab.run_state", "adaptlab.fingerprint")


def _is_run_code(name: str) -> bool:
    return name not in NOT_RUN_CODE and not name.endswith(".claims")


def entry_module(kind: str, study: str | None) -> str:
    """The module whose import closure is the code of a run of ``kind`` (in ``study``)."""
    if kind in CORE_KINDS or not study:
        return "adaptlab.runner"
    return f"adaptlab.{study}.run"


def module_path(name: str) -> Path | None:
    """The source file of an adaptlab module (``adaptlab.a.b`` → a/b.py or a/b/__init__.py), or None."""
    parts = name.split(".")
    if parts[0] != "adaptlab":
        return None
    base = ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def _parsed(path: Path, mtime_ns: int) -> tuple[str, tuple[str, ...]]:
    """(code hash, adaptlab modules it imports) of one source file; cached per file version."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT).with_suffix("").parts  # a/b.py -> (a, b); a/__init__.py -> (a, __init__)
    package = ["adaptlab", *rel[:-1]]  # the package relative imports start from
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            imported.append(mod)
            imported += [f"{mod}.{a.name}" for a in node.names]  # `from pkg import submodule`
    deps = sorted({m for m in imported if m.split(".")[0] == "adaptlab" and module_path(m) is not None})
    digest = hashlib.sha256(ast.dump(_strip_docstrings(tree), include_attributes=False).encode()).hexdigest()[:16]
    return digest, tuple(deps)


def _module_info(name: str) -> tuple[str, tuple[str, ...]]:
    path = module_path(name)
    if path is None:
        raise KeyError(f"no adaptlab module {name!r} under {ROOT}")
    return _parsed(path, path.stat().st_mtime_ns)


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def module_hashes(entry: str) -> dict[str, str]:
    """{module: code hash} over the import closure of ``entry`` (sorted by module name)."""
    seen: dict[str, str] = {}
    todo = _with_parents(entry)
    while todo:
        name = todo.pop()
        if name in seen or module_path(name) is None or not _is_run_code(name):
            continue
        digest, deps = _module_info(name)
        seen[name] = digest
        for dep in deps:
            todo += _with_parents(dep)
    return dict(sorted(seen.items()))


def fingerprint(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def code_fingerprint(kind: str, study: str | None) -> str:
    """The fingerprint of the code a run of ``kind`` executes (what its records and, optionally, params carry)."""
    return fingerprint(module_hashes(entry_module(kind, study)))


def changed_modules(recorded: dict[str, str]) -> list[str]:
    """The modules of a run's recorded ``{module: hash}`` whose code differs now (or that are gone)."""
    changed = []
    for name, digest in recorded.items():
        try:
            current = _module_info(name)[0]
        except KeyError:  # the module is gone
            current = None
        if current != digest:
            changed.append(name)
    return changed
