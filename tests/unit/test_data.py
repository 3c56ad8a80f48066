"""Corpora and partitions: deterministic, disjoint, skewed where asked, clear errors."""

from __future__ import annotations

import pytest
import torch

from islands.core.errors import DataError
from islands.data import ByteData, TextDataConfig, load_documents
from islands.data.corpus import split_train_val


def data(**kw) -> ByteData:
    workers = kw.pop("workers", 4)
    seed = kw.pop("seed", 0)
    return ByteData(TextDataConfig(max_bytes=400_000, **kw), workers=workers, block_size=32,
                    seed=seed)


def test_stdlib_corpus_is_real_python_and_split_by_file():
    docs = load_documents("python-stdlib", 400_000)
    assert all(d.path.endswith(".py") for d in docs)
    train, val = split_train_val(docs, 0.1)
    assert {d.path for d in train}.isdisjoint({d.path for d in val})
    assert len(train) + len(val) == len(docs)
    assert (train, val) == split_train_val(load_documents("python-stdlib", 400_000), 0.1)


def test_batch_depends_only_on_seed_worker_step():
    a, b = data(), data()
    x1, y1 = a.batch(2, 17)
    x2, y2 = b.batch(2, 17)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # next-byte targets
    assert not torch.equal(x1, a.batch(2, 18)[0])
    assert not torch.equal(x1, a.batch(1, 17)[0])
    assert not torch.equal(x1, data(seed=1).batch(2, 17)[0])
    assert x1.shape == (8, 32) and x1.dtype == torch.long


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "by_source"])
def test_partitions_are_disjoint_and_cover(kind):
    d = data(partition=kind)
    parts = [set(p.tolist()) for p in d.parts]
    assert all(parts) and sum(len(p) for p in parts) == len(d.starts)
    assert set().union(*parts) == set(range(len(d.starts)))


def test_iid_is_balanced_and_dirichlet_is_skewed():
    iid = data(partition="iid", chunk_bytes=1024)
    sizes = [iid.size(w) for w in range(4)]
    assert max(sizes) / min(sizes) < 1.05
    skew = data(partition="dirichlet", alpha=0.1)
    sizes = [skew.size(w) for w in range(4)]
    assert max(sizes) / min(sizes) > 1.5


def test_by_source_gives_workers_different_files():
    d = data(partition="by_source", chunk_bytes=1024)
    starts = [d.starts[p] for p in d.parts]
    # Contiguous runs of the path-ordered stream: worker w's chunks all precede worker w+1's.
    assert all(starts[w].max() < starts[w + 1].min() for w in range(3))


def test_text_file_and_folder_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 2000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("lorem ipsum " * 2000)
    folder = ByteData(TextDataConfig(corpus=str(tmp_path), val_fraction=0.3, chunk_bytes=256),
                      workers=2, block_size=16, seed=0)
    assert folder.train_bytes + folder.val_bytes == 26_000 + 24_000
    single = ByteData(TextDataConfig(corpus=str(tmp_path / "a.txt"), chunk_bytes=256),
                      workers=2, block_size=16, seed=0)
    assert single.val_bytes > 0 and single.train_bytes > 0


def test_missing_corpus_names_the_path():
    with pytest.raises(DataError, match=r"data.corpus path '/no/such/corpus' does not exist"):
        load_documents("/no/such/corpus")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no non-empty text files"):
        load_documents(str(tmp_path))


def test_too_many_workers_for_the_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 3000)
    with pytest.raises(DataError, match="chunks for 64 workers"):
        ByteData(TextDataConfig(corpus=str(tmp_path / "a.txt"), chunk_bytes=1024), workers=64,
                 block_size=16, seed=0)


def test_validation_batches_fixed():
    a, b = data().val_batches(), data().val_batches()
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert len(a) == 8 and all(x.shape == (8, 32) for x, _ in a)


def test_binary_files_in_a_folder_are_skipped_with_a_warning(tmp_path):
    from islands.core.errors import IslandsWarning

    (tmp_path / "a.txt").write_text("hello world, " * 2000)
    (tmp_path / "tool.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40)
    with pytest.warns(IslandsWarning, match=r"skipped 1 binary file\(s\).*tool.txt"):
        docs = load_documents(str(tmp_path))
    assert [d.path for d in docs] == ["a.txt"]


def test_a_binary_file_as_the_corpus_is_an_error(tmp_path):
    exe = tmp_path / "program"
    exe.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40)
    with pytest.raises(DataError, match="is a binary file, not text"):
        load_documents(str(exe))


def test_a_folder_of_unread_extensions_says_which_are_read(tmp_path):
    for i in range(3):
        (tmp_path / f"page{i}.xml").write_text("<p>text</p>" * 100)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"extensions \.xml \(3\), \.parquet \(1\); the ones "
                                        r"read are .*\.md.*\.py.*\.txt"):
        load_documents(str(tmp_path))


def test_python_docs_corpus_is_english_prose_shipped_with_python():
    docs = load_documents("python-docs")
    assert len(docs) > 50 and sum(len(d.data) for d in docs) > 300_000
    assert all(d.path.endswith(".txt") for d in docs)
    assert any(d.path == "assert/0.txt" and b"assert" in d.data for d in docs)
    assert {d.source for d in docs} >= {"atom", "bltin"}  # by topic family
    few = load_documents("python-docs", 50_000)
    assert 50_000 <= sum(len(d.data) for d in few) < 200_000
    train, val = split_train_val(docs, 0.05)
    assert {d.path for d in train}.isdisjoint({d.path for d in val})
    assert sum(len(d.data) for d in val) > 10_000  # enough to evaluate on
    d = ByteData(TextDataConfig(corpus="python-docs"), workers=4, block_size=32, seed=0)
    x, _ = d.batch(0, 0)
    assert x.shape == (8, 32)
