"""Column mappings: how a retailer's raw files become the contract's tables, without code.

A mapping is a YAML file validated by the pydantic models below (unknown keys are rejected, every field
is described). Per contract table it says which files to read and how (csv, parquet or
whitespace-separated text), which source column feeds each contract column or which small expression
derives it, the date formats and the source time zone, the source columns to ignore on purpose, the item
codes that are not products, and how rows that share the table key are treated. It also says whether the
members and items tables are derived from the transactions when the source has none.

Built-in mappings live in ``features/mappings/``: ``demo`` (the synthetic generator's output, which uses
the contract's own names), ``cdnow`` and ``online-retail`` (the two public data sets).

Expressions are a small, safe language parsed with :mod:`ast` and interpreted over whole columns (never
``eval``). A bare name is a source column (``col('Unit Price')`` for names that are not identifiers);
literals are quoted strings, numbers, ``True``/``False``/``None``. Operations:

- arithmetic ``+ - * /`` and unary ``-`` on numbers; comparisons ``== != < <= > >=``; ``and or not``
- ``concat(a, b, ...)`` text concatenation; ``startswith(x, 'C')``, ``endswith(x, s)``
- ``upper(x)``, ``lower(x)``, ``strip(x)``, ``replace(x, old, new)``, ``last_word(x)``
- ``int_id(x)``: an integral number written as text without decimals (``17850.0`` -> ``17850``)
- ``abs(x)``, ``coalesce(a, b, ...)``, ``if_else(condition, a, b)``, ``col('name')``

Example::

    from features.mapping import load_mapping
    m = load_mapping("online-retail")
    m.tables["transactions"].columns["amount"].expr     # 'Quantity * UnitPrice'
    m.tables["transactions"].source_columns()           # every source column the mapping reads
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from features.contract import TABLES, TRANSACTIONS, C
from features.settings import read_yaml

MAPPINGS_DIR = Path(__file__).with_name("mappings")
BUILTIN_ALIASES = {"online-retail": "online_retail"}

TableName = Literal["transactions", "members", "items", "campaigns"]

FUNCTIONS: dict[str, tuple[int, int | None]] = {
    # name: (min args, max args or None for any)
    "col": (1, 1),
    "concat": (1, None),
    "startswith": (2, 2),
    "endswith": (2, 2),
    "upper": (1, 1),
    "lower": (1, 1),
    "strip": (1, 1),
    "replace": (3, 3),
    "last_word": (1, 1),
    "int_id": (1, 1),
    "abs": (1, 1),
    "coalesce": (1, None),
    "if_else": (3, 3),
}
_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)
_CMP_OPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


class MappingError(ValueError):
    """A mapping that cannot be loaded or used; the message names the file and the key."""


def parse_expression(text: str) -> tuple[ast.expr, tuple[str, ...]]:
    """Parse ``text`` into an expression tree of the allowed operations; return it and the source columns
    it reads. Raises MappingError naming the first construct that is not allowed."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise MappingError(f"expression {text!r} is not valid: {e.msg}") from None
    columns: list[str] = []

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            columns.append(node.id)
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, str | int | float | bool | type(None)):
                raise MappingError(f"expression {text!r}: literal {node.value!r} is not allowed")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, _BIN_OPS):
            check(node.left)
            check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.Not):
            check(node.operand)
        elif isinstance(node, ast.BoolOp):
            for v in node.values:
                check(v)
        elif isinstance(node, ast.Compare):
            if len(node.ops) != 1 or not isinstance(node.ops[0], _CMP_OPS):
                raise MappingError(f"expression {text!r}: only single comparisons (a < b) are allowed")
            check(node.left)
            check(node.comparators[0])
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in FUNCTIONS or node.keywords:
                raise MappingError(f"expression {text!r}: unknown function {ast.unparse(node.func)!r}; "
                                   f"allowed: {', '.join(FUNCTIONS)}")
            lo, hi = FUNCTIONS[name]
            if len(node.args) < lo or (hi is not None and len(node.args) > hi):
                raise MappingError(f"expression {text!r}: {name}() takes {lo}" + ("" if hi == lo else
                                   f" to {hi}" if hi else " or more") + f" arguments, got {len(node.args)}")
            if name == "col":
                arg = node.args[0]
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    raise MappingError(f"expression {text!r}: col() takes a quoted column name")
                columns.append(arg.value)
            else:
                for a in node.args:
                    check(a)
        else:
            raise MappingError(f"expression {text!r}: {ast.unparse(node)!r} is not an allowed operation")

    check(tree)
    return tree, tuple(dict.fromkeys(columns))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CsvOptions(_Model):
    """How a csv (or whitespace-separated) file is read."""

    delimiter: str = Field(",", description="Field separator (csv only; whitespace files split on runs of "
                           "blanks).")
    encoding: str = Field("utf-8", description="Text encoding (any Python codec name), or 'auto' to detect "
                          "it with charset-normalizer. A byte-order mark is skipped.")
    header: bool = Field(True, description="The first line holds the column names.")
    names: tuple[str, ...] | None = Field(None, description="Column names when header is false.")
    quotechar: str = Field('"', description="Quote character (csv only).")
    decimal: str = Field(".", description="Decimal separator of numbers.")
    thousands: str | None = Field(None, description="Thousands separator of numbers, removed before parsing.")

    @model_validator(mode="after")
    def _names(self) -> CsvOptions:
        if not self.header and not self.names:
            raise ValueError("csv.names must list the columns when csv.header is false")
        if self.encoding != "auto":
            import codecs

            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(f"unknown encoding {self.encoding!r}") from None
        return self


