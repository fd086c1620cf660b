"""The fault-injection suite reuses the training tests' data helpers (tests/training/sft_reward_helpers.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the suite forks stage runs
