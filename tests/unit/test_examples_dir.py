"""The example applications are found explicitly and every one of their files ships in a wheel."""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path

import pytest

from migsgx.lab import examples

ROOT = Path(__file__).resolve().parents[2]


def test_the_environment_names_the_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "kvstore").mkdir()
    (tmp_path / "kvstore" / "app.py").write_text("")
    monkeypatch.setenv(examples.ENV, str(tmp_path))
    assert examples.examples_dir() == tmp_path


def test_a_directory_without_the_examples_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(examples.ENV, str(tmp_path))
    assert examples.examples_dir() == ROOT / "examples"


def test_every_example_file_is_a_data_file_of_the_wheel() -> None:
    """``[tool.setuptools.data-files]`` lists each file of ``examples/`` (new ones too)."""

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = config["tool"]["setuptools"]["data-files"]
    shipped = {}
    for target, patterns in data_files.items():
        for pattern in patterns:
            for name in glob.glob(str(ROOT / pattern)):
                rel = Path(name).relative_to(ROOT)
                shipped[rel] = Path(target) / rel.name
    present = {
        p.relative_to(ROOT)
        for p in (ROOT / "examples").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert set(shipped) == present
    for source, target in shipped.items():
        # share/migsgx/examples/<same relative path>: examples_dir() finds them there.
        assert target == Path("share/migsgx") / source
