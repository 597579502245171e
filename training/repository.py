"""Writing model-repository entries atomically: stage in a hidden folder inside the repository, then rename.

An entry is ``REPO/NAME/config.json`` plus ``REPO/NAME/VERSION/model*.onnx``. Everything is built in
``REPO/.NAME.staging-XXXX/`` (same file system, so the final step is a rename); a failure at any point
removes the staging folder and leaves the repository as it was. Readers of the repository must skip
names that start with a dot.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from server.model_config import CONFIG_FILE, ModelConfig
from training.errors import UserError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Fields every version of one entry must share: a version's graph is only correct under these.
MODEL_DEFINING_FIELDS = ("labels", "image_size", "architecture", "pos_embed_interpolation", "preprocess")


@dataclass(frozen=True)
class EntryPlan:
    """Where an entry goes and what it replaces; made by `plan_entry` before any heavy work."""

    repo: Path
    name: str
    version: int
    replace_entry: bool  # the existing NAME/ is incompatible and --force was given: swap it whole
    replace_version: bool  # NAME/VERSION exists and --force was given

    @property
    def model_dir(self) -> Path:
        return self.repo / self.name

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)


def existing_versions(model_dir: Path) -> list[int]:
    """Version numbers present under a model folder, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _ensure_repo(repo: Path) -> None:
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"model repository {repo} cannot be created: {exc.strerror or exc}") from exc
    if not repo.is_dir():
        raise UserError(f"model repository {repo} is not a directory")
    if not os.access(repo, os.W_OK | os.X_OK):
        raise UserError(f"model repository {repo} is not writable")


def _conflicts(old: ModelConfig, new: ModelConfig) -> list[str]:
    return [f for f in MODEL_DEFINING_FIELDS if getattr(old, f) != getattr(new, f)]


def _existing_config(model_dir: Path) -> ModelConfig | str | None:
    """The entry's current config, an error string when it is unreadable, None when there is none."""
    if not (model_dir / CONFIG_FILE).is_file():
        return None
    try:
        return ModelConfig.load(model_dir)
    except (OSError, ValueError, ValidationError) as exc:
        return f"unreadable ({exc.__class__.__name__})"


def plan_entry(repo: Path, config: ModelConfig, version: int | None, *, force: bool = False) -> EntryPlan:
    """Check that `config` may be written as NAME/VERSION in `repo`; fail with one line if not.

    Args:
        repo: The model repository (created if missing).
        config: The new entry's config; its `name` is the folder name.
        version: Version number, or None for the latest existing one + 1.
        force: Replace an existing version, or an incompatible entry (dropping its other versions).
    """
    name = config.name
    if not NAME_PATTERN.match(name):
        raise UserError(
            f"model name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if version is not None and version < 1:
        raise UserError(f"version must be >= 1, got {version}")
    repo = Path(repo)
    _ensure_repo(repo)
    model_dir = repo / name
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"{model_dir} exists and is not a directory")
    versions = existing_versions(model_dir)
    version = version if version is not None else (versions[-1] + 1 if versions else 1)
    old = _existing_config(model_dir)
    replace_entry = False
    if old is not None:
        why = old if isinstance(old, str) else ", ".join(_conflicts(old, config))
        if why:
            if not force:
                raise UserError(
                    f"{model_dir / CONFIG_FILE} differs from this model ({why}); "
                    f"pass --force to replace the whole entry (drops versions {versions or 'none'})"
                )
            replace_entry = True
    replace_version = not replace_entry and version in versions
    if replace_version and not force:
        raise UserError(f"{model_dir / str(version)} already exists; pick another --version or pass --force")
    return EntryPlan(repo, name, version, replace_entry, replace_version)


@contextlib.contextmanager
def staged_entry(plan: EntryPlan, config: ModelConfig) -> Iterator[Path]:
    """Yield an empty staging folder for the version's files; on clean exit write config and rename in.

    Any exception inside the block (or during the commit) removes everything staged.
    """
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{plan.name}.staging-", dir=plan.repo))
    except OSError as exc:
        raise UserError(f"model repository {plan.repo} is not writable: {exc.strerror or exc}") from exc
    try:
        entry = stage / "entry"
        version_dir = entry / str(plan.version)
        version_dir.mkdir(parents=True)
        yield version_dir
        config.dump(entry)
        _commit(plan, stage, entry)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(plan: EntryPlan, stage: Path, entry: Path) -> None:
    model_dir = plan.model_dir
    if plan.replace_entry:
        os.rename(model_dir, stage / "replaced")
        try:
            os.rename(entry, model_dir)
        except OSError:
            os.rename(stage / "replaced", model_dir)
            raise
        return
    if not model_dir.exists():
        os.rename(entry, model_dir)
        return
    if plan.replace_version and plan.version_dir.exists():
        os.rename(plan.version_dir, stage / "replaced")
    try:
        os.rename(entry / str(plan.version), plan.version_dir)
    except OSError as exc:
        raise UserError(f"{plan.version_dir} appeared while exporting ({exc.strerror}); try again") from exc
    os.replace(entry / CONFIG_FILE, model_dir / CONFIG_FILE)