class ColumnSpec(_Model):
    """Where one contract column comes from: a source column or an expression over source columns."""

    source: str | None = Field(None, description="Source column copied into the contract column.")
    expr: str | None = Field(None, description="Expression over source columns (see the module docstring); "
                             "a quoted literal gives a constant.")
    format: str | tuple[str, ...] | None = Field(
        None, description="Timestamps: strptime format(s) tried in order (e.g. '%Y%m%d'); null: ISO 8601. "
        "Values with a UTC offset keep it; naive ones are in the table's time zone."
    )
    optional: bool = Field(False, description="The source column may be absent from a file; the contract "
                           "column is then null (or its default).")
    default: str | float | bool | None = Field(None, description="Value used where the source is missing.")

    @model_validator(mode="after")
    def _one_source(self) -> ColumnSpec:
        if (self.source is None) == (self.expr is None):
            raise ValueError("give exactly one of 'source' or 'expr'")
        if self.expr is not None:
            parse_expression(self.expr)
        return self

    def source_columns(self) -> tuple[str, ...]:
        if self.source is not None:
            return (self.source,)
        return parse_expression(self.expr or "")[1]


class NonProducts(_Model):
    """Item codes that are not products (postage, fees, discounts, ...): such lines are quarantined with the
    reason 'not a product line' so the counts still reconcile."""

    column: str = Field(description="Source column holding the item code.")
    values: tuple[str, ...] = Field((), description="Codes that are not products (exact match).")
    patterns: tuple[str, ...] = Field((), description="Regular expressions matched against the whole code.")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {e}") from None
        return v


class TableMapping(_Model):
    """How one contract table is read from its source files."""

    files: tuple[str, ...] = Field(description="Glob patterns, relative to a raw folder, of this table's "
                                   "files (used by sources_from_dir).")
    format: Literal["csv", "parquet", "whitespace"] = Field("csv", description="File format.")
    csv: CsvOptions = Field(default_factory=CsvOptions, description="Text file options (csv, whitespace).")
    timezone: str | None = Field(None, description="IANA time zone of naive timestamps in the source; null: "
                                 "settings.ingest.default_timezone.")
    columns: dict[str, ColumnSpec] = Field(description="Contract column -> its source. A plain string is "
                                           "the name of a source column.")
    ignore: tuple[str, ...] = Field((), description="Source columns deliberately not used. Any other "
                                    "source column the mapping does not read is an error.")
    non_products: NonProducts | None = Field(None, description="Item codes that are not products "
                                             "(transactions only).")
    drop_exact_duplicates: bool = Field(
        True, description="Quarantine rows equal in every mapped column to an earlier row ('duplicate of "
        "source row N'). Turn off where identical lines are separate real events (CDNOW)."
    )
    on_key_conflict: Literal["reject", "sum", "last"] = Field(
        "reject", description="Rows sharing the table key with different values: 'reject' keeps the first "
        "and quarantines the others; 'sum' (transactions only) adds quantity, amount and discount into one "
        "line at the earliest ts (the member must agree); 'last' keeps the last and quarantines the earlier "
        "ones as superseded."
    )

    @field_validator("columns", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"source": s} if isinstance(s, str) else s) for k, s in v.items()}
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {v!r}") from None
        return v

    def source_columns(self) -> tuple[str, ...]:
        """Every source column the mapping reads, in order of first use."""
        cols: list[str] = []
        for spec in self.columns.values():
            cols.extend(spec.source_columns())
        if self.non_products is not None:
            cols.append(self.non_products.column)
        return tuple(dict.fromkeys(cols))

    def required_source_columns(self) -> tuple[str, ...]:
        """Source columns every file must have (those of columns not marked optional)."""
        cols: list[str] = []
        for spec in self.columns.values():
            if not spec.optional:
                cols.extend(spec.source_columns())
        if self.non_products is not None:
            cols.append(self.non_products.column)
        return tuple(dict.fromkeys(cols))


