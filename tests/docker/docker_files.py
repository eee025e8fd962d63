"""Readers shared by the docker/ tests: the Dockerfile as instructions, the YAML files, the CLIs' real variables."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from monitor.config import MonitorConfig
from peer.config import PeerConfig
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.flags import env_var

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


@dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined.

    Args:
        keyword: the instruction, upper case (FROM, RUN, ...).
        arguments: everything after the keyword.
        stage: name of the build stage it belongs to ("" before the first FROM).
    """

    keyword: str
    arguments: str
    stage: str


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions in order; comment lines dropped (also inside a continued instruction), continuations joined."""
    instructions, stage, pending = [], "", ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            named = re.search(r"\s+AS\s+(\S+)\s*$", arguments, flags=re.IGNORECASE)
            stage = named.group(1) if named else ""
        instructions.append(Instruction(keyword, " ".join(arguments.split()), stage))
    return instructions


def stage_instructions(instructions: list[Instruction], stage: str) -> list[Instruction]:
    return [instruction for instruction in instructions if instruction.stage == stage]


def env_keys(env_arguments: str) -> dict[str, str]:
    """KEY=VALUE pairs of one ENV instruction."""
    return dict(pair.split("=", 1) for pair in env_arguments.split())


def load_yaml(name: str):
    return yaml.safe_load((DOCKER / name).read_text())


def config_env_vars(*dataclass_types: type) -> set[str]:
    """The ALBERT_* variables the real CLIs read for these config dataclasses."""
    return {env_var(field.name) for dataclass_type in dataclass_types for field in fields(dataclass_type)}


PEER_ENV_VARS = config_env_vars(SwarmConfig, OptimConfig, PeerConfig)
MONITOR_ENV_VARS = config_env_vars(SwarmConfig, OptimConfig, MonitorConfig)


def stage_env(instructions: list[Instruction], stage: str) -> dict[str, str]:
    """Variables the ENV instructions of one stage set (inherited stages not included)."""
    env = {}
    for instruction in stage_instructions(instructions, stage):
        if instruction.keyword == "ENV":
            env.update(env_keys(instruction.arguments))
    return env
