"""A client's batches (client.py): its seeded order of rows, and their frozen inputs gathered
from the feature store's tensors as float32, the same with or without a thread that prefetches."""
import torch

import client
from options import Config
from store import features

ROWS = list(range(13, 34))  # 21 rows: 4 batches of 6 an epoch


def stored_inputs(n=40):
    """Frozen inputs as the feature store holds them: float16 features (v, P) and uint8 pixels."""
    generator = torch.Generator().manual_seed(0)
    v, P = torch.randn(n, 8, generator=generator), torch.randn(n, 5, 8, generator=generator)
    pixels = torch.randint(0, 256, (n, 3, 4, 4), generator=generator, dtype=torch.uint8)
    return tuple(torch.from_numpy(x) for x in features.as_stored((v, P, pixels)))


def test_prefetching_batches_give_the_same_batches():
    stored, targets = stored_inputs(), (torch.rand(40, 6, generator=torch.Generator().manual_seed(1)) < 0.2).long()
    cfg = Config(batch_size=6, local_epochs=2)
    order = client.client_order(ROWS, cfg, torch.Generator().manual_seed(0))
    plain = list(client.batches(stored, targets, order, "cpu"))
    ahead = list(client.batches(stored, targets, order, "cpu", prefetch=True))
    assert len(plain) == len(ahead) == 8
    for (inputs, y), (inputs2, y2) in zip(plain, ahead):
        assert torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(inputs, inputs2))
    rows = order[0]  # index_select gives what x[rows] gave
    assert all(a.dtype == torch.float32 and torch.equal(a, x[rows].float()) for a, x in zip(plain[0][0], stored))
    sliced = client.gather(stored, slice(5, 17), "cpu")  # a slice of rows: read as a view
    indexed = client.gather(stored, torch.arange(5, 17), "cpu")
    assert all(torch.equal(a, x[5:17].float()) and torch.equal(b, a) for a, b, x in zip(sliced, indexed, stored))


def test_each_epoch_visits_every_row_once_in_a_seeded_order():
    cfg = Config(batch_size=6, local_epochs=2)
    order = client.client_order(ROWS, cfg, torch.Generator().manual_seed(0))
    epochs = torch.cat(order).split(len(ROWS))
    assert [len(batch) for batch in order] == [6, 6, 6, 3] * 2
    assert all(sorted(epoch.tolist()) == ROWS for epoch in epochs) and not torch.equal(epochs[0], epochs[1])
    again = client.client_order(ROWS, cfg, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(order, again))