class DeriveItems(_Model):
    """The items table built from the transactions: one row per item, category the item's most frequent
    transactions category, price the median unit price of its purchase lines."""

    name: str | None = Field(None, description="Expression over the transactions' source columns giving "
                             "the item name (most frequent value per item), e.g. 'Description'.")

    @field_validator("name")
    @classmethod
    def _expr(cls, v: str | None) -> str | None:
        if v is not None:
            parse_expression(v)
        return v


class Mapping(_Model):
    """A whole mapping: how a retailer's export becomes the contract's tables."""

    name: str = Field(description="Short name, shown in reports.")
    description: str = Field("", description="What the source is and any choices made in the mapping.")
    tables: dict[TableName, TableMapping] = Field(description="Per contract table, how it is read.")
    derive_members: bool = Field(False, description="Build the members table from the transactions "
                                 "(joined_at = first purchase) when the source has none.")
    derive_items: DeriveItems | None = Field(None, description="Build the items table from the "
                                             "transactions when the source has none.")
    check_references: bool = Field(True, description="Quarantine transactions and campaign rows whose "
                                   "member (or item) is not in the members (items) table, when one exists.")

    @model_validator(mode="after")
    def _consistent(self) -> Mapping:
        for tname, tm in self.tables.items():
            t = TABLES[tname]
            unknown = [c for c in tm.columns if c not in t.names]
            if unknown:
                raise ValueError(f"tables.{tname}.columns: {', '.join(unknown)} not in the contract's "
                                 f"{tname} table ({', '.join(t.names)})")
            filled = {C.CATEGORY, C.IS_RETURN, C.DISCOUNT} if tname == TRANSACTIONS.name else set()
            missing = [c for c in t.required if c not in tm.columns and c not in filled]
            if missing:
                raise ValueError(f"tables.{tname}.columns: required contract column(s) {', '.join(missing)} "
                                 "are not mapped")
            if tm.non_products is not None and tname != TRANSACTIONS.name:
                raise ValueError(f"tables.{tname}.non_products applies to transactions only")
            if tm.on_key_conflict == "sum" and tname != TRANSACTIONS.name:
                raise ValueError(f"tables.{tname}.on_key_conflict 'sum' applies to transactions only")
            both = set(tm.ignore) & set(tm.source_columns())
            if both:
                raise ValueError(f"tables.{tname}.ignore lists column(s) the mapping reads: "
                                 f"{', '.join(sorted(both))}")
        if (self.derive_members or self.derive_items) and TRANSACTIONS.name not in self.tables:
            raise ValueError("derive_members/derive_items need a transactions table")
        if self.derive_members and "members" in self.tables:
            raise ValueError("derive_members is set but the mapping also reads a members table")
        if self.derive_items is not None:
            if "items" in self.tables:
                raise ValueError("derive_items is set but the mapping also reads an items table")
            if C.CATEGORY not in self.tables[TRANSACTIONS.name].columns:
                raise ValueError("derive_items needs tables.transactions.columns.category (a source column, "
                                 "an expression or a constant such as \"'music'\")")
        return self


def builtin_mappings() -> tuple[str, ...]:
    """Names of the mappings shipped with the package."""
    names = sorted(p.stem for p in MAPPINGS_DIR.glob("*.yaml"))
    inverse = {v: k for k, v in BUILTIN_ALIASES.items()}
    return tuple(inverse.get(n, n) for n in names)


def load_mapping(mapping: Mapping | str | Path) -> Mapping:
    """A Mapping from a built-in name (``demo``, ``cdnow``, ``online-retail``), a YAML path, or itself."""
    if isinstance(mapping, Mapping):
        return mapping
    text = str(mapping)
    stem = BUILTIN_ALIASES.get(text, text.replace("-", "_"))
    builtin = MAPPINGS_DIR / f"{stem}.yaml"
    if isinstance(mapping, str) and "/" not in text and not text.endswith((".yaml", ".yml")):
        if not builtin.is_file():
            raise MappingError(f"no built-in mapping {text!r}; built-in: {', '.join(builtin_mappings())} "
                               "(or give the path of a YAML file)")
        path = builtin
    else:
        path = Path(mapping)
    data = read_yaml(path, "mapping file", MappingError)
    try:
        return Mapping.model_validate(data)
    except (ValidationError, MappingError) as e:
        if isinstance(e, MappingError):
            raise MappingError(f"mapping file {path}: {e}") from None
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise MappingError(f"invalid mapping file {path}:\n" + "\n".join(lines)) from None
