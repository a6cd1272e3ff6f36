"""Shared by the benchmark scripts."""

from __future__ import annotations

import os


def write_table(lines: list[str], path: str) -> str:
    """Write the markdown table to `path` (creating its folder) and return it."""
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text
