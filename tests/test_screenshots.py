"""The screenshots in docs/ and the README: a recorded 6000-step `bsmon demo` session, replayed at
80x24, 120x40 and 200x60. The snapshot tests keep them; `make screenshots` updates the snapshots
(look at them) and copies them to docs/.

The session (tests/data/demo-6000.bsr.gz and its GPU file) was recorded with
`bsmon demo --steps 6000 --headless` on a CPU machine, so the GPU panel says why there is none.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from bsmon import store
from bsmon.client import Feed
from bsmon.tui import BsmonApp

DATA = Path(__file__).parent / "data"
DOCS = Path(__file__).parent.parent / "docs"
SNAPSHOTS = Path(__file__).parent / "__snapshots__" / "test_screenshots"
SIZES = ["80x24", "120x40", "200x60"]


def demo_session(directory: Path) -> store.SessionInfo:
    """The recorded demo session, unpacked into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(DATA / "demo-6000.bsr.gz") as packed, open(directory / store.RECORDS_FILE, "wb") as records:
        shutil.copyfileobj(packed, records)
    shutil.copy(DATA / "demo-6000-gpu.bsr", directory / store.GPU_FILE)
    return store.session_info(directory)


@pytest.mark.parametrize("size", SIZES)
def test_demo_screen(snap_compare, tmp_path, size):
    info = demo_session(tmp_path / "demo")
    assert info.steps == 6000 and info.status == "finished"
    width, height = map(int, size.split("x"))
    assert snap_compare(BsmonApp(Feed().replay(info), mode="replay"), terminal_size=(width, height))


@pytest.mark.parametrize("size", SIZES)
def test_the_docs_show_the_snapshots(size):
    """docs/screen-WxH.svg are copies of the snapshots (`make screenshots`), so they never go stale."""
    snapshot = SNAPSHOTS / f"test_demo_screen[{size}].svg"
    assert (DOCS / f"screen-{size}.svg").read_text() == snapshot.read_text()
