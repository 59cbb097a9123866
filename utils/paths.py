"""Small file-system helpers shared by the journal and the model store."""

from __future__ import annotations

import contextlib
from pathlib import Path


def mkdir_private(directory: Path) -> None:
    """Create ``directory`` and its missing parents owner-only (0700 on POSIX).

    The journal holds account data and the models reveal the strategy: directories
    this process creates admit nobody else. Directories that exist already are left
    as they are (they may be shared on purpose).
    """
    missing: list[Path] = []
    current = directory
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        with contextlib.suppress(FileExistsError):
            created.mkdir(mode=0o700)
