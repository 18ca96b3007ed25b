
from colodiffusion.data.loader import ResumableLoader, rank_indices
from common import index_dataset




def ids(batch):
    return [int(c) for c in batch["caption"]]


def test_resume_mid_epoch_continues_the_same_sequence():
    full = ResumableLoader(index_dataset(50), 4, seed=3)
    expected = [ids(next(full)) for _ in range(30)]  # crosses epoch boundaries (12 batches/epoch)
    part = ResumableLoader(index_dataset(50), 4, seed=3)
    got = [ids(next(part)) for _ in range(17)]
    state = part.state_dict()
    resumed = ResumableLoader(index_dataset(50), 4, seed=3)
    resumed.load_state_dict(state)
    got += [ids(next(resumed)) for _ in range(13)]
    assert got == expected


def test_epochs_reshuffle_and_cover_each_sample_once():
    loader = ResumableLoader(index_dataset(48), 8, seed=0)
    e0 = sum((ids(next(loader)) for _ in range(6)), [])
    e1 = sum((ids(next(loader)) for _ in range(6)), [])
    assert sorted(e0) == sorted(e1) == list(range(48)) and e0 != e1


def test_ranks_get_disjoint_slices_that_cover_the_epoch():
    slices = [rank_indices(100, seed=1, epoch=2, rank=r, world_size=4) for r in range(4)]
    flat = sum(slices, [])
    assert len(set(flat)) == len(flat) == 100
    assert all(len(s) == 25 for s in slices)
