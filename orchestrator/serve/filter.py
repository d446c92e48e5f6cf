"""Project Haystack filters (``point and his and siteRef->area > 1000m²``): parsed into a small
AST, then compiled to one SQL predicate over records whose tags are ``jsonb`` (the devices'
metadata in PostgreSQL, and the sites and points the server derives from buildings and readings).

Why SQL: the filter runs where the device metadata lives, so a read of a few points out of
thousands of imported devices returns only those rows. Tags are stored as the importer writes
them (orchestrator/metadata/haystack.py): a marker is ``true``, a ref its bare id, a number with a
unit ``{"val", "unit"}``, other values as JSON. Every value from a filter reaches SQL as a literal
(psycopg quotes it); tag names are jsonb keys, never identifiers.

Semantics (Haystack's): ``name`` matches when the tag is present, ``not name`` when absent;
a comparison matches only when the tag is present and of the compared kind; ``a->b`` follows the
ref in tag ``a`` to that record's tag ``b``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any, Literal

from psycopg import sql

from orchestrator.serve import zinc
from orchestrator.serve.kinds import Number, Ref, Symbol, Uri

CmpOp = Literal["==", "!=", "<", "<=", ">", ">="]
_OPS: tuple[CmpOp, ...] = ("==", "!=", "<=", ">=", "<", ">")
_NAME = re.compile(r"[a-z_][A-Za-z0-9_]*")
_MAX_DEPTH = 4  # a->b->c->d: each step is a lookup


@dataclass(frozen=True)
class Has:
    path: tuple[str, ...]


@dataclass(frozen=True)
class Missing:
    path: tuple[str, ...]


@dataclass(frozen=True)
class Cmp:
    path: tuple[str, ...]
    op: CmpOp
    value: Any


@dataclass(frozen=True)
class And:
    left: Node
    right: Node


@dataclass(frozen=True)
class Or:
    left: Node
    right: Node


Node = Has | Missing | Cmp | And | Or


class _Parser(zinc._Reader):
    def skip(self) -> None:
        while not self.eof() and self.peek() in " \t\r\n":
            self.pos += 1

    def keyword(self, word: str) -> bool:
        self.skip()
        end = self.pos + len(word)
        if self.text[self.pos : end] == word and not re.match(r"[A-Za-z0-9_]", self.text[end : end + 1]):
            self.pos = end
            return True
        return False

    def filter(self) -> Node:
        node = self.cond_and()
        while self.keyword("or"):
            node = Or(node, self.cond_and())
        return node

    def cond_and(self) -> Node:
        node = self.term()
        while self.keyword("and"):
            node = And(node, self.term())
        return node

    def path(self) -> tuple[str, ...]:
        self.skip()
        names = [self.filter_name()]
        while self.peek(2) == "->":
            self.pos += 2
            names.append(self.filter_name())
        if len(names) > _MAX_DEPTH:
            raise self.fail(f"a path follows at most {_MAX_DEPTH - 1} refs")
        return tuple(names)

    def filter_name(self) -> str:
        m = self.match(_NAME)
        if not m or m.group(0) in ("and", "or", "not"):
            raise self.fail("expected a tag name")
        return m.group(0)

    def term(self) -> Node:
        self.skip()
        if self.peek() == "(":
            self.pos += 1
            node = self.filter()
            self.skip()
            self.expect(")")
            return node
        if self.keyword("not"):
            return Missing(self.path())
        path = self.path()
        self.skip()
        for op in _OPS:
            if self.peek(len(op)) == op:
                self.pos += len(op)
                self.skip()
                return Cmp(path, op, self.filter_value())
        return Has(path)

    def filter_value(self) -> Any:
        if self.keyword("true"):
            return True
        if self.keyword("false"):
            return False
        start = self.pos
        value = self.value()
        if value is None or isinstance(value, list | dict):
            raise self.fail("a filter compares with a bool, str, number, ref, uri, symbol, date, time or dateTime", start)
        return value


def parse(text: str, source: str = "filter") -> Node:
    """The AST of a filter; InputError at the place of a syntax error."""
    p = _Parser(text, source)
    p.skip()
    if p.eof():
        raise p.fail("empty filter")
    node = p.filter()
    p.skip()
    if not p.eof():
        raise p.fail(f"unexpected {p.peek()!r}")
    return node


# ---------------------------------------------------------------- SQL


def _tag(path: tuple[str, ...], recs: sql.Composable, row: str) -> sql.Composable:
    """The jsonb value at ``path`` from record ``row`` (following refs through ``recs``)."""
    expr: sql.Composable = sql.SQL("{}.tags -> {}").format(sql.Identifier(row), sql.Literal(path[0]))
    for depth, name in enumerate(path[1:], 1):
        alias = sql.Identifier(f"_d{depth}")
        expr = sql.SQL("(SELECT {a}.tags -> {name} FROM {recs} {a} WHERE {a}.id = ({prev} #>> '{{}}') LIMIT 1)").format(
            a=alias, name=sql.Literal(name), recs=recs, prev=expr
        )
    return expr


def _present(v: sql.Composable) -> sql.Composable:
    return sql.SQL("coalesce(jsonb_typeof({}), 'null') <> 'null'").format(v)


def _cmp(v: sql.Composable, op: CmpOp, value: Any) -> sql.Composable:
    sql_op = sql.SQL("<>" if op == "!=" else "=" if op == "==" else op)
    if isinstance(value, bool):
        return sql.SQL("(jsonb_typeof({v}) = 'boolean' AND ({v})::boolean {op} {x})").format(v=v, op=sql_op, x=sql.Literal(value))
    if isinstance(value, Number):
        number = sql.SQL(
            "(CASE WHEN jsonb_typeof({v}) = 'number' THEN ({v} #>> '{{}}')::float8 "
            "WHEN jsonb_typeof({v} -> 'val') = 'number' THEN ({v} ->> 'val')::float8 END)"
        ).format(v=v)
        unit = sql.SQL(" AND ({v} ->> 'unit') = {u}").format(v=v, u=sql.Literal(value.unit)) if value.unit else sql.SQL("")
        return sql.SQL("({n} {op} {x}{unit})").format(n=number, op=sql_op, x=sql.Literal(value.val), unit=unit)
    if isinstance(value, Ref | Uri | Symbol):
        text = value.val
    elif isinstance(value, (datetime, date | time)):
        text = value.isoformat()
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(f"a filter cannot compare with {value!r}")  # the parser admits only the kinds above
    return sql.SQL("(jsonb_typeof({v}) = 'string' AND ({v} #>> '{{}}') COLLATE \"C\" {op} {x})").format(
        v=v, op=sql_op, x=sql.Literal(text)
    )


def to_sql(node: Node, recs: sql.Composable, row: str = "r") -> sql.Composable:
    """A predicate on record ``row`` of relation ``recs`` (columns ``id text, tags jsonb``)."""
    if isinstance(node, Has):
        return _present(_tag(node.path, recs, row))
    if isinstance(node, Missing):
        return sql.SQL("NOT {}").format(_present(_tag(node.path, recs, row)))
    if isinstance(node, Cmp):
        return _cmp(_tag(node.path, recs, row), node.op, node.value)
    if isinstance(node, And):
        return sql.SQL("({} AND {})").format(to_sql(node.left, recs, row), to_sql(node.right, recs, row))
    return sql.SQL("({} OR {})").format(to_sql(node.left, recs, row), to_sql(node.right, recs, row))


def matches(node: Node, tags: dict[str, Any], lookup: dict[str, dict[str, Any]]) -> bool:
    """The same semantics in Python over jsonb-shaped tags (for the unit tests' cross-check and for
    records that never reach SQL)."""

    def at(path: tuple[str, ...]) -> Any:
        value: Any = tags.get(path[0])
        for name in path[1:]:
            target = lookup.get(value) if isinstance(value, str) else None
            value = None if target is None else target.get(name)
        return value

    if isinstance(node, Has):
        return at(node.path) is not None
    if isinstance(node, Missing):
        return at(node.path) is None
    if isinstance(node, And):
        return matches(node.left, tags, lookup) and matches(node.right, tags, lookup)
    if isinstance(node, Or):
        return matches(node.left, tags, lookup) or matches(node.right, tags, lookup)
    v = at(node.path)
    x = node.value
    if isinstance(x, bool):
        if not isinstance(v, bool):
            return False
        a: Any = v
        b: Any = x
    elif isinstance(x, Number):
        if isinstance(v, dict) and isinstance(v.get("val"), int | float) and not isinstance(v.get("val"), bool):
            if x.unit and v.get("unit") != x.unit:
                return False
            a = float(v["val"])
        elif isinstance(v, int | float) and not isinstance(v, bool) and not x.unit:
            a = float(v)
        else:
            return False
        b = x.val
    else:
        if not isinstance(v, str):
            return False
        a = v.encode()
        b = (x.val if isinstance(x, Ref | Uri | Symbol) else x if isinstance(x, str) else x.isoformat()).encode()
    return bool({"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[node.op])
