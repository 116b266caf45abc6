"""Rewrite the settings table in README.md from job/config.py (tests fail when they drift)."""

from pathlib import Path

from job.config import markdown_table

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def render(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"


if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "README.md"
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
