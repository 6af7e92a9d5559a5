#!/usr/bin/env python3
"""Tokenize text or JSONL files into megatron indexed datasets (``.bin`` + ``.idx``).

The counterpart of Megatron-LM's ``tools/preprocess_data.py`` for this repository, with the same
output naming (``<output-prefix>_<key>_document.{bin,idx}``, one pair per ``--json-keys`` key),
the same tokenizer flags as training (megatron's own ``--tokenizer-type``, ``--tokenizer-model``,
``--vocab-file``, ... plus ``--tokenizer-type ByteLevel``, which needs no files) and the same
builder (megatron-core's ``IndexedDatasetBuilder``). Differences:

* Plain text input too: ``--input-format text`` (or any file not named ``*.jsonl``/``*.json``/
  ``*.ndjson``) with ``--text-document file|line|paragraph`` choosing what one document is.
* ``--input`` takes several files and globs, processed in the order given (globs sorted).
* Errors are one line naming the file (and line), exit status 1, and nothing is left behind:
  outputs are written under temporary names and renamed only when every output is complete.
* Empty documents are skipped (counted in the summary); an input file with no document at all
  (empty file) is an error, since that is almost always a wrong path or a failed export.
* Tokenizers are never downloaded: ``HF_HUB_OFFLINE=1`` is set unless already set, and
  ``--tokenizer-model`` must exist on disk.

Examples::

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/my \\
        --tokenizer-type ByteLevel --append-eod --workers 4
    python tools/preprocess_data.py --input book.txt --input-format text --text-document \\
        paragraph --output-prefix data/book --tokenizer-type HuggingFaceTokenizer \\
        --tokenizer-model /models/gpt2 --append-eod

Run on CPU; no GPU and no CPU-emulation layer is involved.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import logging
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# Run from a checkout without installing: make ``megatron.rectify`` importable (``megatron`` is
# a namespace package, so the wheel's ``megatron.core`` stays visible).
_REPO = Path(__file__).resolve().parent.parent
if (_REPO / "megatron" / "rectify").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_NOT_TEXT_TOKENIZERS = ("MultimodalTokenizer", "NullMultimodalTokenizer", "SFTTokenizer")
_BATCH_DOCS = 256  # documents per task sent to a worker
_BATCH_BYTES = 1 << 20  # ... or this much text, whichever comes first


class PreprocessError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, a batch scheduler's time limit): raised in the main thread so
    that the same cleanup as for Ctrl-C runs (temporary outputs deleted)."""


#: The signal handlers' state: the process they were installed in, whether they must only
#: record the signal (while a worker pool runs: an exception raised inside multiprocessing's
#: internals can hang the pool, and one raised in a fork callback is dropped by Python), and
#: which signal arrived.
_SIGNALS: dict[str, Any] = {"pid": -1, "defer": False, "received": None}


def _on_signal(signum: int, frame: Any) -> None:
    """SIGTERM -> :class:`Terminated`, SIGINT -> ``KeyboardInterrupt``, in the main thread."""
    import signal

    if os.getpid() != _SIGNALS["pid"]:  # a forked worker before its initializer ran
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return
    if _SIGNALS["received"] is not None:
        return  # already stopping: a second signal must not cut the cleanup short
    _SIGNALS["received"] = signum  # also seen at the next check if the exception gets lost
    if not _SIGNALS["defer"]:
        _check_interrupted()


