"""--precision bf16: the frozen encoders run under autocast (CPU autocast here), and every method's
loss and gradient stay within a stated tolerance of float32, with float32 logits and a float32
tunable state; a 10-round offline bf16 run ends within 0.5 mAP of the float32 one."""
import json

import pytest
import torch

import client
import data
import experiment
import federate
from backbone import FrozenCLIP, load_clip
from baselines.fedmvp import load_attributes
from conditions import load_conditions
from fedmpt import asymmetric_loss
from options import ModelConfig
from shapes.model import load_shapes_clip
from store import features

METHODS = ["fedmpt", "fed-poscoop", "fed-dualcoop", "fedtpg", "fed-maple", "fedmvp", "fed-ram"]
CLASSES = data.known_classes("voc2007")
# Measured (tiny ViT and the shapes ResNet CLIP, CPU autocast, 2026-12): loss relative difference
# 5e-6..8e-3, gradient relative error (norm of the difference / norm) 3e-3..2.4e-2.
LOSS_TOLERANCE, GRADIENT_TOLERANCE = 2e-2, 5e-2


@pytest.fixture(scope="module", params=["tiny", "shapes"])
def backbone(request):
    return FrozenCLIP(load_clip("tiny") if request.param == "tiny" else load_shapes_clip())


def loss_and_gradient(model, inputs, targets):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.loss(inputs, targets, asymmetric_loss)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), torch.cat([g.flatten() for g in grads if g is not None])


@pytest.mark.parametrize("method", METHODS)
def test_bf16_loss_and_gradient_stay_near_fp32(backbone, method):
    torch.manual_seed(0)
    images = torch.randn(8, 3, backbone.resolution, backbone.resolution)
    targets = (torch.rand(8, len(CLASSES)) < 0.2).long()
    attributes = load_attributes("voc2007", CLASSES) if method == "fedmvp" else None
    results = {}
    for precision in ("fp32", "bf16"):
        backbone.precision = precision  # as experiment.load_backbone sets it from --precision
        model = experiment.build_model(method, backbone, CLASSES, load_conditions("", "voc2007"), ModelConfig(),
                                       attributes, seed=0)
        with torch.no_grad():  # away from the zero-initialised start, the same for both
            generator = torch.Generator().manual_seed(1)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
            stored = [torch.from_numpy(x) for x in features.as_stored(model.encode_images(images))]
            inputs = client.gather(stored, slice(None), "cpu")
            logits = model(*inputs)
        assert logits.dtype == torch.float32 and all(t.dtype == torch.float32 for t in model.tunable_state().values())
        results[precision] = loss_and_gradient(model, inputs, targets)
    backbone.precision = "fp32"
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert loss16.dtype == torch.float32 and torch.isfinite(grad16).all()
    assert not torch.equal(grad16, grad32)  # bf16 did run
    assert float((loss16 - loss32).abs() / loss32.abs()) < LOSS_TOLERANCE
    assert float((grad16 - grad32).norm() / grad32.norm()) < GRADIENT_TOLERANCE


@pytest.mark.parametrize("method", METHODS)
def test_frozen_features_for_the_store_stay_float32(backbone, method):
    """The store's entries do not depend on --precision (so its key need not name it): with bf16
    in effect (the tuned path's logits change), every method's frozen inputs are bit for bit
    the float32 ones, in the same dtypes."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, backbone.resolution, backbone.resolution)
    attributes = load_attributes("voc2007", CLASSES) if method == "fedmvp" else None
    model = experiment.build_model(method, backbone, CLASSES, load_conditions("", "voc2007"), ModelConfig(),
                                   attributes, seed=0)
    encoded, logits = {}, {}
    try:
        for precision in ("bf16", "fp32"):
            backbone.precision = precision
            with torch.no_grad():
                encoded[precision] = model.encode_images(images)
                logits[precision] = model(*encoded[precision])
    finally:
        backbone.precision = "fp32"
    assert not torch.equal(logits["bf16"], logits["fp32"])  # bf16 was in effect where tuned tensors pass
    for bf16, fp32 in zip(encoded["bf16"], encoded["fp32"]):
        assert bf16.dtype == fp32.dtype != torch.bfloat16 and torch.equal(bf16, fp32)


@pytest.mark.slow
def test_a_ten_round_offline_bf16_run_ends_within_half_a_point_of_fp32(shapes_root, tmp_path):
    """The default offline run (FedMPT, 10 rounds) in bf16 against its float32 final mAP, which
    the default run reproduces bit for bit: 77.90978651404704."""
    cfg, model_cfg = federate.parse_config(["--root", str(shapes_root), "--out", str(tmp_path / "bf16"),
                                            "--precision", "bf16", "--threads", "2"])
    history = federate.run(cfg, model_cfg)
    assert abs(history[-1]["mAP"] - 77.90978651404704) < 0.5
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
