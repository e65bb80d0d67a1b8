"""`tinyrecipe prepare`: every input format, the record options, sharded preparation and merge,
tokenizers from model directories, and bad input as one line."""

import codecs
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tinyrecipe.cli import main as cli
from tinyrecipe.data.prep import read_metadata, split_documents
from tinyrecipe.data.readers import RecordFormat, expand_inputs, read_records
from tinyrecipe.data.tokenizer import load_tokenizer, train_bpe_tokenizer

from .conftest import ROOT

TEXTS = [f"document number {i}: " + "the quick brown fox jumps. " * (i % 7 + 1) for i in range(60)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(TEXTS * 3, 320, out)
    return out


def records(texts, start=0):
    return [{"id": start + i, "text": t, "meta": {"source": "web"}} for i, t in enumerate(texts)]


def write_all_formats(root, texts):
    """The texts spread over one file of each format (8 texts a file), in this order."""
    root.mkdir(parents=True, exist_ok=True)
    groups = [texts[i : i + 8] for i in range(0, len(texts), 8)]
    lines = lambda g, s: "".join(json.dumps(r) + "\n" for r in records(g, s)).encode()  # noqa: E731
    (root / "a.jsonl").write_bytes(lines(groups[0], 0))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(lines(groups[1], 8)))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(groups[2], 16)))
    (root / "d.json").write_text(json.dumps(records(groups[3], 24)))
    pq.write_table(pa.Table.from_pylist(records(groups[4], 32)), root / "e.parquet")
    table = pa.Table.from_pylist(records(groups[5], 40))
    with pa.ipc.new_stream(root / "f.arrow", table.schema) as w:
        w.write_table(table)
    hf = root / "g_saved"  # the layout of datasets' save_to_disk
    hf.mkdir()
    table = pa.Table.from_pylist(records(groups[6], 48))
    with pa.ipc.new_stream(hf / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    (hf / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (hf / "dataset_info.json").write_text("{}")
    (root / "h.txt").write_text("\n\n\n".join(groups[7]))
    return [t for g in groups[:8] for t in g]


def test_every_format_yields_its_documents_in_order(tmp_path, tok, capsys):
    want = write_all_formats(tmp_path / "raw", TEXTS)
    files = expand_inputs([tmp_path / "raw"])
    assert [f.name for f in files][-2:] == ["data-00000-of-00001.arrow", "h.txt"]
    fmt = RecordFormat(separator="\n\n\n")
    got = [t for f in files for t, r in read_records(f, fmt) if r is None]
    assert got == want
    # nested fields, dropping by value, a minimum length, as the prepare command takes them
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"doc": {"body": "long enough text here", "lang": "en"}},
                {"doc": {"body": "tiny", "lang": "en"}},
                {"doc": {"body": "another long text", "lang": "de"}},
                {"doc": {"lang": "en"}},
            ]
        ),
        tmp_path / "nested.parquet",
    )
    fmt = RecordFormat("doc.body", drop=(("doc.lang", "de"),), min_chars=10)
    assert [r or t for t, r in read_records(tmp_path / "nested.parquet", fmt)] == [
        "long enough text here",
        "short",
        "dropped_de",
        "missing_doc.body",
    ]

    code = cli(
        [
            "prepare",
            str(tmp_path / "raw"),
            "--separator",
            r"\n\n\n",
            "--tokenizer",
            str(tok),
            "--out",
            str(tmp_path / "out"),
            "--val-permille",
            "200",
            "--workers",
            "2",
        ]
    )
    assert code == 0
    said = capsys.readouterr().out  # a record skipped is counted once, on the train line
    assert "skipped: as train (the same files)" in said.splitlines()[-1], said
    meta = {s: read_metadata(tmp_path / "out" / s) for s in ("train", "validation")}
    assert meta["train"]["documents"] + meta["validation"]["documents"] == len(want)
    assert meta["validation"]["documents"] > 0 and meta["train"]["val_permille"] == 200
    t = load_tokenizer(tok)
    docs = list(split_documents(tmp_path / "out/train")) + list(
        split_documents(tmp_path / "out/validation")
    )
    assert sorted(d.tolist() for d in docs) == sorted(
        [t.bos_id, *ids, t.eos_id] for ids in t.encode_batch(want)
    )


