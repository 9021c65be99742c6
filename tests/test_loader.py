"""Streaming readers: determinism, exact and elastic resume, and bad shards.

Multi-rank cases run real gloo processes (tests/helpers/ranks.py); each rank opens its reader as
the trainer does and records (sample index, mask hash) for every micro-batch.
"""

import hashlib
import shutil
import tarfile

import pytest

from data_pipeline.errors import DataError
from data_pipeline.loader import ReaderOptions, open_batches
from data_pipeline.mixture import Source
from data_pipeline.readers import MaskingSpec
from data_pipeline.shards import read_manifest
from data_pipeline.trajectory import TrajectorySpec
from tests.helpers.data import SEQ_LEN, VOCAB, prepare, write_corpus
from tests.helpers.ranks import run_ranks


def SOURCE(root, manifest):
    return [Source("data", root, manifest)]


SPEC = MaskingSpec(seed=7, trajectory=TrajectorySpec(num_inner_steps=3), eps=1e-3, seq_len=SEQ_LEN, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), scale=0.08)
    root = tmp_path_factory.mktemp("data") / "ds"
    manifest = prepare(corpus, root, samples_per_shard=16)
    assert 100 < manifest["num_samples"] < 160, manifest["num_samples"]
    return root


def sample_records(batch):
    """(sample index, epoch, hash of t and all masks) for each sample of a batch."""
    records = []
    for i in range(batch.num_sequences):
        digest = hashlib.sha1()
        for tensor in (batch.t[i], batch.anchor_mask[i], batch.inner_masks[:, i], batch.maskable[i]):
            digest.update(tensor.numpy().tobytes())
        records.append((int(batch.sample_index[i]), int(batch.epoch[i]), digest.hexdigest()[:16]))
    return records


def take(root, fmt, micro, count, workers=1, rank=0, ranks=1, state=None, spec=SPEC):
    options = ReaderOptions(data_format=fmt, num_workers=workers)
    batches = open_batches(SOURCE(root, read_manifest(root)), spec, micro, options, rank, ranks, state)
    stream = iter(batches)
    got = [sample_records(next(stream)) for _ in range(count)]
    return got, batches.state_dict()


@pytest.mark.fast
def test_mds_order_and_masks_do_not_depend_on_workers(dataset):
    # 80 micro-batches of 4 = 320 samples: into the third epoch (~130 samples each).
    runs = [take(dataset, "mds", 4, 80, workers=w)[0] for w in (0, 1, 2)]
    assert runs[0] == runs[1] == runs[2]
    epochs = {epoch for batch in runs[0] for _, epoch, _ in batch}
    assert epochs == {0, 1, 2}
    first_epoch = [index for batch in runs[0] for index, epoch, _ in batch if epoch == 0]
    assert len(first_epoch) == len(set(first_epoch)), "no sample twice within an epoch"


@pytest.mark.fast
def test_webdataset_masks_follow_the_sample_not_the_worker(dataset):
    one, two = (take(dataset, "webdataset", 4, 12, workers=w)[0] for w in (1, 2))
    by_index = {}
    for run in (one, two):
        for batch in run:
            for index, epoch, digest in batch:
                assert by_index.setdefault((index, epoch), digest) == digest


@pytest.mark.fast
@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_resume_continues_the_stream_exactly(dataset, fmt):
    straight, _ = take(dataset, fmt, 4, 30)
    first, state = take(dataset, fmt, 4, 13)
    rest, _ = take(dataset, fmt, 4, 17, state=state)
    assert first + rest == straight


@pytest.mark.fast
def test_webdataset_resume_refuses_another_layout(dataset):
    _, state = take(dataset, "webdataset", 4, 3)
    with pytest.raises(DataError, match="webdataset resume needs the layout it was saved with"):
        take(dataset, "webdataset", 2, 1, state=state)


def _two_rank_streams(rank, world, root):
    """Every two-rank stream this file checks, read in one spawned group (MDS, micro-batches of 4):
    20 batches straight (no workers), 12 with one worker, and 7 + 13 with a resume in between."""
    straight = take(root, "mds", 4, 20, rank=rank, ranks=world, workers=0)[0]
    with_worker = take(root, "mds", 4, 12, rank=rank, ranks=world, workers=1)[0]
    first, state = take(root, "mds", 4, 7, rank=rank, ranks=world, workers=0)
    rest = take(root, "mds", 4, 13, rank=rank, ranks=world, state=state, workers=0)[0]
    return {"straight": straight, "with_worker": with_worker, "first": first, "state": state, "rest": rest,
            "prefixes": _prefixes_found(rank)}


def _prefixes_found(rank):
    """The prefix each rank of one two-rank node takes when its own search would see another free (3 + rank),
    as a rank does when another job registers one between its leader's search and its own."""
    from types import SimpleNamespace

    from data_pipeline.loader import _leaders_prefix

    search = _leaders_prefix(lambda *args, **kwargs: 3 + rank, SimpleNamespace(node=0, is_local_leader=rank == 0),
                             None)
    return [search("locals"), search("barrier")]


@pytest.fixture(scope="module")
def two_ranks(dataset):
    return run_ranks(_two_rank_streams, 2, dataset)


