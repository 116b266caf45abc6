"""Pushing to the Hugging Face Hub (filled in by the publishing issue); the token lookup lives here."""

from __future__ import annotations

import os
from pathlib import Path


def token() -> str | None:
    """HF_TOKEN, or the contents of HF_TOKEN_FILE (a mounted Kubernetes/Slurm secret). Never logged."""
    value = os.environ.get("HF_TOKEN")
    if not value and os.environ.get("HF_TOKEN_FILE"):
        try:
            value = Path(os.environ["HF_TOKEN_FILE"]).read_text(encoding="utf-8").strip()
        except OSError:
            value = None
    return value or None
