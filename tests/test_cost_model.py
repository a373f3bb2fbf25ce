"""The cost model counts what a training step runs (benchmarks/cost_model.py): the same counts on
fake tensors as on real ones, the paper-scale FLOPs of issue #34's table; and a training step of
every method reads nothing back to the host (in the CUDA configuration: the Sinkhorn runs its full
iterations, tol 0, as it does on CUDA; on the CPU its tolerance test reads one number every 10)."""
import copy
import functools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import experiment
import speed
from backbone import FrozenCLIP, load_clip
from baselines import METHODS
from baselines.fedmvp import load_attributes
from benchmarks import cost_model
from conditions import load_conditions
from fedmpt import asymmetric_loss
from options import ModelConfig

CLASSES = ["circle", "square", "triangle", "star"]


@functools.lru_cache(maxsize=1)
def tiny_clip():
    return load_clip("tiny")


def tiny_model(method, text_encoding="full", own_backbone=False, **model_options):
    """A method on the tiny CLIP (shared between tests; its own copy to be made fake)."""
    torch.manual_seed(0)
    backbone = FrozenCLIP(copy.deepcopy(tiny_clip()) if own_backbone else tiny_clip())
    attributes = {"attributes": load_attributes("shapes", CLASSES)["attributes"]} if method == "fedmvp" else None
    model = experiment.build_model(method, backbone, CLASSES, load_conditions("", "shapes"),
                                   ModelConfig(**model_options), attributes, seed=0)
    return speed.with_text_encoding(model, text_encoding)


def batch(model, n=4):
    images = torch.randn(n, 3, model.backbone.resolution, model.backbone.resolution)
    with torch.no_grad():
        inputs = [x.float() for x in model.encode_images(images)]  # as client.gather hands them over
    return inputs, (torch.rand(n, len(CLASSES)) < 0.4).long()


@pytest.mark.parametrize("method", list(METHODS))
def test_a_training_step_reads_nothing_back_to_the_host(method):
    """Forward, loss, backward, clip_and_step and the sum of its numbers of one warm step: no operator
    whose result the host must wait for (.item(), bool(t), torch.equal, nonzero, a boolean mask)."""
    model = tiny_model(method, "shared" if method in ("fedmpt", "fed-dualcoop") else "full")
    inputs, targets = batch(model)
    with cost_model.full_iterations():  # the CUDA configuration of ot.sinkhorn (tol 0)
        step = cost_model.training_step(model, inputs, targets)
        step()
        counter = cost_model.OperatorCounter()
        with counter:
            step()
    assert counter.total > 300 and counter.host_reads == {}


def test_the_counter_sees_host_reads():
    """The test above can fail: each of these stops a GPU until the host has the value."""
    x, mask = torch.randn(5), torch.tensor([True, False, True, True, False])
    reads = [lambda: int(x.argmax()), lambda: bool((x > 0).any()), lambda: torch.equal(x, x), lambda: x[mask],
             lambda: x.nonzero(), lambda: x[torch.tensor([0, 2])]]
    seen = []
    for read in reads:
        counter = cost_model.OperatorCounter()
        with counter:
            read()
        seen.append(bool(counter.host_reads))
    assert seen == [True] * 5 + [False]  # indexing by integers needs no value on the host
    model = tiny_model("fed-ram")  # and the CPU Sinkhorn's tolerance test is one
    counter = cost_model.OperatorCounter()
    with counter:
        model.loss(*batch(model), lambda logits, targets: logits.sum())
    assert counter.host_reads == {"_local_scalar_dense": 1}


@pytest.mark.parametrize("method", [m if m in ("fedmpt", "fed-maple") else pytest.param(m, marks=pytest.mark.slow)
                                    for m in METHODS])  # the text side and transport; the image encoder
def test_fake_tensors_count_what_real_ones_run(method):
    """FLOPs, bytes and operators of a loss and its backward on fake tensors (nothing computed,
    no value to read: a host read of any kind would raise) equal those on real ones. (The
    optimizer's and the norm's are left out: on fake tensors they go tensor by tensor, on real
    ones through foreach kernels.)"""
    counts = []
    for fake in (False, True):
        model = tiny_model(method, own_backbone=fake, ot_iters=10)  # fake tensors are slow to dispatch
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        if fake:
            cost_model.fake_model([model], mode, "cpu")
        with mode if fake else torch.enable_grad(), cost_model.full_iterations():
            with torch.no_grad():
                inputs = [x.float() for x in model.encode_images(torch.zeros(4, 3, 64, 64))]
            targets = torch.zeros(4, len(CLASSES), dtype=torch.long)
            counts.append(cost_model.count(lambda: model.loss(inputs, targets, asymmetric_loss).backward()))
    assert counts[0]["flops"] > 1e7 and counts[0] == counts[1]


def test_floors_and_grid_hours_follow_from_the_counts():
    row = {"method": "fedmpt", "classes": 20, "flops": 989e9, "bytes": 4.8e9, "ops": 1000}
    floors = cost_model.floors(row, "h200")  # 1 ms of arithmetic, 1 ms of memory, 1000 launches
    assert floors == pytest.approx({"flops_ms": 1.0, "bytes_ms": 1.0, "peak_ms": 1.0, "fed_ms": 2.5, "launch_ms": 5.0})
    cell = {"method": "fedmpt", "dataset": "voc2007", "clients": 2, "rounds": 50}
    steps = (157 + 2) * 50  # ceil(5011 / 32) + one short last batch per client, per round
    hours = cost_model.grid_cost([cell, cell], [row], "h200")["hours"]
    assert hours["launch_ms"] == pytest.approx(2 * steps * 5.0 / 3.6e6)


def test_the_dry_run_prints_the_cost_models_price(tmp_path, capsys):
    """reproduce.py --dry-run prices its cells from the shipped counts (benchmarks/cost_model.json)."""
    import json
    from benchmarks import reproduce
    args = ["table1", "--dataset", "voc2007", "--methods", "fedmpt", "--t", "0.5,1.0", "--seeds", "0,1"]
    assert reproduce.main([*args, "--out", str(tmp_path / "grid"), "--dry-run"]) == 0
    row = next(r for r in json.loads(cost_model.SHIPPED.read_text())["rows"]
               if (r["method"], r["classes"]) == ("fedmpt", 20))
    steps = 4 * (-(-5011 // 32) + 2) * 50  # 4 cells: 2 clients, 50 rounds each (the authors' VOC setting)
    assert f"launch-bound {steps * row['ops'] * 5e-6 / 3600:,.1f} GPU-hours" in capsys.readouterr().out
    assert not (tmp_path / "grid").exists()


@pytest.mark.slow
def test_vit_b16_flops_match_the_issues_counts():
    """Issue #34's table (GFLOP per step at ViT-B/16, VOC's 20 classes), within 5%."""
    published = {"fedmpt": 132, "fed-poscoop": 12.6, "fed-dualcoop": 24.7, "fedtpg": 21.4, "fed-maple": 2388,
                 "fedmvp": 2399, "fed-ram": 982}
    rows = cost_model.count_methods(list(published), ["voc2007"])
    for row in rows:
        assert row["flops"] / 1e9 == pytest.approx(published[row["method"]], rel=0.05), row["method"]
        assert row["host_reads"] == {}
