"""A headless Chromium for the chat page's tests (Debian's `chromium`, driven by Playwright: its own
browser download is not needed)."""
from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    """Module-scoped: sync_playwright runs an asyncio loop in this thread while it is open, so later
    modules' asyncio.run() would fail if it outlived the page tests."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api")  # the test extra

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()
