"""The model store: a manifest of models and files, hash-verified resolution, pull and import.

Files are looked up, in order, in the manifest's own folder (project-trained heads are committed there),
the store's download cache (``<store>/files``) and the offline weights folder (``RLPIPS_WEIGHTS_DIR``).
Every file is verified against the manifest's digest before use; a missing or wrong file raises
:class:`WeightsError` naming the file, the expected hash and how to obtain it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.metric.loaders import head_weights, read_state, trunk_state
from app.metric.lpips import LPIPS, Heads
from app.metric.trunks import Trunk, TrunkArch, build_trunk

log = logging.getLogger(__name__)

DEFAULT_STORE = Path(__file__).resolve().parents[2] / "model_store"

#: LPIPS v0.1 with the AlexNet trunk: the reference point every comparison is made against.
BASELINE_MODEL = "lpips-alex"


class WeightsError(RuntimeError):
    """A weights file is missing, truncated, corrupt or of the wrong layout."""


class Digest(BaseModel):
    """One accepted identity of a file: full sha256, torch.hub 8-hex sha256 prefix, or git blob id."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["sha256", "sha256_prefix", "git_blob"]
    value: str
    note: str = ""

    def matches(self, data_sha256: str, data_blob: str) -> bool:
        if self.kind == "sha256":
            return data_sha256 == self.value
        if self.kind == "sha256_prefix":
            return data_sha256.startswith(self.value)
        return data_blob == self.value

    def __str__(self) -> str:
        return f"{self.kind} {self.value}"


class FileEntry(BaseModel):
    """A weights file: where it comes from and how to recognise it."""

    model_config = ConfigDict(extra="forbid")
    filename: str
    aliases: list[str] = Field(default_factory=list)
    url: str | None = None
    digests: list[Digest] = Field(min_length=1)
    license: str
    size: int | None = None
    description: str = ""

    @property
    def names(self) -> list[str]:
        return [self.filename, *self.aliases]


class TrunkRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: TrunkArch
    file: str


class Calibration(BaseModel):
    """How a model's default threshold was chosen (``rlpips evaluate thresholds``, docs/CALIBRATION.md):
    the largest threshold at which at most ``false_match_rate`` of ``pairs`` unrelated natural-image
    pairs match (``false_matches`` of them did)."""

    model_config = ConfigDict(extra="forbid")
    false_match_rate: float = Field(gt=0, lt=1)
    false_matches: int = Field(ge=0)
    pairs: int = Field(ge=1)
    images: str = Field(description="which unrelated images, views and resolution")


class ModelEntry(BaseModel):
    """A servable metric: a trunk file, a heads file and a default near-duplicate threshold (with how
    it was calibrated, when it was)."""

    model_config = ConfigDict(extra="forbid")
    trunk: TrunkRef
    heads: str
    variant: str
    source: str
    threshold: float = Field(ge=0)
    calibration: Calibration | None = None
    card: str
    bank_projection: str | None = Field(
        None, description="file of the bank embedding's projection (app.bank.projection)"
    )


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal[1]
    default: str
    files: dict[str, FileEntry]
    models: dict[str, ModelEntry]

    @model_validator(mode="after")
    def _references_exist(self) -> Manifest:
        if self.default not in self.models:
            raise ValueError(f"default model {self.default!r} is not in models")
        for name, m in self.models.items():
            for ref in (m.trunk.file, m.heads, *filter(None, [m.bank_projection])):
                if ref not in self.files:
                    raise ValueError(f"model {name!r} names unknown file {ref!r}")
        return self


def file_hashes(path: Path) -> tuple[str, str]:
    """``(sha256, git blob id)`` of a file, read once in chunks."""
    sha = hashlib.sha256()
    blob = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
            blob.update(chunk)
    return sha.hexdigest(), blob.hexdigest()


@dataclass(frozen=True)
class FileStatus:
    """Outcome of looking for one file: ``path`` and its ``sha256`` are set only when a verified copy
    was found, ``problem`` only when none was."""

    file_id: str
    path: Path | None
    problem: str | None
    sha256: str | None = None