def global_batches(per_rank: list, micro_per_global: int) -> list:
    """Per-rank micro-batch records -> the sorted samples of each global batch."""
    merged = [sum(step, []) for step in zip(*per_rank)]  # one entry per global micro-batch
    return [sorted(sum(merged[i:i + micro_per_global], []))
            for i in range(0, len(merged), micro_per_global)]


def test_one_and_two_ranks_see_the_same_global_batches(dataset, two_ranks):
    single, _ = take(dataset, "mds", 8, 12)
    assert global_batches([single], 1) == global_batches([r["with_worker"] for r in two_ranks], 1)
    assert global_batches([single], 1) == global_batches([r["straight"][:12] for r in two_ranks], 1)


def test_two_ranks_resume_exactly(two_ranks):
    assert two_ranks[0]["state"] == two_ranks[1]["state"], "every rank saves the same streaming state"
    for rank in range(2):
        assert two_ranks[rank]["first"] + two_ranks[rank]["rest"] == two_ranks[rank]["straight"]


def test_elastic_resume_from_two_ranks_to_one(dataset, two_ranks):
    """Save with 2 ranks x 4, resume on 1 rank x 8: the global batches continue unchanged."""
    resumed, _ = take(dataset, "mds", 8, 13, state=two_ranks[0]["state"])
    assert global_batches([resumed], 1) == global_batches([r["straight"] for r in two_ranks], 1)[7:]


# -- bad shards --------------------------------------------------------------------------------
@pytest.fixture
def damaged(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    return copy


@pytest.mark.fast
def test_missing_shard_is_named(damaged):
    (damaged / "mds" / "u-000000" / "shard.00001.mds").unlink()
    with pytest.raises(DataError, match=r"shard .*shard.00001.mds is missing"):
        take(damaged, "mds", 4, 1)


@pytest.mark.fast
def test_truncated_shard_is_named(damaged):
    shard = damaged / "webdataset" / "u-000000" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"shard-000002.tar has 1000 bytes but the manifest records"):
        take(damaged, "webdataset", 4, 1)


@pytest.mark.fast
def test_hash_mismatch_is_named(damaged):
    shard = damaged / "mds" / "u-000000" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard.00000.mds does not match its sha256"):
        take(damaged, "mds", 4, 1)


@pytest.mark.fast
def test_token_outside_the_vocabulary_is_named(dataset):
    small = MaskingSpec(7, TrajectorySpec(num_inner_steps=3), 1e-3, SEQ_LEN, vocab_size=100)
    with pytest.raises(DataError, match=r"sample \d+ holds token id \d+ outside the vocabulary \[0, 100\)"):
        take(dataset, "mds", 4, 1, spec=small, workers=0)


def _corrupt_tar(path):
    """Keep the first member intact, garble the rest, same size (so only reading finds it)."""
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as archive:
        first = archive.getmembers()[1]
    cut = first.offset_data + first.size + 600
    data[cut:] = bytes(len(data) - cut)
    data[cut:cut + 512] = b"\x13" * 512
    path.write_bytes(bytes(data))


@pytest.mark.fast
def test_webdataset_skip_budget(damaged):
    manifest = read_manifest(damaged)
    shard = manifest["formats"]["webdataset"]["shards"][1]
    shard_start = manifest["formats"]["webdataset"]["shards"][0]["samples"]
    _corrupt_tar(damaged / "webdataset" / shard["file"])
    options = dict(data_format="webdataset", num_workers=0, verify_hashes=False, shuffle=False)
    # No budget: the damaged shard stops training with its name.
    strict = open_batches(SOURCE(damaged, manifest), SPEC, 4, ReaderOptions(**options))
    with pytest.raises(DataError, match=shard["file"]):
        for _ in range(30):
            next(iter_once(strict))
    # A budget: samples are skipped, counted, and training goes on.
    lenient = open_batches(SOURCE(damaged, manifest), SPEC, 4, ReaderOptions(**options, max_skipped_samples=100))
    stream = iter(lenient)
    batches = [next(stream) for _ in range(25)]
    skipped = sum(b.num_skipped for b in batches)
    indices = {i for b in batches for i in b.sample_index.tolist()}
    lost = set(range(shard_start, shard_start + shard["samples"])) - indices
    assert 0 < skipped == len(lost) < shard["samples"]
    # Past the budget it fails again.
    tight = open_batches(SOURCE(damaged, manifest), SPEC, 4, ReaderOptions(**options, max_skipped_samples=skipped - 1))
    with pytest.raises(DataError, match="over --data.max_skipped_samples"):
        stream = iter(tight)
        for _ in range(30):
            next(stream)


_iterators = {}


def iter_once(batches):
    return _iterators.setdefault(id(batches), iter(batches))



def test_every_rank_of_a_node_takes_its_leaders_streaming_prefix(two_ranks):
    """mosaicml-streaming's ranks each look for the first free shared-memory prefix; ours take their node
    leader's, so a job registering in between cannot hand a rank another job's prefix."""
    assert [ranks["prefixes"] for ranks in two_ranks] == [[3, 3], [3, 3]]
