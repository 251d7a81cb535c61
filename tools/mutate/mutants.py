"""The mutants of one module: small changes a reviewer would make to test the tests.

Each mutant replaces one node of the module's syntax tree; the module is then written back
with `ast.unparse` (comments and layout go, behaviour stays). Operators:

- compare: `<`/`<=`, `>`/`>=`, `==`/`!=`, `is`/`is not`, `in`/`not in` swapped
- negate: the condition of an `if`, `while`, conditional expression or comprehension negated
- not: a `not` removed
- boolop: `and`/`or` swapped
- arith: `+`/`-` swapped (also in `+=`/`-=`)
- constant: a number one more, `True`/`False` swapped
- raise: a `raise` replaced by `pass`
- call: a call made for its effect (a statement) replaced by `pass`
- loop: `break`/`continue` swapped
- return: the function returns at once

Not mutated, because no test could notice: annotations (not evaluated under `from __future__
import annotations`), `assert`s, f-strings, logging calls and `if TYPE_CHECKING:` blocks.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

Change = Callable[[ast.AST], "ast.AST | list[ast.stmt]"]

SNIPPET_MAX: Final = 90
LOGGER_NAMES: Final = frozenset({"LOGGER", "logging", "logger", "log"})

_COMPARE_SWAP: Final[dict[type[ast.cmpop], type[ast.cmpop]]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_ARITH_SWAP: Final[dict[type[ast.operator], type[ast.operator]]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
}


@dataclass(frozen=True)
class Site:
    """Where a change applies: a child (or list item) of the node at `parent` in walk order."""

    parent: int
    attribute: str
    position: int | None
    change: Change = field(compare=False)


@dataclass(frozen=True)
class Mutant:
    path: str
    line: int
    scope: str
    operator: str
    before: str
    after: str
    occurrence: int
    site: Site = field(compare=False, repr=False)

    @property
    def key(self) -> str:
        """Names the mutant without its line number, so that it survives unrelated edits;
        the allow-list of equivalent mutants uses it."""
        suffix = f" #{self.occurrence}" if self.occurrence > 1 else ""
        return f"{self.path} {self.scope}: `{self.before}` -> `{self.after}`{suffix}"

    def describe(self) -> str:
        suffix = f" #{self.occurrence}" if self.occurrence > 1 else ""
        return (
            f"{self.path}:{self.line} {self.scope}: `{self.before}` -> `{self.after}`{suffix}"
            f"  [{self.operator}]"
        )


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_MAX else flat[: SNIPPET_MAX - 3] + "..."


def _negate(node: ast.AST) -> ast.AST:
    assert isinstance(node, ast.expr)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return node.operand
    return ast.UnaryOp(op=ast.Not(), operand=node)


def _is_logging_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    while isinstance(func, ast.Attribute):
        func = func.value
    return isinstance(func, ast.Name) and func.id in LOGGER_NAMES


def _is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _is_stub_body(body: list[ast.stmt]) -> bool:
    first = body[0]
    if isinstance(first, ast.Pass):
        return True
    if _is_docstring(first):
        return True  # a body that is only a docstring returns at once already
    return (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and first.value.value is ...
    )


def _skipped(name: str, child: ast.AST) -> bool:
    if name in ("annotation", "returns"):
        return True
    if isinstance(child, ast.Assert | ast.JoinedStr) or _is_logging_call(child):
        return True
    if isinstance(child, ast.Expr) and _is_logging_call(child.value):
        return True
    return (
        isinstance(child, ast.If)
        and isinstance(child.test, ast.Name)
        and child.test.id == "TYPE_CHECKING"
    )


class _Collector:
    def __init__(self, path: str, source: str, tree: ast.Module) -> None:
        self.path = path
        self.source = source
        self.index = {id(node): i for i, node in enumerate(ast.walk(tree))}
        self.found: list[tuple[int, str, str, str, str, Site]] = []

    def segment(self, node: ast.AST) -> str:
        text = ast.get_source_segment(self.source, node)
        return _snippet(text if text is not None else ast.unparse(node))

    def add(
        self,
        operator: str,
        scope: str,
        parent: ast.AST,
        name: str,
        position: int | None,
        change: Change,
        shown: ast.AST | None = None,
        texts: tuple[str, str] | None = None,
    ) -> None:
        """Record a site; `shown` (default: the replaced child) is what the report prints,
        unless `texts` gives the before and after."""
        child = getattr(parent, name) if position is None else getattr(parent, name)[position]
        shown = shown if shown is not None else child
        before = self.segment(shown)
        if texts is not None:
            before, after = texts
        elif shown is child:
            result = change(copy.deepcopy(child))
            after = (
                "; ".join(ast.unparse(stmt) for stmt in result)
                if isinstance(result, list)
                else ast.unparse(result)
            )
        else:
            shown_copy = copy.deepcopy(shown)
            target = getattr(shown_copy, name)
            if position is None:
                setattr(shown_copy, name, change(target))
            else:
                target[position] = change(target[position])
            after = ast.unparse(shown_copy)
        line = getattr(shown, "lineno", getattr(parent, "lineno", 0))
        site = Site(self.index[id(parent)], name, position, change)
        self.found.append((line, scope, operator, before, _snippet(after), site))

    def visit(self, node: ast.AST, scope: str) -> None:
        self.node_sites(node, scope)
        for name, value in ast.iter_fields(node):
            items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
            for position, child in items:
                if not isinstance(child, ast.AST) or _skipped(name, child):
                    continue
                child_scope = scope
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    child_scope = f"{scope}.{child.name}" if scope != "<module>" else child.name
                self.child_sites(node, name, position, child, scope)
                self.visit(child, child_scope)

    def node_sites(self, node: ast.AST, scope: str) -> None:
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                swap = _replace_with(_COMPARE_SWAP[type(op)])
                self.add("compare", scope, node, "ops", i, swap, shown=node)
        elif isinstance(node, ast.BoolOp):
            other = _replace_with(ast.Or if isinstance(node.op, ast.And) else ast.And)
            self.add("boolop", scope, node, "op", None, other, shown=node)
        elif isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _ARITH_SWAP:
            arith = _replace_with(_ARITH_SWAP[type(node.op)])
            self.add("arith", scope, node, "op", None, arith, shown=node)
        elif isinstance(node, ast.If | ast.While | ast.IfExp):
            if not _negation_of_compare(node.test):
                self.add("negate", scope, node, "test", None, _negate)
        elif isinstance(node, ast.comprehension):
            for i, test in enumerate(node.ifs):
                if not _negation_of_compare(test):
                    self.add("negate", scope, node, "ifs", i, _negate)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            start = 1 if _is_docstring(body[0]) and len(body) > 1 else 0
            if not _is_stub_body(body[start:]) and not isinstance(body[start], ast.Return):
                self.add(
                    "return", scope, node, "body", start, _early_return, texts=("body", "return")
                )

    def child_sites(
        self, node: ast.AST, name: str, position: int | None, child: ast.AST, scope: str
    ) -> None:
        if isinstance(child, ast.Raise):
            self.add("raise", scope, node, name, position, lambda _: ast.Pass())
        elif isinstance(child, ast.Expr) and not _is_docstring(child):
            value = child.value.value if isinstance(child.value, ast.Await) else child.value
            if isinstance(value, ast.Call):
                self.add("call", scope, node, name, position, lambda _: ast.Pass())
        elif isinstance(child, ast.Break):
            self.add("loop", scope, node, name, position, lambda _: ast.Continue())
        elif isinstance(child, ast.Continue):
            self.add("loop", scope, node, name, position, lambda _: ast.Break())
        elif (
            isinstance(child, ast.UnaryOp)
            and isinstance(child.op, ast.Not)
            and name not in ("test", "ifs")
        ):
            self.add("not", scope, node, name, position, _negate)
        elif isinstance(child, ast.Constant):
            if isinstance(child.value, bool):
                self.add("constant", scope, node, name, position, _flip_bool)
            elif isinstance(child.value, int | float):
                self.add("constant", scope, node, name, position, _plus_one)


def _replace_with(kind: type[ast.AST]) -> Change:
    """A change that puts a new node of `kind` (an operator) in place of the old one."""
    return lambda _: kind()


def _negation_of_compare(test: ast.expr) -> bool:
    """`not (a == b)` is the compare operator's mutant `a != b` again: made once only."""
    return (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq | ast.NotEq | ast.Is | ast.IsNot | ast.In | ast.NotIn)
    )


