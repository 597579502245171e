"""A small Dockerfile reader for the deployment tests: stages, instructions, ENV and exec-form commands.

It understands what our Dockerfiles use (line continuations, comments, `FROM ... AS name`, key=value ENV,
JSON exec form) and nothing more; an instruction it cannot read makes the test fail, not pass.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ...
    args: str  # the rest of the instruction, continuations joined
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT/CMD/HEALTHCHECK CMD (raises when shell form)."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text.split(" CMD ", 1)[1].strip()
        value = json.loads(text)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"line {self.line}: {self.keyword} is not in exec form")
        return value

    def flags(self) -> dict[str, str]:
        """Leading --flag=value options (COPY --from, --chmod; HEALTHCHECK --interval ...)."""
        out = {}
        for token in shlex.split(self.args):
            if not token.startswith("--"):
                break
            name, _, value = token[2:].partition("=")
            out[name] = value
        return out

    def operands(self) -> list[str]:
        """The arguments after the leading flags (shell-split)."""
        tokens = shlex.split(self.args)
        while tokens and tokens[0].startswith("--"):
            tokens.pop(0)
        return tokens


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV values in order, `$VAR` references to earlier ones left as written."""
        values: dict[str, str] = {}
        for inst in self.all("ENV"):
            for token in shlex.split(inst.args):
                key, sep, value = token.partition("=")
                if not sep:
                    raise ValueError(f"line {inst.line}: use ENV key=value")
                values[key] = value
        return values


def instructions(path: Path) -> list[Instruction]:
    """Every instruction of a Dockerfile, continuations joined and comments dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments are allowed inside a continued instruction too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(f"{path}: a continuation runs past the end of the file")
    return out


def build_args(path: Path) -> dict[str, str]:
    """The global ARGs (before the first FROM) with their defaults: what `docker build` uses unless
    given `--build-arg`."""
    out: dict[str, str] = {}
    for inst in instructions(path):
        if inst.keyword == "FROM":
            break
        if inst.keyword == "ARG":
            name, _, default = inst.args.partition("=")
            out[name.strip()] = default.strip()
    return out


def stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile, in order."""
    result: list[Stage] = []
    for inst in instructions(path):
        if inst.keyword == "FROM":
            words = inst.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(base=words[0], name=name))
        elif inst.keyword == "ARG" and not result:
            continue
        elif not result:
            raise ValueError(f"{path}: {inst.keyword} before the first FROM")
        else:
            result[-1].instructions.append(inst)
    return result