def prepare(*args, cwd=ROOT):
    return subprocess.Popen(
        [sys.executable, "-m", "tinyrecipe.cli", "prepare", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


def test_parts_prepared_apart_merge_into_the_one_shot_split(tmp_path, tok, capsys):
    """3 processes (as 3 machines of a job array) prepare a part each; the merge is byte-identical
    to the one-shot split (chunks, and index.json but for litdata's write time), so training reads
    the same batches. A missing part or parts prepared differently merge nothing."""
    raw = tmp_path / "raw"
    for i in range(6):
        write_all_formats(raw / f"dir{i}", TEXTS[i:] + TEXTS[:i])
    common = [
        raw,
        "--separator",
        r"\n\n\n",
        "--tokenizer",
        tok,
        "--chunk-tokens",
        900,
        "--val-permille",
        100,
        "--workers",
        1,
    ]
    procs = [prepare(*common, "--out", tmp_path / "sharded", "--shard", f"{i}/3") for i in range(3)]
    assert cli(["prepare", *map(str, common), "--out", str(tmp_path / "oneshot")]) == 0
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    parts = sorted((tmp_path / "sharded/parts").iterdir())
    assert [p.name for p in parts] == ["0-of-3", "1-of-3", "2-of-3"]
    assert all(read_metadata(p / "train")["documents"] > 0 for p in parts)

    assert cli(["prepare", "merge", *map(str, parts[:2]), "--out", str(tmp_path / "m")]) == 2
    assert "part(s) 2/3 missing" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()

    assert cli(["prepare", "merge", *map(str, parts), "--out", str(tmp_path / "sharded")]) == 0
    for split in ("train", "validation"):
        one, merged = tmp_path / "oneshot" / split, tmp_path / "sharded" / split
        names = sorted(p.name for p in one.iterdir())
        assert names == sorted(p.name for p in merged.iterdir())
        assert len(names) > (10 if split == "train" else 2)
        for name in names:
            a, b = (one / name).read_bytes(), (merged / name).read_bytes()
            if name == "index.json":
                a, b = (json.loads(x) for x in (a, b))
                a.pop("updated_at"), b.pop("updated_at")
            assert a == b, (split, name)

    # a part prepared with other options is named; nothing is written
    other = prepare(
        *common[:-4],
        "--val-permille",
        100,
        "--workers",
        1,
        "--boundary",
        "bos",
        "--out",
        tmp_path / "other",
        "--shard",
        "1/3",
    )
    assert other.wait(timeout=300) == 0
    bad = [parts[0], tmp_path / "other/parts/1-of-3", parts[2]]
    assert cli(["prepare", "merge", *map(str, bad), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part 1/3" in err[0] and "boundary='bos'" in err[0]
    assert not (tmp_path / "m").exists()

    assert cli(["prepare", *map(str, common), "--out", str(tmp_path / "s"), "--slurm", "4"]) == 0
    script = (tmp_path / "s/prepare.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and '--shard "${SLURM_ARRAY_TASK_ID}/4"' in script
    assert "--slurm" not in script
    assert " merge " in (tmp_path / "s/prepare-merge.sbatch").read_text()
    assert f"cd {Path.cwd()}" in script  # the relative paths it was given mean the same there


def one_line(capsys, argv, *needles):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinyrecipe prepare: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tok, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    out = str(tmp_path / "out")
    base = ["--tokenizer", str(tok), "--out", out]
    one_line(
        capsys,
        ["prepare", str(raw), *base],
        "has the text field 'text'",
        "body, id",
        "--text-field",
    )
    one_line(capsys, ["prepare", str(tmp_path / "*.jsonl"), *base], "matches no readable file")
    pq.write_table(pa.table({"body": ["x"]}), raw / "a.parquet")
    one_line(capsys, ["prepare", str(raw / "a.parquet"), *base], "'text'", "body")
    (raw / "notes.docx").write_text("x")
    one_line(capsys, ["prepare", str(raw / "notes.docx"), *base], "unknown format", ".jsonl")
    (raw / "dd").mkdir()
    (raw / "dd/dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    one_line(capsys, ["prepare", str(raw / "dd"), *base], "DatasetDict", "dd/train")
    one_line(capsys, ["prepare", str(raw), "--shard", "3/3", *base], "shard 3/3 is out of range")
    small = tmp_path / "small.jsonl"  # 20 documents: none in a 5-per-1000 share
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:20]))
    one_line(capsys, ["prepare", str(small), *base], "--val-permille 5", "0 (a train split only)")
    assert not (tmp_path / "out").exists()  # its train split, complete, not published either

    # damaged and mixed input is skipped and counted, never half-read
    good = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5]).encode()
    mixed = raw / "mixed"
    mixed.mkdir()
    (mixed / "latin1.jsonl").write_bytes(good + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (mixed / "cut.jsonl.gz").write_bytes(gzip.compress(good)[:-12])
    (mixed / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(good)[:-5])
    (mixed / "bad.parquet").write_bytes(b"PAR1 not really")
    assert cli(["prepare", str(mixed), *base, "--val-permille", "0"]) == 0
    assert "non_utf8 1" in capsys.readouterr().out
    meta = read_metadata(tmp_path / "out/train")
    assert meta["skipped"] == {"non_utf8": 1, "truncated_file": 2, "unreadable_file": 1}
    assert meta["documents"] >= 5


def test_json_lists_and_separated_text_are_read_in_blocks(tmp_path, monkeypatch):
    """A `.json` list and a `.txt` split by a separator are read block by block: memory holds a
    record, not the file. Values that cross blocks (records longer than a block, numbers,
    escapes, multi-byte UTF-8, separators) come out whole; a cut or damaged file keeps the
    records before the damage and counts it once."""
    import tracemalloc

    from tinyrecipe.data import readers

    monkeypatch.setattr(readers, "BLOCK", 7)  # every value crosses a block boundary
    texts = ["short", "\u00e9" * 40 + " \\u00e9 \u2603", "x" * 100, 'a " and a \\ here']
    recs = [
        {"id": 10**12 + i, "text": t, "score": -1.5e-3, "ok": True} for i, t in enumerate(texts)
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(recs, indent=1, ensure_ascii=False))
    assert [r or t for t, r in read_records(path, RecordFormat())] == texts
    (tmp_path / "one.json").write_text(json.dumps(recs[1]))  # one object: one record
    assert [r or t for t, r in read_records(tmp_path / "one.json", RecordFormat())] == texts[1:2]
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert list(read_records(tmp_path / "empty.json", RecordFormat())) == []
    for content, want in {  # damage at the end, a byte-order mark, numbers cut
        b'[{"text": "a"},]': ["a", "malformed_json"],
        b'[{"text": "a"} {"text": "b"}]': ["a", "malformed_json"],
        b'[{"text": "a"}]]': ["a", "malformed_json"],
        b'[{"text": "a"},': ["a", "truncated_file"],
        b'[{"text": "a"}, {"n": -1.': ["a", "truncated_file"],
        b'[{"text": "a"}, 12': ["a", "truncated_file"],
        b'[{"text": "a"}]\xff': ["a", "non_utf8"],
        b'\xef\xbb\xbf[{"text": "a"}]': ["a"],
    }.items():
        (tmp_path / "x.json").write_bytes(content)
        assert [r or t for t, r in read_records(tmp_path / "x.json", RecordFormat())] == want
    data = path.read_bytes()
    damaged = {
        "cut.json": (data[: data.index(b'"xxx')], "truncated_file"),
        "bad.json": (data.replace(b'"x', b'"x",,', 1), "malformed_json"),
        "latin1.json": (data.replace(b"xxx", "\u00e9".encode("latin-1"), 1), "non_utf8"),
    }
    for name, (content, reason) in damaged.items():
        (tmp_path / name).write_bytes(content)
        got = [r or t for t, r in read_records(tmp_path / name, RecordFormat())]
        assert got == [*texts[:2], reason], name
    (tmp_path / "t.txt").write_text("\n\n\n".join(texts))
    got = [r or t for t, r in read_records(tmp_path / "t.txt", RecordFormat(separator="\n\n\n"))]
    assert got == texts

    monkeypatch.setattr(readers, "BLOCK", 1 << 16)
    big = [{"text": f"record {i} " + "y" * 1000} for i in range(8000)]  # ~8 MB
    path.write_text(json.dumps(big))
    (tmp_path / "big.txt").write_text("\n\n".join(r["text"] for r in big))
    text = path.read_text()
    (tmp_path / "bad.json").write_text(text.replace("record 1 ", 'record 1 ",,"', 1))
    for name, fmt, documents in (
        ("a.json", RecordFormat(), len(big)),
        ("big.txt", RecordFormat(separator="\n\n"), len(big)),
        ("bad.json", RecordFormat(), 1),  # found without reading the rest
    ):
        tracemalloc.start()
        count = sum(r is None for _, r in read_records(tmp_path / name, fmt))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == documents and peak < 1 << 20, (name, peak)  # the file: 8 MiB


def test_a_model_directory_tokenizer_reads_its_own_special_tokens(tmp_path, tok):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_bytes((tok / "tokenizer.json").read_bytes())
    (model / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "</s>"}, "eos_token": "<unk>"})
    )
    t = load_tokenizer(model)
    assert (t.bos_id, t.eos_id) == (2, 0)
    (model / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [0, 7]}))
    load_tokenizer(model)
    (model / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 0}))
    with pytest.raises(ValueError, match="bos_token_id=1 but its tokenizer gives 2"):
        load_tokenizer(model)
    (model / "config.json").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin|>"}))
    with pytest.raises(ValueError, match="has no BOS or EOS token; name them in"):
        load_tokenizer(model)


