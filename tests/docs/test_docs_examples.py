"""Every ```python block of README.md and docs/*.md runs against a real server: docs cannot rot.

How pages are run:

- one test per page that has ``python`` blocks; the blocks run in page order, in one
  namespace (a real module, so ORM classes and dataclasses resolve their annotations) that
  starts with ``engine`` (a sync psycopg ``Engine`` on a fresh empty database) and ``url``
  (that database's ``sqlalchemy.URL``);
- fences may be indented (admonitions, content tabs) and may carry attributes
  (```` ```python title="models.py" ````); only the first word of the info string counts;
- ```` ```py ```` blocks are shown but not executed: use them for ``env.py`` fragments, shell
  sessions of other tools, and code that needs a server of its own;
- a failing block is reported as ``page:line`` with the part of the traceback that is in the
  page (line numbers are the page's own).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, first code line (1-based) and source."""

    language: str
    line: int
    source: str


def extract_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown page, in order (unterminated fences end the page)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        info = match["info"].strip()
        language = re.split(r"[\s{]", info, maxsplit=1)[0].lstrip(".").lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(Block(language, i + 2, textwrap.dedent("\n".join(body)) + "\n"))
        i = j + 1
    return blocks


def _pages() -> Iterator[Path]:
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))


def _runnable_pages() -> list[Path]:
    return [
        page
        for page in _pages()
        if page.is_file() and any(b.language == "python" for b in extract_blocks(page.read_text()))
    ]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _page_traceback(exc: BaseException, filename: str) -> str:
    frames = [
        frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == filename
    ]
    where = "".join(traceback.format_list(frames))
    return where + "".join(traceback.format_exception_only(type(exc), exc))


def run_page(page: Path, engine: sa.Engine, url: sa.URL) -> int:
    """Run every ``python`` block of ``page``; return how many ran. Fails the test on error."""
    rel = _page_id(page)
    module = types.ModuleType("docs_page_" + re.sub(r"\W", "_", rel))
    module.__file__ = str(page)
    module.__dict__.update(engine=engine, url=url)
    sys.modules[module.__name__] = module
    ran = 0
    try:
        for block in extract_blocks(page.read_text()):
            if block.language != "python":
                continue
            # Padding keeps the page's own line numbers in tracebacks.
            source = "\n" * (block.line - 1) + block.source
            failure: str | None = None
            try:
                code = compile(source, rel, "exec")
                exec(code, module.__dict__)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                failure = _page_traceback(exc, rel)
            if failure is not None:
                pytest.fail(
                    f"{rel}:{block.line}: the python block starting here failed:\n{failure}",
                    pytrace=False,
                )
            ran += 1
    finally:
        sys.modules.pop(module.__name__, None)
        for value in list(module.__dict__.values()):
            if isinstance(value, sa.Engine) and value is not engine:
                value.dispose()
    return ran


@pytest.mark.parametrize("page", _runnable_pages(), ids=_page_id)
def test_docs_page_examples_run(
    page: Path, engine: sa.Engine, pg_url: sa.URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pages that make their own engine from $DATABASE_URL (the README) get the test database.
    monkeypatch.setenv("DATABASE_URL", pg_url.render_as_string(hide_password=False))
    assert run_page(page, engine, pg_url) > 0


def test_readme_quick_start_runs_as_a_file(tmp_path: Path, pg_url: sa.URL) -> None:
    # What a reader does: paste the quick start's blocks into a file and run it, with
    # nothing injected but $DATABASE_URL.
    blocks = extract_blocks((ROOT / "README.md").read_text())
    python = [b.source for b in blocks if b.language == "python"]
    assert python, "README.md has no python block"
    script = tmp_path / "quickstart.py"
    script.write_text("\n".join(python))
    env = {**os.environ, "DATABASE_URL": pg_url.render_as_string(hide_password=False)}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_docs_pages_exist_and_have_examples() -> None:
    # The runner must not pass by finding nothing: the quick start is executable.
    runnable = {_page_id(p) for p in _runnable_pages()}
    assert "docs/index.md" in runnable


def test_extract_blocks_languages_indents_and_lines() -> None:
    text = textwrap.dedent(
        """\
        # Title

        ```python
        x = 1
        ```

        ```py
        not_run()
        ```

        !!! note
            ```python title="models.py"
            if x:
                y = 2
            ```

        ````python
        s = '''```'''
        ````
        """
    )
    blocks = extract_blocks(text)
    assert [(b.language, b.line) for b in blocks] == [
        ("python", 4),
        ("py", 8),
        ("python", 13),
        ("python", 18),
    ]
    assert blocks[2].source == "if x:\n    y = 2\n"
    assert blocks[3].source == "s = '''```'''\n"


def test_failing_block_reports_page_and_line(
    tmp_path: Path, engine: sa.Engine, pg_url: sa.URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    page = tmp_path / "broken.md"
    page.write_text(
        "Intro\n\n```python\nimport sqlalchemy as sa\n```\n\ntext\n\n```python\n"
        "with engine.connect() as conn:\n    conn.execute(sa.text('select nope'))\n```\n"
    )
    with pytest.raises(pytest.fail.Exception) as info:
        run_page(page, engine, pg_url)
    message = str(info.value)
    assert message.startswith("broken.md:10: ")
    assert 'File "broken.md", line 11' in message
    assert "UndefinedColumn" in message or "nope" in message


def test_every_executed_block_asserts_what_it_shows() -> None:
    # A block that only prints (or only declares) passes whatever the code does: each one
    # states its outcome with an assert, so the docs fail when the library changes.
    silent = [
        f"{_page_id(page)}:{block.line}"
        for page in _runnable_pages()
        for block in extract_blocks(page.read_text())
        if block.language == "python" and not re.search(r"\bassert\b", block.source)
    ]
    assert silent == [], "python blocks without an assert (use ```py if not run)"