class ModelStore:
    """Reads ``manifest.json`` under ``root`` and resolves, verifies and loads its files."""

    def __init__(
        self,
        root: Path = DEFAULT_STORE,
        weights_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.root = root
        self.weights_dir = weights_dir
        self.cache_dir = cache_dir or root / "files"
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise WeightsError(f"no model store manifest at {manifest_path}")
        self.manifest = Manifest.model_validate_json(manifest_path.read_text())
        self._verified: dict[tuple[str, int, int], str] = {}

    @cached_property
    def names(self) -> list[str]:
        return list(self.manifest.models)

    def model(self, name: str) -> ModelEntry:
        try:
            return self.manifest.models[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(self.names)}") from None

    def how_to_get(self, file_id: str) -> str:
        entry = self.manifest.files[file_id]
        where = (
            f"download {entry.url} (`rlpips store pull MODEL`)" if entry.url else "no upstream URL"
        )
        return (
            f"{where}, or put {entry.filename!r} in a folder and set RLPIPS_WEIGHTS_DIR to it "
            f"(or run `rlpips store import DIR`)"
        )

    def _candidates(self, entry: FileEntry) -> list[Path]:
        dirs = [self.root, self.cache_dir] + ([self.weights_dir] if self.weights_dir else [])
        return [d / n for d in dirs for n in entry.names if (d / n).is_file()]

    def _check(self, file_id: str, path: Path) -> tuple[str, str | None]:
        """``(sha256, problem)``: ``problem`` is ``None`` when ``path`` matches one of the entry's
        digests. Verified files are remembered by (path, size, mtime) and not hashed again."""
        entry = self.manifest.files[file_id]
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in self._verified:
            return self._verified[key], None
        sha, blob = file_hashes(path)
        if any(d.matches(sha, blob) for d in entry.digests):
            self._verified[key] = sha
            return sha, None
        want = " or ".join(str(d) for d in entry.digests)
        return (
            sha,
            f"{path} has sha256 {sha} (git blob {blob}, {st.st_size} bytes); expected {want}",
        )

    def status(self, file_id: str) -> FileStatus:
        """Find a verified copy of ``file_id``; report why not otherwise."""
        entry = self.manifest.files[file_id]
        problems = []
        for path in self._candidates(entry):
            sha, problem = self._check(file_id, path)
            if problem is None:
                return FileStatus(file_id, path, None, sha)
            problems.append(problem)
        if problems:
            return FileStatus(file_id, None, "; ".join(problems))
        return FileStatus(file_id, None, f"{entry.filename!r} not found")

    def resolve(self, file_id: str) -> Path:
        """Path of a verified copy of ``file_id``, else :class:`WeightsError` saying how to get it."""
        st = self.status(file_id)
        if st.path is None:
            entry = self.manifest.files[file_id]
            want = " or ".join(str(d) for d in entry.digests)
            raise WeightsError(
                f"weights file {entry.filename!r} ({file_id}) unusable: {st.problem}. "
                f"Expected {want}. To obtain it: {self.how_to_get(file_id)}."
            )
        return st.path

    def files_of(self, name: str) -> list[str]:
        m = self.model(name)
        return list(dict.fromkeys([m.trunk.file, m.heads]))

    # -- loading -----------------------------------------------------------------------------

    def load_trunk(self, name: str) -> Trunk:
        """The verified trunk of model ``name`` on the CPU, eval-locked and frozen."""
        ref = self.model(name).trunk
        path = self.resolve(ref.file)
        try:
            return build_trunk(ref.arch, trunk_state(read_state(path), path.name))
        except ValueError as exc:
            raise WeightsError(f"{path}: {exc}") from exc

    def load_heads(self, name: str) -> Heads:
        """The verified heads of model ``name`` on the CPU."""
        path = self.resolve(self.model(name).heads)
        try:
            return Heads(head_weights(read_state(path), path.name))
        except ValueError as exc:
            raise WeightsError(f"{path}: {exc}") from exc

    def load(self, name: str, device: str | torch.device = "cpu") -> LPIPS:
        """A ready :class:`LPIPS` metric for model ``name`` on ``device``."""
        return LPIPS(self.load_trunk(name), self.load_heads(name)).to(device)

    def load_shared(
        self,
        names: Sequence[str],
        device: str | torch.device = "cpu",
        skip_unavailable: bool = False,
    ) -> tuple[dict[str, LPIPS], dict[str, str]]:
        """Metrics for ``names`` (duplicates dropped, order kept) on ``device``, where every model of
        one trunk *file* holds the same :class:`Trunk` object, so one trunk pass serves them all.

        Returns ``(metrics, skipped)``. With ``skip_unavailable`` a model the manifest does not name
        or whose files are missing or corrupt is left out with a logged warning and its reason in
        ``skipped``; otherwise ``KeyError`` / :class:`WeightsError` propagate.
        """
        trunks: dict[str, Trunk] = {}
        metrics: dict[str, LPIPS] = {}
        skipped: dict[str, str] = {}
        for name in dict.fromkeys(names):
            try:
                file_id = self.model(name).trunk.file
                trunk = trunks.get(file_id) or self.load_trunk(name).to(device)
                heads = self.load_heads(name).to(device)
            except (KeyError, WeightsError) as exc:
                if not skip_unavailable:
                    raise
                skipped[name] = str(exc.args[0] if isinstance(exc, KeyError) else exc)
                log.warning("skipping model %s: %s", name, skipped[name])
                continue
            trunks[file_id] = trunk
            metrics[name] = LPIPS(trunk, heads)
        return metrics, skipped

    # -- obtaining files ---------------------------------------------------------------------

    def _install(self, file_id: str, source: Path) -> Path:
        """Verify ``source`` and copy it into the cache under its canonical name."""
        _, problem = self._check(file_id, source)
        if problem:
            raise WeightsError(problem)
        dest = self.cache_dir / self.manifest.files[file_id].filename
        if dest.resolve() != source.resolve():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        return dest

    def import_dir(self, folder: Path) -> dict[str, Path]:
        """Copy every verified manifest file found in ``folder`` into the cache."""
        found: dict[str, Path] = {}
        for file_id, entry in self.manifest.files.items():
            for n in entry.names:
                if (folder / n).is_file():
                    found[file_id] = self._install(file_id, folder / n)
                    break
        return found

    def pull(self, name: str, fetch: Callable[[str, Path], None] | None = None) -> dict[str, Path]:
        """Make every file of model ``name`` available, downloading missing ones with verification."""
        fetch = fetch or _urlretrieve
        out: dict[str, Path] = {}
        for file_id in self.files_of(name):
            st = self.status(file_id)
            if st.path is not None:
                out[file_id] = st.path
                continue
            entry = self.manifest.files[file_id]
            if entry.url is None:
                raise WeightsError(
                    f"{entry.filename!r} has no upstream URL: {self.how_to_get(file_id)}"
                )
            with tempfile.TemporaryDirectory() as tmp:
                part = Path(tmp) / entry.filename
                log.info("downloading %s", entry.url)
                fetch(entry.url, part)
                out[file_id] = self._install(file_id, part)
        return out


def _urlretrieve(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as resp, dest.open("wb") as fh:
        shutil.copyfileobj(resp, fh)