def test_the_presets_are_the_generic_command_with_their_options(corpus, tmp_path):
    """data_prep/prepare_slimpajama.py (the corpus fixture ran it) writes the same bytes as
    `tinyrecipe prepare` given SlimPajama's record options by hand."""
    raw = corpus["root"] / "raw/slimpajama"
    argv = [
        "prepare",
        str(raw / "train"),
        "--validation",
        str(raw / "validation"),
        "--drop",
        "meta.redpajama_set_name=RedPajamaGithub",
        "--chunk-tokens",
        "8192",
        "--tokenizer",
        str(corpus["root"] / "tok"),
        "--out",
        str(tmp_path),
    ]
    assert cli(argv) == 0
    for split in ("train", "validation"):
        preset = corpus["root"] / "slim" / split
        names = sorted(p.name for p in preset.glob("*.bin"))
        assert names and names == sorted(p.name for p in (tmp_path / split).glob("*.bin"))
        for name in names:
            assert (preset / name).read_bytes() == (tmp_path / split / name).read_bytes()
        assert read_metadata(preset) == read_metadata(tmp_path / split)


def test_readers_take_the_files_other_tools_write(tmp_path):
    """CRLF text split on a blank line; a byte-order mark before JSON lines and text; JSON lines
    in a `.json` file (`datasets`' to_json); `--drop` on a boolean or null; a lone surrogate
    escape skipped as non_utf8; a directory with some other state.json read as files."""

    def read(name, fmt=None, data=b""):
        path = tmp_path / name
        path.write_bytes(data)
        return [t or r for t, r in read_records(path, fmt or RecordFormat())]

    crlf = b"doc one\r\nline\r\n\r\ndoc two\r\rdoc three\r"
    assert read("crlf.txt", RecordFormat(separator="\n\n"), crlf) == [
        "doc one\nline",
        "doc two",
        "doc three\n",
    ]
    assert read("sep.txt", RecordFormat(separator="\r\n\r\n"), crlf)[0] == "doc one\nline"
    bom = codecs.BOM_UTF8
    assert read("bom.jsonl", data=bom + b'{"text": "first"}\n{"text": "second"}\n') == [
        "first",
        "second",
    ]
    assert read("bom.txt", data=bom + b"hello") == ["hello"]
    lines = b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(3))
    assert read("lines.json", data=lines) == ["doc 0", "doc 1", "doc 2"]
    records = [{"text": "a", "m": {"dup": True}}, {"text": "b", "m": {"dup": None}}]
    records += [{"text": "c", "m": {"dup": False}}, {"text": "d"}]
    data = json.dumps(records).encode()
    fmt = RecordFormat(drop=(("m.dup", "true"), ("m.dup", "null")))
    assert read("drop.json", fmt, data) == ["dropped_true", "dropped_null", "c", "d"]
    import datetime

    days = [datetime.date(2023, 1, d) for d in (1, 2, 3)]
    pq.write_table(pa.table({"text": ["a", "b", "c"], "day": days}), tmp_path / "days.parquet")
    fmt = RecordFormat(drop=(("day", "2023-01-02"),))  # a date column: its text
    got = [t or r for t, r in read_records(tmp_path / "days.parquet", fmt)]
    assert got == ["a", "dropped_2023-01-02", "c"]
    assert read("odd.jsonl", data=b'{"text": "a\\ud800b"}\n{"text": "fine"}\n') == [
        "non_utf8",
        "fine",
    ]
    crawl = tmp_path / "crawl"
    (crawl / "part2").mkdir(parents=True)
    (crawl / "part1.jsonl").write_bytes(lines)
    (crawl / "part2/x.jsonl").write_bytes(lines)
    (crawl / "part2/state.json").write_text(json.dumps({"cursor": 7}))
    assert [p.name for p in expand_inputs([crawl])] == ["part1.jsonl", "state.json", "x.jsonl"]


def test_a_separator_keeps_its_characters_and_a_preset_refuses_what_it_ignores(
    tmp_path, tok, capsys
):
    from tinyrecipe.cli.prepare import parse_separator

    assert parse_separator("§§") == "§§" and parse_separator("—") == "—"
    assert parse_separator(r"\n\n") == "\n\n" and parse_separator(r"\u2014") == "—"
    base = ["prepare", str(tmp_path), "--tokenizer", str(tok), "--out", str(tmp_path / "out")]
    for preset, option in (("starcoder", "--min-chars"), ("slimpajama", "--val-permille")):
        one_line(capsys, [*base, "--preset", preset, option, "10"], f"drop {option}")
