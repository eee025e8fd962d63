"""Fixtures of the docker/ tests: the parsed Dockerfile and compose file."""

from __future__ import annotations

import pytest
from docker_files import Instruction, load_yaml, parse_dockerfile


@pytest.fixture(scope="session")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile()


@pytest.fixture(scope="session")
def compose() -> dict:
    return load_yaml("compose.yaml")
