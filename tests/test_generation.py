"""sgdd.generation.decode_sorted: length-sorted batches, outputs and callbacks mapped back to the inputs."""

from types import SimpleNamespace

import torch

from sgdd.config import Config
from sgdd.generation import decode_sorted


class RecordingSampler:
    """Writes each row's input index (z[:, 0]) into its ids; records the slot lengths of every batch."""

    def __init__(self):
        self.batches = []

    def sample(self, model, process, z, lengths, cfg_scale, generator=None, callback=None):
        self.batches.append(lengths.tolist())
        ids = z[:, :1].long().repeat(1, 2) + 3  # decoder ids >= 3 are ordinary tokens
        if callback is not None:
            callback(1, ids)
        return ids


class IdVocab:
    def decode(self, row):
        return " ".join(str(i - 3) for i in row)


def test_batches_are_length_sorted_and_outputs_come_back_in_input_order():
    cfg = Config()
    cfg.training.precision = "fp32"
    z = torch.arange(7, dtype=torch.float32)[:, None]
    lengths = torch.tensor([5, 1, 4, 1, 3, 9, 2])
    sampler, seen = RecordingSampler(), {}

    def callback(step, x, rows):
        for r, row in zip(rows, x.tolist(), strict=True):
            seen[r] = row[0] - 3

    out = decode_sorted(SimpleNamespace(decoder=None), None, sampler, IdVocab(), z, cfg, batch_size=3,
                        lengths=lengths, callback=callback)
    assert out == [f"{i} {i}" for i in range(7)]
    assert sampler.batches == [[1, 1, 2], [3, 4, 5], [9]]  # stable sort: ties keep input order
    assert seen == {i: i for i in range(7)}  # every callback row is named by its input index
