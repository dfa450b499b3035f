"""Where the tests find the checkout and the real data: one place, whatever folder a test module is in."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root: ``pyproject.toml``, ``README.md`` and the packages."""

XMARKET_DIR = REPO.parent / "shared" / "data" / "xmarket-electronics"
"""The real XMarket Electronics sample beside the checkout (tests that read it skip when it is absent)."""
