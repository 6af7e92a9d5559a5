"""Publishing outputs all at once: write under a temporary name, flush to disk, rename.

Every writer of the package that must never leave a half-written result uses this module: the
indexed-dataset writer (``data.indexed_writer``, hence ``tools/preprocess_data.py``), the
embedded corpus cache (``data.embedded_corpus``) and the checkpoint converters
(``checkpoint.atomic``). The rule is the same for a file and for a folder: the content goes to a
sibling with a temporary name in the same folder, is flushed (``fsync``), and is renamed onto the
final name; a rename within one file system is atomic, so a reader or a crash sees the old
output, no output or the new one, never a mix. The folder holding the new name is flushed last,
so the rename itself survives a power cut.

Owns: temporary names, fsync, the rename and the clean-up of temporaries. Must not know what
is written (datasets, checkpoints, stamps).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "unique_tag",
    "fsync_file",
    "fsync_directory",
    "fsync_tree",
    "signals_deferred",
    "publish_file",
    "write_text_atomically",
    "staged_directory",
]


def unique_tag() -> str:
    """``<pid>-<8 hex digits>``: a temporary name part no other process or call repeats."""
    return f"{os.getpid()}-{os.urandom(4).hex()}"


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (so that a rename in it survives a crash). A no-op where
    folders cannot be opened or flushed (not POSIX, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Flush every file under ``root``, then every folder, deepest first, ``root`` last."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fsync_file(path)
        fsync_directory(dirpath)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGINT and SIGTERM in the calling thread for the block; a signal that arrives
    meanwhile is delivered when it ends. For renames that must happen together (a handler that
    raises, such as Python's SIGINT one, could otherwise stop between them)."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to defer with
        yield
        return
    deferred = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def publish_file(
    temporary: str | os.PathLike[str], final: str | os.PathLike[str], *, flushed: bool = False
) -> None:
    """Move the complete file ``temporary`` onto ``final`` (replacing it): flush its data
    (unless ``flushed``), rename, flush the folder."""
    if not flushed:
        fsync_file(temporary)
    os.replace(temporary, final)
    fsync_directory(Path(final).parent)


def write_text_atomically(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """``Path(path).write_text(text)``, except that ``path`` holds the old text or the new,
    never a part (a crash leaves at most a ``<name>.tmp-<pid>-<hex>`` sibling)."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.tmp-{unique_tag()}")
    try:
        temporary.write_text(text, encoding)
        publish_file(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_directory(
    destination: str | os.PathLike[str],
    staging: str | os.PathLike[str],
    aside: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Yield the new, empty folder ``staging`` (a sibling of ``destination``; a leftover of
    that name is removed first); when the block ends normally it becomes ``destination``, and
    on an exception it is deleted.

    Publishing flushes every file under ``staging``, moves an existing ``destination`` to
    ``aside`` (default: ``<staging>.previous``), renames ``staging`` into place, flushes the
    parent folder and only then deletes the old folder: at every moment ``destination`` is
    either the old folder, absent, or the new one. Choose names (``staging``, ``aside``) that
    the owner's clean-up of stale temporaries recognises.
    """
    destination, staging = Path(destination), Path(staging)
    aside = Path(aside) if aside is not None else staging.with_name(staging.name + ".previous")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=False)
    try:
        yield staging
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    had_previous = destination.exists()
    if had_previous:
        shutil.rmtree(aside, ignore_errors=True)
        destination.rename(aside)
    staging.rename(destination)
    fsync_directory(destination.parent)
    if had_previous:
        shutil.rmtree(aside, ignore_errors=True)