def _early_return(node: ast.AST) -> list[ast.stmt]:
    assert isinstance(node, ast.stmt)
    return [ast.Return(value=None), node]


def _flip_bool(node: ast.AST) -> ast.AST:
    assert isinstance(node, ast.Constant)
    return ast.Constant(value=not node.value)


def _plus_one(node: ast.AST) -> ast.AST:
    assert isinstance(node, ast.Constant) and isinstance(node.value, int | float)
    return ast.Constant(value=node.value + 1)


def mutants(path: str, source: str) -> list[Mutant]:
    """Every mutant of the module at `path` (relative to the repository root)."""
    tree = ast.parse(source)
    collector = _Collector(path, source, tree)
    collector.visit(tree, "<module>")
    seen: dict[tuple[str, str, str], int] = {}
    found: list[Mutant] = []
    for line, scope, operator, before, after, site in collector.found:
        if before == after:
            continue
        count = seen[(scope, before, after)] = seen.get((scope, before, after), 0) + 1
        found.append(Mutant(path, line, scope, operator, before, after, count, site))
    return found


def apply(source: str, mutant: Mutant) -> str:
    """The module's source with the mutant's one change."""
    tree = ast.parse(source)
    nodes: list[ast.AST] = list(ast.walk(tree))
    site = mutant.site
    parent = nodes[site.parent]
    if site.position is None:
        setattr(parent, site.attribute, site.change(getattr(parent, site.attribute)))
    else:
        items = getattr(parent, site.attribute)
        result = site.change(items[site.position])
        items[site.position : site.position + 1] = result if isinstance(result, list) else [result]
    return ast.unparse(ast.fix_missing_locations(tree))


def unchanged(source: str) -> str:
    """The module written back by `ast.unparse` without a change (checked to compile to the
    same tree, so that a mutant differs from the original by its one change only)."""
    tree = ast.parse(source)
    text = ast.unparse(tree)
    if ast.dump(ast.parse(text)) != ast.dump(tree):
        raise ValueError("ast.unparse does not round-trip this module")
    return text
