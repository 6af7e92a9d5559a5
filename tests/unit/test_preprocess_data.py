"""tools/preprocess_data.py and the byte-level tokenizer it defaults to.

The tool is imported and its ``main(argv)`` called in-process (megatron takes ~5 s to import,
so a subprocess per case would blow the time budget); one test runs it as a real script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron.rectify.data import (
    BYTE_EOD_ID,
    BYTE_PAD_ID,
    BYTE_VOCAB_SIZE,
    AtomicIndexedDatasetWriter,
    ByteTokenizer,
    build_byte_tokenizer,
)

# megatron's IndexedDataset logging asks for a rank that a single process does not have.
pytestmark = pytest.mark.filterwarnings("ignore:Could not determine rank:UserWarning")

REPO = Path(__file__).resolve().parents[2]
TOOL_PATH = REPO / "tools" / "preprocess_data.py"
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAVE_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None

DOCS = [
    "hello world\n",
    "héllo wörld — 😀 ünïcödé\n\ttabs and  spaces  ",
    "trailing newlines\n\n\n",
    "NUL \x00 byte stays a byte",
]


def _load_tool() -> ModuleType:
    # Registered in sys.modules so that worker processes can unpickle its task objects.
    if "preprocess_data" in sys.modules:
        return sys.modules["preprocess_data"]
    spec = importlib.util.spec_from_file_location("preprocess_data", TOOL_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return _load_tool()


def run_tool(tool: ModuleType, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = tool.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def read_docs(prefix: str | Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    assert len(ds.document_indices) - 1 == len(ds)  # one sequence per document
    # Copies: the arrays are views of an mmap that IndexedDataset closes when collected.
    return [np.array(ds[i]) for i in range(len(ds))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --------------------------------------------------------------------------------------------
# Byte tokenizer
# --------------------------------------------------------------------------------------------


def test_byte_tokenizer_interface() -> None:
    tok = build_byte_tokenizer()
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod, tok.eos, tok.pad) == (257, 256, 256, -1)
    assert (BYTE_VOCAB_SIZE, BYTE_EOD_ID, BYTE_PAD_ID) == (257, 256, -1)
    assert tok.tokenize("aé") == [97, 0xC3, 0xA9]
    assert tok.detokenize([97, BYTE_EOD_ID, 0xC3, 0xA9, BYTE_EOD_ID]) == "aé"
    assert tok.detokenize([0xFF]) == "\ufffd"  # invalid UTF-8 from a model: no exception
    assert len(tok.vocab) == 257 and tok.vocab["<eod>"] == 256 and tok.vocab["<0x41>"] == 65
    assert tok.offsets(tok.tokenize("aé b"), "aé b") == [0, 1, 1, 2, 3]
    assert tok.unique_identifiers["class"].endswith("ByteTokenizer")
    assert np.array_equal(tok.tokenize_to_array("aé"), np.array(tok.tokenize("aé")))


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = build_byte_tokenizer()
    ids = tok.tokenize(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.detokenize(ids + [tok.eod]) == text


def test_atomic_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with AtomicIndexedDatasetWriter(tmp_path / "x", np.uint16) as writer:
            writer.add_document(np.arange(10))
            raise RuntimeError("boom")
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------------------------
# The tool: outputs
# --------------------------------------------------------------------------------------------


def test_jsonl_to_indexed_dataset(tool: ModuleType, tmp_path: Path, capsys) -> None:
    rows = [{"text": d, "title": f"t{i}", "other": i} for i, d in enumerate(DOCS)]
    rows.append({"text": "", "title": "empty text"})  # skipped for key 'text' only
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out" / "corpus"
    rc, err = run_tool(
        tool, capsys, "--input", src, "--output-prefix", out, "--json-keys", "text", "title",
        "--tokenizer-type", "ByteLevel", "--append-eod",
    )  # fmt: skip
    assert rc == 0, err
    assert files_in(out.parent) == [
        "corpus_text_document.bin",
        "corpus_text_document.idx",
        "corpus_title_document.bin",
        "corpus_title_document.idx",
    ]
    tok = build_byte_tokenizer()
    docs = read_docs(f"{out}_text_document")
    assert len(docs) == len(DOCS)
    for doc, text in zip(docs, DOCS, strict=True):
        assert doc.dtype == np.uint16
        assert doc[-1] == BYTE_EOD_ID and BYTE_EOD_ID not in doc[:-1]
        assert tok.detokenize(doc[:-1].tolist()) == text
    titles = [tok.detokenize(d.tolist()) for d in read_docs(f"{out}_title_document")]
    assert titles == [r["title"] for r in rows]
    assert "wrote" in err and "1 empty skipped" in err


def test_without_append_eod(tool: ModuleType, tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in DOCS])
    rc, err = run_tool(
        tool, capsys, "--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type",
        "ByteLevel", "--quiet",
    )  # fmt: skip
    assert rc == 0 and err == ""
    docs = read_docs(tmp_path / "o_text_document")
    assert [d.tobytes() for d in docs] == [
        np.frombuffer(d.encode(), np.uint8).astype(np.uint16).tobytes() for d in DOCS
    ]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("file", ["para one\nline two\n\n\npara two\n\nlast"]),
        ("line", ["para one", "line two", "para two", "last"]),  # blank lines skipped
        ("paragraph", ["para one\nline two", "para two", "last"]),
    ],
)
def test_text_input(tool: ModuleType, tmp_path: Path, capsys, mode: str, expected) -> None:
    src = tmp_path / "book.txt"
    src.write_text("para one\nline two\n\n\npara two\n\nlast", "utf-8")
    rc, err = run_tool(
        tool, capsys, "--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type",
        "ByteLevel", "--text-document", mode, "--append-eod",
    )  # fmt: skip
    assert rc == 0, err
    tok = build_byte_tokenizer()
    docs = read_docs(tmp_path / "o_text_document")
    assert [tok.detokenize(d.tolist()) for d in docs] == expected
    assert all(d[-1] == BYTE_EOD_ID for d in docs)


def test_globs_and_several_inputs(tool: ModuleType, tmp_path: Path, capsys) -> None:
    for name, text in [("b.txt", "second"), ("a.txt", "first"), ("c.jsonl", None)]:
        if text is None:
            write_jsonl(tmp_path / name, [{"text": "third"}, {"text": "fourth"}])
        else:
            (tmp_path / name).write_text(text, "utf-8")
    rc, err = run_tool(
        tool, capsys, "--input", tmp_path / "*.txt", tmp_path / "c.jsonl", "--output-prefix",
        tmp_path / "out" / "o", "--tokenizer-type", "ByteLevel",
    )  # fmt: skip
    assert rc == 0, err
    tok = build_byte_tokenizer()
    texts = [tok.detokenize(d.tolist()) for d in read_docs(tmp_path / "out" / "o_text_document")]
    assert texts == ["first", "second", "third", "fourth"]


def test_workers_give_identical_output(tool: ModuleType, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    alphabet = list("abc déf😀\n\t")
    rows = [
        {"text": "".join(rng.choice(alphabet, size=int(rng.integers(0, 200))))}
        for _ in range(3000)  # > several worker batches
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        rc, err = run_tool(
            tool, capsys, "--input", src, "--output-prefix", prefix, "--tokenizer-type",
            "ByteLevel", "--append-eod", "--workers", workers,
        )  # fmt: skip
        assert rc == 0, err
        outputs.append(
            [Path(f"{prefix}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")]
        )
    assert outputs[0] == outputs[1]
    assert len(read_docs(tmp_path / "w2_text_document")) == sum(1 for r in rows if r["text"])


# --------------------------------------------------------------------------------------------
# The tool: errors
# --------------------------------------------------------------------------------------------


def _make_bad_input(tmp_path: Path, case: str) -> tuple[list[Path], str]:
    """(input files, the file name the message must name)."""
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"text": "fine"}] * 600)  # several batches before the failure
    if case == "empty":
        bad = tmp_path / "empty.txt"
        bad.write_bytes(b"")
    elif case == "blank-jsonl":
        bad = tmp_path / "blank.jsonl"
        bad.write_text("\n  \n", "utf-8")
    elif case == "not-utf8":
        bad = tmp_path / "latin1.txt"
        bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    elif case == "not-utf8-jsonl":
        bad = tmp_path / "latin1.jsonl"
        bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    elif case == "bad-json":
        bad = tmp_path / "broken.jsonl"
        bad.write_text('{"text": "ok"}\n{"text": \n', "utf-8")
    elif case == "missing-key":
        bad = write_jsonl(tmp_path / "nokey.jsonl", [{"text": "a"}, {"body": "b"}])
    elif case == "not-string":
        bad = write_jsonl(tmp_path / "number.jsonl", [{"text": 3}])
    elif case == "missing-file":
        bad = tmp_path / "does-not-exist.jsonl"
    elif case == "directory":
        bad = tmp_path / "adir"
        bad.mkdir()
    elif case == "unreadable":
        bad = tmp_path / "secret.txt"
        bad.write_text("x", "utf-8")
        bad.chmod(0)
    else:
        raise AssertionError(case)
    return [good, bad], bad.name


ERROR_CASES = [
    "empty",
    "blank-jsonl",
    "not-utf8",
    "not-utf8-jsonl",
    "bad-json",
    "missing-key",
    "not-string",
    "missing-file",
    "directory",
    "unreadable",
]
# The worker path only changes where a line is parsed; a few representative cases cover it.
ERROR_PARAMS = [(case, 1) for case in ERROR_CASES] + [
    (case, 2) for case in ("empty", "not-utf8-jsonl", "bad-json", "missing-key")
]


@pytest.mark.parametrize(("case", "workers"), ERROR_PARAMS)
def test_bad_input_fails_cleanly(
    tool: ModuleType, tmp_path: Path, capsys, monkeypatch, case: str, workers: int
) -> None:
    inputs, bad_name = _make_bad_input(tmp_path, case)
    if case == "unreadable" and os.access(inputs[-1], os.R_OK):  # root ignores mode 000

        def deny(path, *args, **kwargs):
            if Path(path).name == bad_name:
                raise PermissionError(13, "Permission denied", str(path))
            return open(path, *args, **kwargs)

        monkeypatch.setattr(tool, "open", deny, raising=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # A previous good dataset under the same prefix must survive a failed run unchanged.
    previous = {}
    for ext in (".bin", ".idx"):
        (out_dir / f"o_text_document{ext}").write_bytes(b"previous" + ext.encode())
        previous[ext] = b"previous" + ext.encode()
    rc, err = run_tool(
        tool, capsys, "--input", *inputs, "--output-prefix", out_dir / "o", "--tokenizer-type",
        "ByteLevel", "--append-eod", "--workers", workers,
    )  # fmt: skip
    assert rc == 1
    lines = [line for line in err.splitlines() if "%" not in line]  # drop progress lines
    assert len(lines) == 1, err
    assert lines[0].startswith("preprocess_data.py: error: ") and bad_name in lines[0]
    assert files_in(out_dir) == ["o_text_document.bin", "o_text_document.idx"]  # no temporaries
    for ext, content in previous.items():
        assert (out_dir / f"o_text_document{ext}").read_bytes() == content


def test_usage_errors(tool: ModuleType, tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    with pytest.raises(SystemExit) as exc:  # argparse: --tokenizer-type is required
        tool.main(["--input", str(src), "--output-prefix", str(tmp_path / "o")])
    assert exc.value.code == 2
    rc, err = run_tool(
        tool, capsys, "--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type",
        "ByteLevel", "--workers", "0",
    )  # fmt: skip
    assert rc == 1 and "--workers" in err
    rc, err = run_tool(
        tool, capsys, "--input", tmp_path / "*.nothing", "--output-prefix", tmp_path / "o",
        "--tokenizer-type", "ByteLevel",
    )  # fmt: skip
    assert rc == 1 and "*.nothing: no input files match" in err


# --------------------------------------------------------------------------------------------
# The tool: Hugging Face tokenizers
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAVE_TRANSFORMERS, reason="transformers is installed")
def test_huggingface_without_transformers_is_a_clear_error(
    tool: ModuleType, tmp_path: Path, capsys
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    (tmp_path / "tok").mkdir()
    rc, err = run_tool(
        tool, capsys, "--input", src, "--output-prefix", tmp_path / "out" / "o",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tmp_path / "tok",
    )  # fmt: skip
    assert rc == 1
    assert "needs the 'transformers' package" in err and len(err.strip().splitlines()) == 1
    assert files_in(tmp_path / "out") == []


def _tiny_hf_tokenizer(directory: Path) -> None:
    """A 300-token byte-level BPE trained on two sentences, saved as transformers would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world", "the quick brown fox jumps over the lazy dog"], trainer)
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")


