"""SQL text read the way PostgreSQL's lexer reads it: where literals and comments are.

Only what the library needs to handle SQL written by people and printed by PostgreSQL: the
end of a statement (a final ``;``, blanks and comments), whether a position lies inside a
string literal, a quoted identifier or a comment, and the top-level items of a parenthesised
list. String literals (``'...'``, ``E'...'`` with backslash escapes, dollar-quoted
``$tag$...$tag$``), quoted identifiers (``"..."``) and comments (``--`` to the end of the
line, ``/* ... */`` nested) are recognised as PostgreSQL does with
``standard_conforming_strings`` on, its default since 9.1.

>>> statement_body("SELECT 1 AS one; -- pasted from psql\\n")
'SELECT 1 AS one'
>>> [t.kind for t in tokens("SELECT 'a:b' -- c")]
['word', 'space', 'string', 'space', 'comment']
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "MultipleStatementsError",
    "Token",
    "context_at",
    "dollar_tag",
    "statement_body",
    "tokens",
    "top_level_items",
]


class MultipleStatementsError(ValueError):
    """SQL text holds more than one statement where one query was expected."""


@dataclass(frozen=True)
class Token:
    """A piece of SQL text.

    ``kind`` is one of ``"string"`` (any string literal, dollar-quoted bodies included),
    ``"ident"`` (a quoted identifier), ``"comment"``, ``"space"``, ``"punct"`` (one of
    ``( ) , ;``) and ``"word"`` (anything else: keywords, names, numbers, operators).
    """

    kind: str
    text: str
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.text)


_SPACE = re.compile(r"\s+")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")
_WORD = re.compile(r"[^\s'\"$(),;\-/]+|[\-/$]")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$\u0080-\uffff]")


def _quoted_end(sql: str, start: int, quote: str, backslash: bool) -> int:
    """Position after the literal opened at ``start`` (its end, when unterminated)."""
    i = start + 1
    while i < len(sql):
        ch = sql[i]
        if backslash and ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < len(sql) and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return len(sql)


def _block_comment_end(sql: str, start: int) -> int:
    depth = 0
    i = start
    while i < len(sql):
        pair = sql[i : i + 2]
        if pair == "/*":
            depth += 1
            i += 2
        elif pair == "*/":
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(sql)


def _escape_string_prefix(sql: str, quote_at: int) -> bool:
    """True when the quote at ``quote_at`` opens an ``E'...'`` literal."""
    if quote_at == 0 or sql[quote_at - 1] not in "eE":
        return False
    return quote_at < 2 or not _IDENT_CHAR.match(sql[quote_at - 2])


def tokens(sql: str) -> Iterator[Token]:
    """The tokens of ``sql``, in order; concatenated, they give ``sql`` back."""
    i = 0
    n = len(sql)
    while i < n:
        ch = sql[i]
        if ch.isspace():
            match = _SPACE.match(sql, i)
            assert match is not None
            end, kind = match.end(), "space"
        elif sql.startswith("--", i):
            newline = sql.find("\n", i)
            end, kind = (n if newline < 0 else newline), "comment"
        elif sql.startswith("/*", i):
            end, kind = _block_comment_end(sql, i), "comment"
        elif ch == "'":
            end, kind = _quoted_end(sql, i, "'", _escape_string_prefix(sql, i)), "string"
        elif ch == '"':
            end, kind = _quoted_end(sql, i, '"', False), "ident"
        elif ch == "$" and (i == 0 or not _IDENT_CHAR.match(sql[i - 1])):
            tag = _DOLLAR_TAG.match(sql, i)
            if tag is not None:
                close = sql.find(tag.group(), tag.end())
                end = n if close < 0 else close + len(tag.group())
                kind = "string"
            else:
                end, kind = i + 1, "word"
        elif ch in "(),;":
            end, kind = i + 1, "punct"
        else:
            match = _WORD.match(sql, i)
            assert match is not None
            end, kind = match.end(), "word"
        yield Token(kind, sql[i:end], i)
        i = end


def statement_body(sql: str) -> str:
    """``sql`` without what may follow the statement: blanks, comments and semicolons.

    Raises :class:`MultipleStatementsError` when a ``;`` separates two statements.

    >>> statement_body("SELECT 'a;b' /* c */ ;\\n-- end")
    "SELECT 'a;b'"
    """
    items = list(tokens(sql))
    last = len(items)
    while last and (items[last - 1].kind in ("space", "comment") or items[last - 1].text == ";"):
        last -= 1
    for item in items[:last]:
        if item.text == ";":
            raise MultipleStatementsError(
                f"more than one statement: a ';' at position {item.start} is followed by "
                f"{sql[item.end :].strip()[:40]!r}"
            )
    return sql[: items[last - 1].end] if last else ""


def context_at(sql: str, position: int) -> str:
    """The kind of token (see :class:`Token`) that holds the character at ``position``."""
    for token in tokens(sql):
        if token.start <= position < token.end:
            return token.kind
    return "space"


def top_level_items(sql: str, open_paren: int) -> tuple[list[str], int]:
    """The comma-separated items of the list opened at ``open_paren``, and its end.

    Commas inside nested parentheses, literals and identifiers do not separate items; each
    item is returned stripped. The end is the position just after the closing parenthesis.

    >>> top_level_items("(a, lower((b)), 'x,y') rest", 0)
    (['a', 'lower((b))', "'x,y'"], 22)
    """
    if sql[open_paren : open_paren + 1] != "(":
        raise ValueError(f"no '(' at position {open_paren} of {sql!r}")
    depth = 0
    items: list[str] = []
    begin = open_paren + 1
    for token in tokens(sql[open_paren:]):
        at = open_paren + token.start
        if token.kind != "punct":
            continue
        if token.text == "(":
            depth += 1
        elif token.text == ")":
            depth -= 1
            if depth == 0:
                items.append(sql[begin:at].strip())
                return [i for i in items if i], at + 1
        elif token.text == "," and depth == 1:
            items.append(sql[begin:at].strip())
            begin = at + 1
    raise ValueError(f"unbalanced parentheses in {sql!r}")


def dollar_tag(texts: Sequence[str], stem: str) -> str:
    """A ``$tag$`` that quotes each of ``texts``: it first occurs where it closes the text.

    >>> dollar_tag(["SELECT 'it''s'"], "q")
    '$q0$'
    >>> dollar_tag(["SELECT 1 AS x$q0"], "q")  # $q0$ would close it one character early
    '$q1$'
    """
    n = 0
    while True:
        tag = f"${stem}{n}$"
        if all((text + tag).find(tag) == len(text) for text in texts):
            return tag
        n += 1
