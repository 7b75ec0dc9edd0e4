"""Where seqshare keeps its files. One place decides, so the CLI, worker and tests agree."""

from __future__ import annotations

import os
from pathlib import Path


def seqshare_home() -> Path:
    """The data directory: `$SEQSHARE_HOME`, else `$XDG_DATA_HOME/seqshare`, else ~/.local/share/seqshare."""
    if env := os.environ.get("SEQSHARE_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "seqshare"


def models_dir() -> Path:
    return seqshare_home() / "models"
