"""Client tests: respx unit tests, and the Dataverse SDK against a real broker process.

The integration test reuses the server repository's helpers (``tests.fake_idp``, ``tests.replicas``,
``tests.conftest.require``); the repository root is put on ``sys.path`` when it is there.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
if (REPO_ROOT / "tests" / "fake_idp.py").exists() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
