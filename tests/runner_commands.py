"""The workflow commands GitHub's runner would obey in a step's output, read with its own rules
(actions/runner, ActionCommandManager and ActionCommand): a line is a command when, after leading
whitespace, it starts with `::name[ props]::data` (v2), or when it holds `##[name[ props]]data` anywhere
(v1). `::stop-commands::TOKEN` turns all commands off until a line `::TOKEN::`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    properties: str
    data: str
    line: int


def obeyed(output: str) -> list[Command]:
    """Every command the runner would run, in order."""
    commands, resume_token = [], None
    for number, line in enumerate(output.splitlines(), start=1):
        command = _parse_v2(line, number) or _parse_v1(line, number)
        if command is None:
            continue
        if resume_token is not None:
            if command.name == resume_token:
                resume_token = None
            continue
        if command.name == "stop-commands":
            resume_token = command.data
        commands.append(command)
    return commands


def _parse_v2(line: str, number: int) -> Command | None:
    message = line.lstrip()  # .NET TrimStart: Unicode whitespace only, not format characters
    if not message.startswith("::"):
        return None
    end = message.find("::", 2)
    if end < 0:
        return None
    info, data = message[2:end], message[end + 2:]
    name, _, properties = info.partition(" ")
    return Command(name, properties, data, number) if name else None


def _parse_v1(line: str, number: int) -> Command | None:
    start = line.find("##[")
    if start < 0:
        return None
    end = line.find("]", start)
    if end < 0:
        return None
    info, data = line[start + 3:end], line[end + 1:]
    name, _, properties = info.partition(" ")
    return Command(name, properties, data, number) if name else None
