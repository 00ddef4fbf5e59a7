"""Test set-up: 4 simulated CPU devices (sharding tests), parsed absl flags (grain workers)."""

import sys
from pathlib import Path

import jax
import pytest

# Must run before the first backend use.
jax.config.update("jax_num_cpu_devices", 4)

import absl.flags  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/ is importable as a package
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real H&E samples beside the project; tests that need them skip visibly without."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real H&E samples not found at {SHARED_DATA} (a user's clone has none)")
    return SHARED_DATA
