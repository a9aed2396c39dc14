"""Every name check matches the whole string: a trailing newline is not a name."""

from __future__ import annotations

import pytest

from migsgx.agent.protocol import check_image_name
from migsgx.containers.base import check_name
from migsgx.errors import MigSGXError, ProtocolError


@pytest.mark.parametrize("name", ["inventory.img\n", "pages-1.img\n\n", "a\nb", ".", ".."])
def test_image_names_with_newlines_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError):
        check_image_name(name)


def test_a_plain_image_name_passes() -> None:
    assert check_image_name("inventory.img") == "inventory.img"


@pytest.mark.parametrize("name", ["app\n", "app\nother", "-app"])
def test_container_names_with_newlines_are_refused(name: str) -> None:
    with pytest.raises(MigSGXError):
        check_name(name)
