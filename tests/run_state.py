"""What a server's out-dir says about a training, read the way tests that kill and restart it need."""

import json
from pathlib import Path

import torch


def rounds_in_history(out: Path) -> dict[int, dict]:
    """``history.json``'s rounds by number; empty before the server wrote one."""
    path = out / "history.json"
    if not path.exists():
        return {}
    return {entry["round"]: entry for entry in json.loads(path.read_text())["rounds"]}


def checkpointed_round(out: Path) -> int:
    """The round ``checkpoint.pt`` holds; 0 without one."""
    path = out / "checkpoint.pt"
    try:
        return int(torch.load(path, weights_only=True)["round"]) if path.exists() else 0
    except (RuntimeError, EOFError):  # caught between write and rename
        return 0