def _check_interrupted() -> None:
    """Raise here for a signal recorded earlier (a safe point of the main loop)."""
    import signal

    signum = _SIGNALS["received"]
    if signum == signal.SIGTERM:
        raise Terminated(signum)
    if signum is not None:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_clean_up() -> Iterator[None]:
    """While preprocessing, SIGTERM raises :class:`Terminated` (instead of killing the process
    on the spot, which left ``*.bin.tmp-PID-*`` files behind) and SIGINT ``KeyboardInterrupt``,
    both only where the cleanup can run."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    _SIGNALS.update(pid=os.getpid(), defer=False, received=None)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _SIGNALS.update(pid=-1, defer=False, received=None)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Silence import-time noise from megatron/torch that says nothing about preprocessing
    ("Apex is not installed", "No CUDA runtime is found", ...). Only the first import of a
    module warns, so this wraps the tool's megatron imports."""
    cpp_ext = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_ext.level
    cpp_ext.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        cpp_ext.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    """The parser; tokenizer flags are megatron's own (``_add_tokenizer_args``, as Megatron-LM's
    tool uses) so a command line's tokenizer part can be copied to the training command."""
    with _quiet_import():
        from megatron.training.arguments import _add_tokenizer_args

        from megatron.rectify.data import add_byte_level_tokenizer_choice

    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize text/JSONL files into megatron indexed datasets "
        "(<output-prefix>_<key>_document.bin/.idx).",
        allow_abbrev=False,
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH_OR_GLOB",
        help="Input file(s) and/or glob patterns (quote globs). Files are read in the order "
        "given; each glob's matches in sorted order.",
    )
    group.add_argument(
        "--input-format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="jsonl: one JSON object per line; text: plain UTF-8 text; auto (default): jsonl "
        f"for names ending in {', '.join(JSONL_SUFFIXES)}, text otherwise.",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSONL fields to tokenize, one output dataset each (default: text). For text "
        "input the single key only names the output.",
    )
    group.add_argument(
        "--text-document",
        choices=("file", "line", "paragraph"),
        default="file",
        help="For text input, what one document is: the whole file (default), each line, or "
        "each blank-line separated paragraph. Line mode drops the line break.",
    )

    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix",
        required=True,
        help="Path prefix of the outputs: <prefix>_<key>_document.bin/.idx.",
    )
    group.add_argument(
        "--append-eod",
        action="store_true",
        help="Append the tokenizer's end-of-document id to every document (what GPT "
        "pretraining expects, so that documents stay separated once packed).",
    )

    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Tokenizer processes (default 1: tokenize in this process). The output does not "
        "depend on it.",
    )
    group.add_argument(
        "--log-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="Seconds between progress lines on stderr (default 1; 0 disables progress).",
    )
    group.add_argument(
        "--quiet", action="store_true", help="Print errors only (no progress, no summary)."
    )

    _add_tokenizer_args(parser)
    add_byte_level_tokenizer_choice(parser)
    tok = parser._option_string_actions["--tokenizer-type"]  # noqa: SLF001 (argparse)
    tok.required = True
    tok.help = (
        "Tokenizer, as for training. ByteLevel: UTF-8 bytes + EOD (vocab 257), no files needed; "
        "HuggingFaceTokenizer: needs `transformers` and --tokenizer-model DIR (local files)."
    )
    return parser


