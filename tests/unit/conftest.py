"""The ``world`` fixture of the unit tests: :func:`platform_fixtures.shared_world`.

A CA, platforms and author keys, made once per session; a module that needs a
world of its own defines its own ``world`` fixture, which takes precedence.
(The integration modules register theirs one by one: there a conftest fixture
would shadow the ``world`` of the ``state_helpers`` plugin.)
"""

from __future__ import annotations

import pytest
from platform_fixtures import World, shared_world


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()
