"""Whole-file writes: a reader (a resumed run, `radtrain evaluate`, another rank, a person with
`cat`) sees the old file or the new one, never half of one.

Each write goes to a temporary file in the same directory (same filesystem, so the final
``os.replace`` is one atomic rename) and the temporary file is removed if the write fails, so a
full disk leaves the previous version in place and no debris. The temporary name carries the
process id: several ranks may write the same file at once (each swaps in a whole copy). Names end
in ``.tmp`` (before any suffix the writer needs, e.g. ``.npz``), which the Hub upload skips.

Directories (checkpoints, ``best/``) have their own swap protocols in checkpoint.py and export.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without an error it replaces
    ``path`` in one rename. ``suffix`` is for writers that insist on one (``np.savez`` adds
    ``.npz`` to any name without it)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends on every platform) to ``path`` atomically."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    return path


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """``json.dumps(data)`` to ``path`` atomically (with a final newline when indented)."""
    return write_text(path, json.dumps(data, indent=indent) + ("\n" if indent is not None else ""))


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file a command needs; unreadable or malformed is a ConfigError naming the file."""
    from radtrain.config import ConfigError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Check at start, before any work, that ``path`` can be written as a file (a command's
    --output/--json): a directory, or a parent that cannot be created or written, used to fail
    with a traceback after all the work was done."""
    from radtrain.config import ConfigError

    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file name (e.g. {path / 'results.json'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{option} {path} cannot be written ({exc.strerror or exc}); choose a path in a directory you can write to"
        ) from exc
    return path


def apply_umask(directory: str | os.PathLike) -> None:
    """Give the files under ``directory`` the permissions the process's umask asks for.

    safetensors (0.8) creates its files mode 0600 whatever the umask, so a run's weights were the
    only files of an export or checkpoint that the rest of a cluster group could not read."""
    wanted = 0o666 & ~_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != wanted:
            with contextlib.suppress(OSError):  # not ours to change (another user's file)
                os.chmod(path, wanted)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, racing other threads that
    create files meanwhile); the set-and-restore fallback only where /proc lacks the field."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    # ~1 GB/s: a ModernBERT-base checkpoint (weights + Adam moments, ~1.8 GB) costs ~2 s to hash,
    # next to minutes of training between checkpoints. Sizes alone miss garbage of the same size.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