def _validate(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {args.workers}")
    if args.tokenizer_type in _NOT_TEXT_TOKENIZERS:
        raise PreprocessError(f"--tokenizer-type {args.tokenizer_type} is not a text tokenizer")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise PreprocessError(f"--json-keys has duplicates: {' '.join(args.json_keys)}")
    if args.tokenizer_type == "HuggingFaceTokenizer":
        from megatron.rectify.data.tokenizer import _require_transformers

        try:
            _require_transformers(args)  # the check training uses too
        except RuntimeError as error:
            raise PreprocessError(str(error)) from None
        if not Path(args.tokenizer_model).exists():
            raise PreprocessError(
                f"{args.tokenizer_model}: tokenizer model path does not exist "
                "(this tool loads tokenizer files from disk only)"
            )
    # build_tokenizer would pad the vocabulary for a model; a dataset needs the real size.
    args.pad_vocab_size = False


def _expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files in the order given; globs expanded and sorted; duplicates kept once."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise PreprocessError(f"{pattern}: no input files match")
            paths.extend(Path(m) for m in matches if not Path(m).is_dir())
        else:
            path = Path(pattern)
            if not path.exists():
                raise PreprocessError(f"{path}: no such input file")
            if path.is_dir():
                raise PreprocessError(f"{path}: is a directory (give files or a glob)")
            paths.append(path)
    unique = list(dict.fromkeys(paths))
    if not unique:
        raise PreprocessError(f"no input files in: {' '.join(patterns)}")
    return unique


def _input_format(path: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    return "jsonl" if path.name.lower().endswith(JSONL_SUFFIXES) else "text"


# --------------------------------------------------------------------------------------------
# Reading: (file, line) -> raw documents
# --------------------------------------------------------------------------------------------


@dataclass
class _Task:
    """A document before tokenization. ``payload`` is the JSON line or the text itself."""

    file_index: int
    lineno: int
    is_json: bool
    payload: str
    nbytes: int


def _decode(raw: bytes, path: Path, lineno: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"{path}:{lineno}" if lineno is not None else str(path)
        raise PreprocessError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}"
            + (" of the line)" if lineno is not None else ")")
        ) from None


def _read_documents(file_index: int, path: Path, fmt: str, text_document: str) -> Iterator[_Task]:
    """Stream one file's documents; every I/O or decoding failure names the file."""
    try:
        if path.stat().st_size == 0:
            raise PreprocessError(f"{path}: empty input file")
        with open(path, "rb") as fh:
            if fmt == "jsonl" or text_document == "line":
                for lineno, raw in enumerate(fh, start=1):
                    line = _decode(raw, path, lineno)
                    if fmt == "text":
                        line = line.rstrip("\r\n")
                    elif not line.strip():
                        continue  # blank lines in JSONL are tolerated
                    yield _Task(file_index, lineno, fmt == "jsonl", line, len(raw))
            elif text_document == "file":
                raw = fh.read()
                yield _Task(file_index, 1, False, _decode(raw, path, None), len(raw))
            else:  # paragraph
                yield from _read_paragraphs(file_index, path, fh)
    except OSError as exc:
        raise PreprocessError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_paragraphs(file_index: int, path: Path, fh: Any) -> Iterator[_Task]:
    """Blank-line separated paragraphs, each with its inner line breaks (not the last one)."""
    lines: list[str] = []
    start, nbytes = 1, 0
    for lineno, raw in enumerate(fh, start=1):
        line = _decode(raw, path, lineno)
        nbytes += len(raw)
        if line.strip():
            if not lines:
                start = lineno
            lines.append(line)
        elif lines:
            yield _Task(file_index, start, False, "".join(lines).rstrip("\r\n"), nbytes)
            lines, nbytes = [], 0
    if lines:
        yield _Task(file_index, start, False, "".join(lines).rstrip("\r\n"), nbytes)


def _batches(tasks: Iterator[_Task]) -> Iterator[list[_Task]]:
    batch: list[_Task] = []
    size = 0
    for task in tasks:
        batch.append(task)
        size += task.nbytes
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# Tokenizing (in this process or in workers)
# --------------------------------------------------------------------------------------------


class _Encoder:
    """Turns a batch of raw documents into, per document, one token array per key (or None
    for an empty text), or an error message naming the failing line."""

    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np

        from megatron.rectify.data import ByteTokenizer, build_tokenizer

        self.np = np
        self.keys: list[str] = list(args.json_keys)
        self.append_eod: bool = args.append_eod
        self.tokenizer = build_tokenizer(args)
        self.byte_level = isinstance(self.tokenizer, ByteTokenizer)
        self.eod = self.tokenizer.eod if args.append_eod else None
        if args.append_eod and self.eod is None:
            raise PreprocessError(
                f"--append-eod: tokenizer {args.tokenizer_type} defines no end-of-document id"
            )

    def _encode_text(self, text: str) -> Any:
        np = self.np
        if not text:
            return None
        if self.byte_level:
            ids = self.tokenizer.tokenize_to_array(text).astype(np.int64)
        else:
            ids = np.asarray(self.tokenizer.tokenize(text), dtype=np.int64)
        if ids.size == 0:
            return None
        if self.eod is not None:
            ids = np.append(ids, self.eod)
        return ids

    def encode(self, batch: list[_Task]) -> list[tuple[int, int, Any]]:
        out: list[tuple[int, int, Any]] = []
        for task in batch:
            if not task.is_json:
                out.append((task.file_index, task.lineno, [self._encode_text(task.payload)]))
                continue
            try:
                obj = json.loads(task.payload)
            except json.JSONDecodeError as exc:
                out.append((task.file_index, task.lineno, f"invalid JSON ({exc.msg})"))
                continue
            if not isinstance(obj, dict):
                out.append((task.file_index, task.lineno, "not a JSON object"))
                continue
            values = []
            for key in self.keys:
                if key not in obj:
                    values = f"no key {key!r} (see --json-keys)"
                    break
                if not isinstance(obj[key], str):
                    values = f"{key!r} must be a string, not {_json_type(obj[key])}"
                    break
                values.append(self._encode_text(obj[key]))
            out.append((task.file_index, task.lineno, values))
        return out


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array"}
    return "null" if value is None else names.get(type(value), "an object")


def _worker_main(conn: Any, args: argparse.Namespace) -> None:
    """A tokenizer process: batches in, encoded batches out, over its own pipe. Each worker
    builds its own tokenizer (as Megatron-LM's tool does): some tokenizers hold thread pools or
    native state that must not be shared across ``fork``."""
    import signal

    # Ctrl-C reaches the whole process group: the parent alone decides what happens (a forked
    # worker would otherwise inherit the parent's handlers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with _quiet_import():
        encoder = _Encoder(args)
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        try:
            reply = (True, encoder.encode(batch))
        except Exception as exc:  # re-raised in the parent, as a pool would
            reply = (False, exc)
        try:
            conn.send(reply)
        except Exception:  # an exception that does not pickle
            conn.send((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))


def _encoded_batches(
    args: argparse.Namespace, encoder: _Encoder, batches: Iterator[list[_Task]]
) -> Iterator[tuple[list[_Task], list[tuple[int, int, Any]]]]:
    """Results in input order. With workers, one batch per worker is in flight, so memory
    stays bounded however large the input.

    Each worker has its own pipe and nothing is shared between processes (no
    ``multiprocessing.Pool``: its ``terminate()`` can deadlock on a queue lock held by a busy
    or killed worker, which an interrupted run meets), so stopping is always possible: on any
    exit but the normal end, the workers are killed."""
    if args.workers == 1:
        for batch in batches:
            yield batch, encoder.encode(batch)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    workers: list[tuple[Any, Any]] = []
    finished = False
    _SIGNALS["defer"] = True  # only recorded while workers run; raised by run(), per batch
    try:
        for _ in range(args.workers):
            mine, theirs = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(theirs, args), daemon=True)
            process.start()
            theirs.close()  # the worker's end: EOF here when the worker dies
            workers.append((process, mine))

        def receive(index: int) -> Any:
            process, conn = workers[index]
            try:
                ok, value = conn.recv()
            except (EOFError, OSError):
                _check_interrupted()  # killed by the SIGTERM / SIGINT that stops us anyway
                process.join(1)
                raise PreprocessError(
                    f"tokenizer worker {index} (pid {process.pid}) died (exit code "
                    f"{process.exitcode})"
                ) from None
            if not ok:
                raise value
            return value

        # one batch in flight per worker, results in submission order (round robin)
        queue = iter(batches)
        in_flight: collections.deque = collections.deque()
        for index in range(len(workers)):
            batch = next(queue, None)
            if batch is None:
                break
            workers[index][1].send(batch)
            in_flight.append((batch, index))
        while in_flight:
            batch, index = in_flight.popleft()
            result = receive(index)
            following = next(queue, None)
            if following is not None:
                workers[index][1].send(following)
                in_flight.append((following, index))
            yield batch, result
        finished = True
    finally:
        _SIGNALS["defer"] = False
        for process, conn in workers:
            if finished:
                with contextlib.suppress(OSError):
                    conn.send(None)
            else:
                process.kill()
        for process, conn in workers:
            process.join(10 if finished else None)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class _Progress:
    """Throttled progress on stderr: rewritten in place on a terminal, one line per interval
    otherwise (CI logs)."""

    def __init__(self, total_bytes: int, interval: float, stream: TextIO) -> None:
        self.total = max(total_bytes, 1)
        self.interval = interval
        self.stream = stream
        self.tty = stream.isatty()
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, nbytes: int, docs: int, tokens: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.interval <= 0 or (not force and now - self.last < self.interval):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        line = (
            f"{100.0 * nbytes / self.total:5.1f}%  {docs:,} docs  {tokens:,} tokens  "
            f"{nbytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB  {nbytes / 1e6 / elapsed:,.2f} MB/s"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's naming: ``<output-prefix>_<key>_document`` (the ``--data-path`` value)."""
    return f"{output_prefix}_{key}_document"


def run(args: argparse.Namespace, stderr: TextIO | None = None) -> dict[str, dict[str, Any]]:
    """Preprocess according to parsed ``args``; returns per-key stats. Raises
    :class:`PreprocessError` for every expected failure, leaving no output behind."""
    stderr = stderr if stderr is not None else sys.stderr
    _validate(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = _expand_inputs(args.input)
    formats = [_input_format(p, args.input_format) for p in paths]
    if "text" in formats and len(args.json_keys) != 1:
        raise PreprocessError("text input gives one document stream: pass a single --json-keys")

    from megatron.core.datasets.indexed_dataset import DType

    from megatron.rectify.data import AtomicIndexedDatasetWriter

    try:
        encoder = _Encoder(args)
    except PreprocessError:
        raise
    except Exception as exc:  # megatron/transformers raise anything from ImportError to OSError
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreprocessError(f"cannot build tokenizer {args.tokenizer_type}: {msg}") from exc
    dtype = DType.optimal_dtype(encoder.tokenizer.vocab_size)
    total_bytes = sum(p.stat().st_size for p in paths)
    progress = _Progress(total_bytes, 0 if args.quiet else args.log_interval, stderr)
    started = time.monotonic()

    writers: dict[str, AtomicIndexedDatasetWriter] = {}
    encoded: Any = None
    try:
        for key in args.json_keys:
            writers[key] = AtomicIndexedDatasetWriter(
                output_prefix_for(args.output_prefix, key), dtype
            )
        docs_per_file = [0] * len(paths)
        skipped = dict.fromkeys(args.json_keys, 0)
        nbytes = 0

        def tasks() -> Iterator[_Task]:
            for i, (path, fmt) in enumerate(zip(paths, formats, strict=True)):
                yield from _read_documents(i, path, fmt, args.text_document)

        # held in a variable: on an error the outputs are deleted (except below) before the
        # generator (and its worker pool) is shut down, so a stuck shutdown leaves no files
        encoded = _encoded_batches(args, encoder, _batches(tasks()))
        for batch, results in encoded:
            _check_interrupted()
            for task, (file_index, lineno, values) in zip(batch, results, strict=True):
                nbytes += task.nbytes
                if isinstance(values, str):
                    raise PreprocessError(f"{paths[file_index]}:{lineno}: {values}")
                if any(ids is not None for ids in values):
                    docs_per_file[file_index] += 1
                for key, ids in zip(args.json_keys, values, strict=True):
                    if ids is None:
                        skipped[key] += 1
                    else:
                        writers[key].add_document(ids.astype(dtype, copy=False))
            first = writers[args.json_keys[0]]
            progress.update(nbytes, first.num_documents, first.num_tokens)
        for path, count in zip(paths, docs_per_file, strict=True):
            if count == 0:
                raise PreprocessError(f"{path}: no non-empty document (empty input)")
        for key, writer in writers.items():
            if writer.num_documents == 0:
                raise PreprocessError(f"no non-empty {key!r} document in any input file")

        for writer in writers.values():  # every output complete before any is renamed
            writer.finalize()
        _check_interrupted()
        _SIGNALS["defer"] = True  # the renames are not interrupted: all outputs or none
        for writer in writers.values():
            writer.commit()
        _SIGNALS["defer"] = False  # a signal during the renames: complete outputs, exit 0
    except BaseException:
        for writer in writers.values():
            writer.abort()
        if encoded is not None:
            encoded.close()  # stops the worker pool
        raise
    finally:
        progress.close()

    elapsed = time.monotonic() - started
    stats: dict[str, dict[str, Any]] = {}
    for key, writer in writers.items():
        stats[key] = {
            "prefix": writer.prefix,
            "documents": writer.num_documents,
            "tokens": writer.num_tokens,
            "skipped_empty": skipped[key],
        }
        if not args.quiet:
            print(
                f"wrote {writer.prefix}.bin/.idx: {writer.num_documents:,} documents, "
                f"{writer.num_tokens:,} tokens ({dtype.__name__}), "
                f"{skipped[key]:,} empty skipped; {len(paths)} file(s), "
                f"{total_bytes / 1e6:,.1f} MB in {elapsed:.1f} s "
                f"[{args.tokenizer_type}, vocab {encoder.tokenizer.vocab_size}]",
                file=stderr,
            )
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 preprocessing error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _signals_clean_up():
            run(args)
    except PreprocessError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; no output written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{parser.prog}: terminated (SIGTERM); no partial output left", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
