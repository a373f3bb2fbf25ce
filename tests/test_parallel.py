"""--parallel-clients N: clients trained side by side in one process (one text-encoder call per
step, summed losses) end exactly where the sequential loop ends them, to 1e-5 in their training
numbers and tunable state; methods that cannot share the encoder call are refused (exit 2)."""
import pytest
import torch

import data
import evaluation
import experiment
import federate
from backbone import FrozenCLIP, load_clip
from baselines.fedmvp import load_attributes
from conditions import load_conditions
from errors import FedMPTError
from options import Config
from options import ModelConfig
from store import features
import options
import client
from speed import parallel_clients

CLASSES = data.known_classes("voc2007")
PARALLEL = ["fedmpt", "fed-poscoop", "fed-dualcoop", "fedtpg", "fedmvp"]
ROWS = [list(range(0, 13)), list(range(13, 34)), list(range(34, 40))]  # 2, 3 and 1 batches an epoch


def client_setup(method, text_encoding="auto"):
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip("tiny"))
    attributes = load_attributes("voc2007", CLASSES) if method == "fedmvp" else None
    model = experiment.build_model(method, backbone, CLASSES, load_conditions("", "voc2007"),
                                   ModelConfig(text_encoding=text_encoding), attributes, seed=0)
    images = torch.randn(40, 3, backbone.resolution, backbone.resolution)
    with torch.no_grad():
        stored = tuple(torch.from_numpy(x) for x in features.as_stored(model.encode_images(images)))
    targets = (torch.rand(40, len(CLASSES)) < 0.2).long()
    targets[0, 0] = -1  # a masked label
    cfg = Config(method=method, batch_size=6, local_epochs=2, grad_clip=1.0, rounds=3)
    return model, stored, targets, cfg


def sequential(model, stored, targets, cfg, lr=0.05):
    start = model.tunable_state()
    results = [client.local_train(model, start, stored, targets, rows, cfg, lr, federate.client_generator(cfg, 1, c))
               for c, rows in enumerate(ROWS)]
    model.load_tunable_state(start)
    return start, results


def assert_close(together, one_by_one):
    for (state, n, stats), (state1, n1, stats1) in zip(together, one_by_one):
        assert n == n1 and stats["steps"] == stats1["steps"] and stats["clip_share"] == stats1["clip_share"]
        for key in ("loss", "grad_norm"):
            assert stats[key] == pytest.approx(stats1[key], rel=1e-5), key
        assert set(state) == set(state1)
        for name in state:
            scale = float(state1[name].abs().max()) or 1.0
            assert float((state[name] - state1[name]).abs().max()) <= 1e-5 * scale, name


@pytest.mark.parametrize("method", PARALLEL)
def test_clients_side_by_side_equal_the_sequential_loop(method):
    model, stored, targets, cfg = client_setup(method)
    start, one_by_one = sequential(model, stored, targets, cfg)
    generators = [federate.client_generator(cfg, 1, c) for c in range(len(ROWS))]
    together = parallel_clients.train_together(model, start, stored, targets, ROWS, generators, cfg, 0.05)
    assert_close(together, one_by_one)
    assert any(not torch.equal(together[0][0][name], start[name]) for name in start)  # it trained
    assert one_by_one[1][2]["clip_share"] > 0  # the guard clipped (per client)


def test_fedmpt_side_by_side_with_shared_prefixes():
    model, stored, targets, cfg = client_setup("fedmpt", text_encoding="shared")
    start, one_by_one = sequential(model, stored, targets, cfg)
    generators = [federate.client_generator(cfg, 1, c) for c in range(len(ROWS))]
    assert_close(parallel_clients.train_together(model, start, stored, targets, ROWS, generators, cfg, 0.05), one_by_one)


def test_a_round_with_parallel_clients_equals_the_round_one_by_one():
    model, stored, targets, cfg = client_setup("fed-dualcoop")
    start = model.tunable_state()
    rounds = {}
    for n in (1, 2):
        cfg.parallel_clients = n
        rounds[n] = federate.run_round(1, model, start, (stored, targets), ROWS, [0, 1, 2], cfg, print)
    (state1, stats1, n1, _), (state2, stats2, n2, _) = rounds[1], rounds[2]
    assert n1 == n2 == 3 and stats2["loss"] == pytest.approx(stats1["loss"], rel=1e-5)
    assert all(torch.allclose(state2[k], state1[k], atol=1e-6) for k in state1)


@pytest.mark.parametrize("method", ["fed-maple", "fed-ram"])
def test_methods_that_change_tokens_inside_the_encoder_are_refused(method):
    with pytest.raises(FedMPTError, match="--parallel-clients 2"):
        options.validate(Config(method=method, parallel_clients=2), ModelConfig())
    options.validate(Config(method="fedmpt", parallel_clients=2), ModelConfig())


def test_prefetching_batches_give_the_same_batches():
    _, stored, targets, cfg = client_setup("fedmpt")
    order = client.client_order(ROWS[1], cfg, torch.Generator().manual_seed(0))
    plain = list(client.batches(stored, targets, order, "cpu"))
    ahead = list(client.batches(stored, targets, order, "cpu", prefetch=True))
    assert len(plain) == len(ahead) == 8
    for (inputs, y), (inputs2, y2) in zip(plain, ahead):
        assert torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(inputs, inputs2))
    rows = order[0]  # index_select gives what x[rows] gave
    assert all(torch.equal(a, x[rows].float()) for a, x in zip(plain[0][0], stored))
    sliced = client.gather(stored, torch.arange(5, 17), "cpu")  # contiguous rows: a slice
    assert all(torch.equal(a, x[5:17].float()) for a, x in zip(sliced, stored))
    assert evaluation.as_slice(torch.arange(5, 17)) == slice(5, 17) and not isinstance(
        evaluation.as_slice(torch.tensor([3, 1, 2])), slice)