@pytest.mark.skipif(
    not (HAVE_TRANSFORMERS and HAVE_TOKENIZERS), reason="needs transformers and tokenizers"
)
def test_huggingface_tokenizer_from_local_files(tool: ModuleType, tmp_path: Path, capsys) -> None:
    from transformers import AutoTokenizer

    _tiny_hf_tokenizer(tmp_path / "tok")
    texts = ["hello world", "the lazy fox"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    rc, err = run_tool(
        tool, capsys, "--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type",
        "HuggingFaceTokenizer", "--tokenizer-model", tmp_path / "tok", "--append-eod",
        "--workers", "2",
    )  # fmt: skip
    assert rc == 0, err
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    docs = read_docs(tmp_path / "o_text_document")
    for doc, text in zip(docs, texts, strict=True):
        assert doc.tolist() == hf(text).input_ids + [hf.eos_token_id]
        assert hf.decode(doc[:-1].tolist()) == text


# --------------------------------------------------------------------------------------------
# As a script
# --------------------------------------------------------------------------------------------


def test_runs_as_a_script(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in DOCS])
    base = [sys.executable, str(TOOL_PATH), "--tokenizer-type", "ByteLevel", "--append-eod"]
    ok = subprocess.run(
        [*base, "--input", str(src), "--output-prefix", str(tmp_path / "o"), "--workers", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "Warning" not in ok.stderr  # megatron's import-time noise is silenced
    assert len(read_docs(tmp_path / "o_text_document")) == len(DOCS)
