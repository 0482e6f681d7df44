"""Integrity of saved folders (checkpoints, adapters): a manifest of every file's size and SHA-256.

    seal(folder)                      # write causalattn_manifest.json, last, over the folder's files
    verify(folder)                    # raises CorruptCheckpoint naming the first bad file
    newest_intact(candidates, log)    # the first candidate (newest first) that verifies

A writer puts its files in a folder, then calls `seal`: the manifest is written last (to a temporary
name, flushed to disk, then renamed), so a folder whose manifest verifies holds exactly the bytes that
were written. Writers that stage a folder and rename it into place (`causalattn train`'s checkpoints)
seal before the rename, so the manifest is inside the atomic step. What the manifest catches: a
missing, truncated, emptied, extended or altered file (even one flipped byte), a missing or damaged
manifest. What it does not: files it does not list (they are ignored), and a folder rewritten as a
whole together with a matching new manifest (that is a new save, not damage).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

MANIFEST_NAME = "causalattn_manifest.json"
FORMAT = "causalattn-manifest"
FORMAT_VERSION = 1
_CHUNK = 1 << 20  # bytes hashed per read: big files are never held in memory whole

PathLike = Union[str, os.PathLike]


class CorruptCheckpoint(ValueError):
    """A saved folder that does not match its manifest; the message starts with the bad file's path."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (no-op where folders cannot be opened)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(handle)


def _listed_files(folder: Path) -> list[str]:
    """Every regular file under `folder` (relative POSIX paths), the manifest and staging files excepted."""
    names = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not path.is_symlink() and relative != MANIFEST_NAME and not path.name.endswith(".tmp"):
            names.append(relative)
    return sorted(names)


def seal(folder: PathLike, files: Optional[Iterable[str]] = None) -> Path:
    """Write the manifest of `files` (relative paths; default: every file in `folder`) after flushing
    each to disk; returns the manifest's path. Call it once every file is written and closed."""
    folder = Path(folder)
    names = sorted(files) if files is not None else _listed_files(folder)
    entries = {}
    for name in names:
        path = folder / name
        _fsync_file(path)
        entries[name] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "files": entries}, indent=1,
                      sort_keys=True) + "\n"
    manifest = folder / MANIFEST_NAME
    tmp = folder / f".{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, manifest)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(folder)
    return manifest


def unseal(folder: PathLike) -> None:
    """Remove `folder`'s manifest before rewriting files it lists, so that a rewrite cut short is never
    reported as damage of the files just written (it reads as an unsealed folder instead)."""
    manifest = Path(folder) / MANIFEST_NAME
    if manifest.is_file():
        manifest.unlink()


def is_sealed(folder: PathLike) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def _read_manifest(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CorruptCheckpoint(path, "missing: it is written last, so the save did not finish (or predates "
                                      "manifests)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptCheckpoint(path, f"not a readable manifest ({error})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (manifest.get("format") if isinstance(manifest, dict) else None) != FORMAT or not isinstance(files, dict) \
            or not all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                       for e in files.values()):
        raise CorruptCheckpoint(path, f"not a {FORMAT} v{FORMAT_VERSION} manifest")
    return files


def verify(folder: PathLike) -> None:
    """Check every file the manifest lists: present, of the listed size and SHA-256. Raises
    CorruptCheckpoint for the first that is not (sizes first: a truncation is named as one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorruptCheckpoint(folder, "no such folder")
    files = _read_manifest(folder)
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpoint(path, "missing (the manifest lists it)")
        size = path.stat().st_size
        if size != entry["size"]:
            what = "empty" if size == 0 else "truncated" if size < entry["size"] else "longer than written"
            raise CorruptCheckpoint(path, f"{what}: {size} bytes, the manifest says {entry['size']}")
    for name, entry in sorted(files.items()):
        if file_digest(folder / name) != entry["sha256"]:
            raise CorruptCheckpoint(folder / name, "altered: its SHA-256 differs from the manifest's (the bytes "
                                                   "changed after the save)")


def newest_intact(candidates: Sequence[Path], log: Callable[[str], None]) -> tuple[Optional[Path], list[str]]:
    """The first of `candidates` (ordered newest first) that verifies, and one line per candidate
    skipped before it (each naming its bad file, also passed to `log`). (None, lines) when none does.

    When no candidate has a manifest at all, they were written before manifests existed: the newest is
    returned unverified (with a line to `log`), so that a job saved by an older version still resumes.
    Once any candidate has one, a folder without one is damage (the manifest is written last)."""
    if candidates and not any(is_sealed(candidate) for candidate in candidates):
        log(f"checkpoint {candidates[0].name} was written before manifests: resumed from it unverified")
        return candidates[0], []
    problems = []
    for candidate in candidates:
        try:
            verify(candidate)
        except CorruptCheckpoint as error:
            problems.append(str(error))
            log(f"checkpoint {candidate.name} is damaged and skipped: {error}")
            continue
        return candidate, problems
    return None, problems


def no_intact_message(where: Path, problems: Sequence[str]) -> str:
    """The error for a folder of checkpoints none of which verifies."""
    return (f"{where}: no intact checkpoint to resume from ({len(problems)} damaged: " + "; ".join(problems)
            + "); nothing was deleted")
