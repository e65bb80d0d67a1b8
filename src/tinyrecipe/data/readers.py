"""Reading raw corpora: input paths -> files -> records -> document texts, for any common format.

Formats (by file name): `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON record per line), `.json`
(a list of records), `.parquet`, `.arrow` (Arrow IPC stream or file; a directory written by
Hugging Face `datasets.save_to_disk` is read through its `state.json`), `.txt` / `.md` (a file is
a document, or several split on a separator; line ends read as LF). A byte-order mark is not
text; a `.json` file of one value a line is read as JSON lines. A `RecordFormat` says which field holds the text (a
dotted path for nested fields), which records to drop by a field's value and the minimum length.
Files are read a part at a time (`BLOCK` bytes, or record batches): memory holds a part and the
record in it, not the file.

A reader yields `(text, None)` per document or `(None, reason)` per skipped record, so prep
counts every skip by reason: non_utf8, malformed_json, missing_<field>, empty, short,
dropped_<value>, truncated_file, unreadable_file, missing_<field>_column (a table without the
column, counted once per file).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

Record = tuple[str | None, str | None]
BLOCK = 1 << 20  # bytes read at a time: a reader holds a block and the record it is in

LINE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
SUFFIXES = (*LINE_SUFFIXES, ".json", ".parquet", ".arrow", ".txt", ".md")
MISSING = object()


@dataclass(frozen=True)
class RecordFormat:
    """How a record becomes a document.

    text_field: the field (dotted path into nested objects) holding the text.
    drop: (dotted field, value) pairs; a record whose field equals the value is skipped as
        `dropped_<value>` (SlimPajama's GitHub subset: `meta.redpajama_set_name=RedPajamaGithub`).
    min_chars: documents shorter than this (after stripping) are skipped as `short`.
    separator: plain-text files are split on it into documents (None: a file is a document).
    """

    text_field: str = "text"
    drop: tuple[tuple[str, str], ...] = ()
    min_chars: int = 0
    separator: str | None = None

    def options(self) -> dict:
        """What the prepared split's metadata records of this format."""
        return dict(
            text_field=self.text_field,
            drop=[list(d) for d in self.drop],
            min_chars=self.min_chars,
            separator=self.separator,
        )


SLIMPAJAMA = RecordFormat("text", drop=(("meta.redpajama_set_name", "RedPajamaGithub"),))
STARCODER = RecordFormat("content")


def field_of(record, dotted: str):
    """record["a"]["b"] for "a.b"; MISSING when any step is absent."""
    for key in dotted.split("."):
        if not isinstance(record, dict) or key not in record:
            return MISSING
        record = record[key]
    return record


def document(record, fmt: RecordFormat) -> Record:
    """The text of one parsed record under `fmt`, or the reason it is skipped."""
    text = field_of(record, fmt.text_field)
    if not isinstance(text, str):
        return None, f"missing_{fmt.text_field}"
    for key, value in fmt.drop:
        found = field_of(record, key)
        if found is not MISSING and _as_text(found) == value:
            return None, f"dropped_{value}"
    return _checked(text, fmt)


def _as_text(value) -> str:
    """A field's value as `--drop FIELD=VALUE` writes it: a string as it is, anything else as
    JSON (true, null, 3; a table's date or decimal as its text)."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float, list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _checked(text: str, fmt: RecordFormat) -> Record:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, written as a JSON escape ("\ud800")
            return None, "non_utf8"
    stripped = len(text.strip())
    if not stripped:
        return None, "empty"
    if stripped < fmt.min_chars:
        return None, "short"
    return text, None


# ---- files -------------------------------------------------------------------------------------


def kind_of(path: Path) -> str | None:
    """The format of a file by its name: "lines", "json", "parquet", "arrow", "text" or None."""
    name = path.name.lower()
    if name.endswith(LINE_SUFFIXES):
        return "lines"
    for suffix, kind in (
        (".json", "json"),
        (".parquet", "parquet"),
        (".arrow", "arrow"),
        (".txt", "text"),
        (".md", "text"),
    ):
        if name.endswith(suffix):
            return kind
    return None


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files of the given inputs, in order: a file as it is, a directory's readable files
    (recursively, sorted; a `datasets.save_to_disk` directory's data files), a glob pattern's
    matches (sorted; `**` recurses). Each input must yield a file: one line naming it if not."""
    files: list[Path] = []
    for spec in map(str, inputs):
        path = Path(spec)
        if any(c in spec for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            found = [p for p in found if kind_of(p)]
            if not found:
                raise FileNotFoundError(
                    f"input pattern '{spec}' matches no readable file ({', '.join(SUFFIXES)})"
                )
        elif path.is_dir():
            found = _dir_files(path)
        elif path.is_file():
            if kind_of(path) is None:
                raise ValueError(
                    f"input '{spec}' has an unknown format; name it with one of: {', '.join(SUFFIXES)}"
                )
            found = [path]
        else:
            raise FileNotFoundError(
                f"input '{spec}' does not exist; pass files, directories or globs"
            )
        files += [f for f in found if f not in files]
    return files


def _dir_files(root: Path, top: bool = True) -> list[Path]:
    """A directory's readable files in sorted path order, skipping hidden ones; a directory
    written by `datasets.save_to_disk` contributes its data files."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(
            f"input '{root}' is a Hugging Face DatasetDict (splits: {', '.join(splits)}); "
            f"pass one split's directory, e.g. {root / (splits[0] if splits else 'train')}"
        )
    state = _saved_dataset_state(root)
    if state is not None:
        return [root / f["filename"] for f in state["_data_files"]]
    found = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            found += _dir_files(p, top=False)
        elif p.is_file() and kind_of(p):
            found.append(p)
    if top and not found:
        raise ValueError(f"input directory '{root}' holds no readable file ({', '.join(SUFFIXES)})")
    return found


def _saved_dataset_state(root: Path) -> dict | None:
    """The `state.json` of a directory written by `datasets.save_to_disk` (it lists the data
    files), None for any other directory, one with some other `state.json` included."""
    try:
        state = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "_data_files" in state else None


def read_records(path: Path, fmt: RecordFormat) -> Iterator[Record]:
    """The documents (or skip reasons) of one file, in file order."""
    kind = kind_of(path)
    if kind == "lines":
        yield from _read_lines(path, fmt)
    elif kind == "json":
        yield from _read_json(path, fmt)
    elif kind in ("parquet", "arrow"):
        yield from _read_table(path, fmt, kind)
    elif kind == "text":
        yield from _read_text(path, fmt)
    else:
        raise ValueError(f"input '{path}' has an unknown format")


class TruncatedFile(Exception):
    """A compressed file that ends mid-stream, or a JSON list that ends inside a value."""


def _blocks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a .zst (any number of frames) or .gz file, or a plain file's bytes,
    about `BLOCK` at a time.

    zstandard's stream reader returns a silent EOF on a cut file; a decompressobj per frame
    tells a finished frame from a cut one. gzip raises EOFError on a cut stream.
    """
    size = BLOCK
    with open(path, "rb") as f:
        if path.name.endswith(".gz"):
            try:
                with gzip.GzipFile(fileobj=f) as gz:
                    while block := gz.read(size):
                        yield block
            except (EOFError, gzip.BadGzipFile, zlib.error) as err:
                raise TruncatedFile(str(err)) from err
            return
        if not path.name.endswith(".zst"):
            while block := f.read(size):
                yield block
            return
        import zstandard

        dobj, pending = None, False
        while raw := f.read(size):
            while raw:
                if dobj is None:
                    dobj = zstandard.ZstdDecompressor().decompressobj()
                try:
                    out = dobj.decompress(raw)
                except zstandard.ZstdError as err:
                    raise TruncatedFile(str(err)) from err
                pending = True
                if out:
                    yield out
                raw = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj, pending = None, False
        if pending:
            raise TruncatedFile(str(path))


def _read_lines(path: Path, fmt: RecordFormat) -> Iterator[Record]:
    """JSON lines, plain or compressed; the complete lines before a cut are kept."""
    buffer, first = b"", True
    try:
        for block in _blocks(path):
            if first:  # a byte-order mark is not part of the first record
                block, first = block.removeprefix(codecs.BOM_UTF8), False
            buffer += block
            *lines, buffer = buffer.split(b"\n")
            yield from (_line_record(line, fmt) for line in lines if line.strip())
    except TruncatedFile:
        yield None, "truncated_file"
        return
    except OSError:
        yield None, "unreadable_file"
        return
    if buffer.strip():
        yield _line_record(buffer, fmt)


def _line_record(line: bytes, fmt: RecordFormat) -> Record:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None, "malformed_json"
    return document(obj, fmt)


class JsonLines(Exception):
    """A `.json` file holding one value after another: JSON lines (`datasets`' `to_json`)."""


def _read_json(path: Path, fmt: RecordFormat) -> Iterator[Record]:
    """A JSON list's records (a file holding one object: that record; one holding a value a
    line: JSON lines); the records before a cut, malformed or non-UTF-8 part are kept."""
    try:
        yield from (document(r, fmt) for r in _json_values(path))
    except JsonLines:
        yield from _read_lines(path, fmt)
    except UnicodeDecodeError:
        yield None, "non_utf8"
    except TruncatedFile:
        yield None, "truncated_file"
    except json.JSONDecodeError:
        yield None, "malformed_json"
    except OSError:
        yield None, "unreadable_file"


_SPACE = " \t\n\r"
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")


class _Utf8:
    """A binary file's text, read a block at a time, without a leading byte-order mark; a byte
    that is not UTF-8 raises UnicodeDecodeError once the text before it has been read."""

    def __init__(self, f) -> None:
        self.f, self.decoder, self.error = f, codecs.getincrementaldecoder("utf-8-sig")(), None

    def read(self, size: int) -> str:
        """At least one character of the text, or "" at its end."""
        if self.error is not None:
            raise self.error
        while True:
            block = self.f.read(size)
            try:
                text = self.decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                self.error, text = err, err.object[: err.start].decode("utf-8-sig")
                if not text:
                    raise
            if text or not block:
                return text


def _cut_short(err: json.JSONDecodeError) -> bool:
    """Whether a parse error is the text ending inside a value: more text could complete it."""
    left = len(err.doc) - err.pos
    if left == 0 or err.msg.startswith("Unterminated"):
        return True
    if err.msg.startswith("Invalid \\uXXXX"):  # an escape (or a surrogate pair) cut short
        return left < 12
    if left >= len("-Infinity"):
        return False
    tail = err.doc[err.pos :]  # a literal, or a number's fraction or exponent ("1." "1e-"), cut
    return any(word.startswith(tail) for word in _LITERALS) or set(tail) <= set(".eE+-")


def _json_values(path: Path) -> Iterator:
    """The elements of the JSON list in `path`, parsed one at a time from `BLOCK`-sized reads
    (memory holds one element, not the file), or the file's one value when it is not a list.
    Raises UnicodeDecodeError, json.JSONDecodeError, or TruncatedFile where the file ends
    inside the list."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        text, buf, pos, eof = _Utf8(f), "", 0, False

        def fill() -> None:  # the next block; at least as much as is pending, so that a long
            nonlocal buf, pos, eof  # value is parsed a logarithmic number of times
            block = text.read(max(BLOCK, len(buf) - pos))
            eof = not block
            buf, pos = buf[pos:] + block, 0

        def skip_space() -> bool:  # False at the end of the file
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _SPACE:
                    pos += 1
                if pos < len(buf) or eof:
                    return pos < len(buf)
                fill()

        def value(in_list: bool):
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if not _cut_short(err):
                        raise
                    if eof:
                        raise TruncatedFile(str(path)) from err
                    fill()
                    continue
                # a number may go on past the text read ("1" of "12", "1" of "1.5")
                delimited = end < len(buf) and buf[end] in ",]" + _SPACE
                if buf[pos] not in "-0123456789" or delimited or len(buf) - end > 2:
                    return obj, end
                if not eof:
                    fill()
                    continue
                if in_list and set(buf[end:]) <= set(".eE+-"):
                    raise TruncatedFile(str(path))
                return obj, end

        if not skip_space():
            raise json.JSONDecodeError("no JSON value", buf, pos)
        if buf[pos] != "[":
            obj, pos = value(in_list=False)
            if skip_space():  # more values after the first: JSON lines (nothing yielded yet)
                raise JsonLines(str(path))
            yield obj
            return
        pos += 1
        if skip_space() and buf[pos] == "]":
            pos += 1
        else:
            while True:
                obj, pos = value(in_list=True)
                yield obj
                if not skip_space():
                    raise TruncatedFile(str(path))
                pos += 1
                if buf[pos - 1] == "]":
                    break
                if buf[pos - 1] != ",":
                    raise json.JSONDecodeError("expecting ',' or ']'", buf, pos - 1)
                if not skip_space():
                    raise TruncatedFile(str(path))
        if skip_space():
            raise json.JSONDecodeError("extra data after the list", buf, pos)


def _read_table(path: Path, fmt: RecordFormat, kind: str) -> Iterator[Record]:
    """Parquet or Arrow IPC record batches; only the columns the format names are read."""
    try:
        batches, names = _open_table(path, kind, fmt)
    except Exception:
        yield None, "unreadable_file"
        return
    top = fmt.text_field.split(".")[0]
    if top not in names:
        yield None, f"missing_{fmt.text_field}_column"
        return
    plain = "." not in fmt.text_field and not fmt.drop
    try:
        for batch in batches:
            if plain:  # the common case: one top-level string column
                for text in batch.column(top).to_pylist():
                    yield (
                        _checked(text, fmt)
                        if isinstance(text, str)
                        else (None, f"missing_{fmt.text_field}")
                    )
            else:
                yield from (document(r, fmt) for r in batch.to_pylist())
    except Exception:
        yield None, "truncated_file"


def _open_table(path: Path, kind: str, fmt: RecordFormat):
    import pyarrow as pa

    wanted = {fmt.text_field.split(".")[0]} | {k.split(".")[0] for k, _ in fmt.drop}
    if kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        columns = [n for n in names if n in wanted]
        return parquet.iter_batches(columns=columns, batch_size=1024), names
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        names = reader.schema.names
        return (reader.get_batch(i) for i in range(reader.num_record_batches)), names
    return iter(reader), reader.schema.names


def _newlines(blocks: Iterator[str]) -> Iterator[str]:
    """`blocks` with CRLF and CR line ends read as LF, as Python's text mode reads them (a CR
    at a block's end waits for the next block)."""
    carry = ""
    for block in blocks:
        block = carry + block
        carry = "\r" if block.endswith("\r") else ""
        yield block.removesuffix(carry).replace("\r\n", "\n").replace("\r", "\n")
    if carry:
        yield "\n"


def _read_text(path: Path, fmt: RecordFormat) -> Iterator[Record]:
    """The file as one document, or its parts between separators, read `BLOCK` at a time; line
    ends read as in Python's text mode (CRLF and CR as LF), the separator's too."""
    pending, separator = "", "".join(_newlines(iter([fmt.separator or ""])))
    try:
        with open(path, "rb") as f:
            text = _Utf8(f)

            def blocks() -> Iterator[str]:  # each read at least as long as what is pending
                while block := text.read(max(BLOCK, len(pending))):
                    yield block

            for block in _newlines(blocks()):
                pending += block
                if separator:
                    *parts, pending = pending.split(separator)
                    yield from (_checked(part, fmt) for part in parts)
    except UnicodeDecodeError:
        yield None, "non_utf8"
        return
    except OSError:
        yield None, "unreadable_file"
        return
    yield _checked(pending, fmt)


def record_fields(path: Path) -> list[str]:
    """The top-level fields of a file's first record (for the error naming the fields that
    exist when a text field is in no record)."""
    kind = kind_of(path)
    try:
        if kind == "lines":
            for block in _blocks(path):
                obj = json.loads(block.split(b"\n", 1)[0])
                return sorted(obj) if isinstance(obj, dict) else []
        if kind == "json":
            first = next(_json_values(path))
            return sorted(first) if isinstance(first, dict) else []
        if kind in ("parquet", "arrow"):
            return list(_open_table(path, kind, RecordFormat())[1])
    except Exception:
        return []
    return []
