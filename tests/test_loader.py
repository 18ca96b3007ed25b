
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


def test_a_resumed_run_lists_each_bad_sample_once_and_counts_as_an_uninterrupted_one(tmp_path):
    """Samples met between the last checkpoint and a kill are met again after the resume: counted
    again (the counters come from the checkpoint), but not listed twice in the log."""
    import json

    import torch
    from torch.utils.data import Dataset

    from colodiffusion.data.transforms import BadSample

    class SomeBad(Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            if i % 5 == 0:
                raise BadSample("truncated")
            return {"pixel_values": torch.tensor([float(i)]), "caption": str(i)}

    def listed(log):  # every other line whole: the cut one stays as it was, on its own line
        lines = log.read_text().splitlines()
        return sorted(json.loads(line)["index"] for line in lines if line != '{"key": "cut by the k')

    straight = ResumableLoader(SomeBad(), 4, seed=1, bad_log=tmp_path / "straight.jsonl")
    for _ in range(10):
        next(straight)
    killed = ResumableLoader(SomeBad(), 4, seed=1, bad_log=tmp_path / "resumed.jsonl")
    for _ in range(3):
        next(killed)
    state = killed.state_dict()  # the checkpoint
    for _ in range(3):  # steps whose bad samples reach the log, then the kill
        next(killed)
    with open(tmp_path / "resumed.jsonl", "a") as f:
        f.write('{"key": "cut by the k')  # the kill cut a line
    resumed = ResumableLoader(SomeBad(), 4, seed=1, bad_log=tmp_path / "resumed.jsonl")
    resumed.load_state_dict(state)
    for _ in range(7):
        next(resumed)
    assert resumed.bad_counts() == straight.bad_counts() and straight.bad_counts()["bad/truncated"] > 3
    assert listed(tmp_path / "resumed.jsonl") == listed(tmp_path / "straight.jsonl")
    lines = (tmp_path / "resumed.jsonl").read_text().splitlines()
    assert lines.index('{"key": "cut by the k') < len(lines) - 1  # the resumed run listed new ones after it
