"""Where the demo model shipped inside the package lives."""

from pathlib import Path

from .errors import OffloadError

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"


def demo_model_path() -> Path:
    if not (DEMO_DIR / "config.json").exists():
        raise OffloadError(
            f"the demo model is missing from this install ({DEMO_DIR}); reinstall moe-offload "
            "or pass a model directory"
        )
    return DEMO_DIR
