from types import SimpleNamespace

import numpy as np
import pytest

from gptlab.data.blocks import TokenBlocks, TrainOrder, eval_batches
from gptlab.data.filters import labelled_documents, plan_split
from gptlab.data.pack import write_token_streams
from gptlab.data.sources import PythonSource, python_source_files
from gptlab.tokenizer import train_bpe


def test_python_source_selection_is_deterministic_and_capped():
    a = python_source_files([], 200_000)
    b = python_source_files([], 200_000)
    assert [f.key for f in a] == [f.key for f in b]
    assert 0 < sum(f.size for f in a) <= 200_000
    assert all(f.key.endswith(".py") for f in a)
    src = PythonSource(SimpleNamespace(paths=[], max_bytes=200_000, keywords=[], min_chars=1), None)
    valid = {}
    for seed in (0, 1):
        plan = plan_split([src], 0.1, seed, show_progress=False)
        labels = [v for v, _ in labelled_documents([src], plan, seed)]
        assert sum(labels) == plan["n_valid"] == round(0.1 * len(labels)) and len(labels) == len(a)
        valid[seed] = labels
    assert valid[0] != valid[1]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        python_source_files([str(tmp_path / "nope")], 1000)


def test_pack_puts_eos_after_each_document_and_blocks_cut_the_stream(tmp_path):
    docs = ["def f():\n    return 1\n", "x = [i for i in range(3)]\n", "print('héllo')\n"] * 20
    tok = train_bpe(docs, 300, 1, ["<|endoftext|>"])
    info = write_token_streams(((False, d) for d in docs), tok, tmp_path, show_progress=False)
    ids = np.fromfile(tmp_path / "train.bin", dtype=info["dtype"])
    assert info["dtype"] == "uint16" and info["train"]["tokens"] == ids.size and info["train"]["documents"] == 60
    assert info["valid"] == {"tokens": 0, "documents": 0, "dropped_tokens": 0, "bytes": 0}
    assert info["train"]["bytes"] == sum(len(d.encode("utf-8")) for d in docs)  # 'é' is 2 bytes
    eos = tok.eos_token_id
    assert (ids == eos).sum() == 60 and ids[-1] == eos
    first = ids[: int(np.argmax(ids == eos))]
    assert tok.decode(first.tolist()) == docs[0]
    blocks = TokenBlocks(tmp_path / "train.bin", info["dtype"], 16)
    assert len(blocks) == ids.size // 16
    batch = blocks.batch(np.array([2, 0]))
    assert batch.shape == (2, 16) and batch.dtype.is_floating_point is False
    assert batch[1].tolist() == ids[:16].tolist() and batch[0].tolist() == ids[32:48].tolist()


def test_two_processes_read_what_one_process_reads():
    one = TrainOrder(100, micro_batch_size=3, grad_accum=4, world_size=1, rank=0, seed=5)
    two = [TrainOrder(100, 3, 2, world_size=2, rank=r, seed=5) for r in range(2)]
    for step in range(20):  # crosses epoch boundaries (33 micro-batches per epoch)
        ref = np.concatenate(one.micro_batches(step))
        r0, r1 = (np.concatenate(t.micro_batches(step)) for t in two)
        assert not set(r0) & set(r1)
        assert sorted(ref) == sorted(np.concatenate([r0, r1]))


def test_epochs_are_fresh_permutations():
    order = TrainOrder(12, micro_batch_size=4, grad_accum=1, world_size=1, rank=0, seed=0)
    epoch0 = np.concatenate([order.micro_batches(s)[0] for s in range(3)])
    epoch1 = np.concatenate([order.micro_batches(s)[0] for s in range(3, 6)])
    assert sorted(epoch0) == list(range(12)) == sorted(epoch1)
    assert epoch0.tolist() != epoch1.tolist()
    # shuffle=false: the file's order every epoch, and the step's batches across processes too
    order = TrainOrder(12, micro_batch_size=2, grad_accum=2, world_size=1, rank=0, seed=0, shuffle=False)
    assert [b.tolist() for s in range(4) for b in order.micro_batches(s)][:7] == [[0, 1], [2, 3], [4, 5], [6, 7],
                                                                                  [8, 9], [10, 11], [0, 1]]
    two = [TrainOrder(12, 2, 1, world_size=2, rank=r, seed=0, shuffle=False) for r in range(2)]
    assert [b.tolist() for b in two[1].step_batches(1)] == [[4, 5], [6, 7]]
    assert two[1].micro_batches(1)[0].tolist() == [6, 7]


def test_batch_warmup_reads_the_first_sequences_of_each_micro_batch():
    full = TrainOrder(12, micro_batch_size=2, grad_accum=2, world_size=1, rank=0, seed=0, shuffle=False)
    warm = TrainOrder(12, 2, 2, world_size=1, rank=0, seed=0, shuffle=False, warmup_steps=2, warmup_micro=1)
    assert [b.tolist() for b in warm.micro_batches(0)] == [[0], [2]]
    assert [b.tolist() for b in warm.step_batches(1)] == [[4], [6]]
    # from step warmup_steps on, the order is the one without a warmup: the step fixes the blocks
    for step in range(2, 6):
        assert [b.tolist() for b in warm.micro_batches(step)] == [b.tolist() for b in full.micro_batches(step)]
    assert warm.epoch_at(3) == full.epoch_at(3)


def test_sequence_warmup_reads_the_first_tokens_of_each_block(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(40, dtype=np.uint16).tofile(path)
    blocks = TokenBlocks(path, "uint16", block_size=8)
    short = blocks.prefix(3)
    assert short.batch(np.array([1, 4])).tolist() == [[8, 9, 10], [32, 33, 34]]
    assert short.targets(np.array([1, 4])).tolist() == [2, 2] and short.n_tokens(np.array([1, 4])) == 6
    assert len(short) == len(blocks) == 5  # the same blocks, fewer tokens of each
    assert blocks.batch(np.array([1])).tolist() == [list(range(8, 16))] and blocks.targets(np.array([1])).tolist() == [7]
    split = blocks.rows(4)  # every token of each block, as two rows of 4
    assert split.batch(np.array([1, 4])).tolist() == [[8, 9, 10, 11], [12, 13, 14, 15], [32, 33, 34, 35], [36, 37, 38, 39]]
    assert split.targets(np.array([1, 4])).tolist() == [3] * 4 and split.n_tokens(np.array([1, 4])) == 16


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shares_cover_every_block_once(world):
    seen = np.concatenate([np.concatenate(eval_batches(11, 4, world, r)) for r in range(world)])
    assert sorted(seen) == list(range(11))
