"""Screenshots the browser tests keep in ``artifacts/``: the page as the test saw it, and what
it showed when the test failed (the first thing to look at)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


async def keep(page: Any, path: Path, what: str = "screenshot") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(path), full_page=True)
    print(f"{what}: {path}")
