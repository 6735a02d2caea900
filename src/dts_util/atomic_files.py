"""Small files written whole: under a temporary name of their own, then renamed into place.

Several servers may share a model store and an engine cache, and write the same file at the same
moment (an engine's manifest, the weights-fingerprint cache). A fixed temporary name would let one
rename the other's half-written file away; a unique one leaves every reader a complete file,
whichever writer lands last.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` in one rename; the temporary file is removed if anything fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".partial-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)  # mkstemp creates it owner-only
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
