"""The comparison methods (baselines/): parameter counts against Table 5, what trains and
travels, and that each one learns end to end on the offline dataset."""
from loaders.voc import VOC_CLASSES
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import federate
import experiment
from backbone import FrozenCLIP, load_clip
from baselines.fedmvp import load_attributes
from conditions import load_conditions
from fedmpt import asymmetric_loss
from options import ModelConfig

REPO = Path(__file__).resolve().parents[1]
BASELINES = ["fed-poscoop", "fed-dualcoop", "fedtpg", "fed-maple", "fedmvp", "fed-ram"]
# Table 5 of the FedMPT paper (VOC2007, CLIP ViT-B/16): tunable parameters in millions.
TABLE5 = {"fed-poscoop": 0.02, "fed-maple": 3.56, "fedtpg": 4.21, "fed-ram": 13.02, "fedmvp": 1.14}


def build(method, backbone, classes, dataset="voc2007", seed=0):
    attributes = load_attributes(dataset, classes) if method == "fedmvp" else None
    return experiment.build_model(method, backbone, classes, load_conditions("", dataset), ModelConfig(), attributes,
                                  seed=seed)


@pytest.fixture(scope="module")
def vit_b16():
    return FrozenCLIP(load_clip("ViT-B/16", random_init=True))


@pytest.mark.slow
def test_tunable_counts_are_within_ten_percent_of_table5(vit_b16):
    counts = {}
    for method in [*TABLE5, "fedmpt", "fed-dualcoop"]:
        model = build(method, vit_b16, VOC_CLASSES)
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for method, millions in TABLE5.items():
        assert abs(counts[method] / 1e6 - millions) <= 0.1 * millions, (method, counts[method])
    assert counts["fedmpt"] <= 0.80e6
    assert counts["fed-dualcoop"] == 2 * 16 * 512  # two contexts of 16 tokens


@pytest.mark.slow
def test_count_params_prints_one_json_line_without_downloading():
    command = [sys.executable, "federate.py", "--method", "fed-maple", "--clip", "ViT-B/16",
               "--random-init", "--count-params"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["method"] == "fed-maple" and line["dataset"] == "voc2007"
    assert line["tunable"] == 3_564_288 and line["total"] > 149e6


@pytest.fixture(scope="module")
def tiny():
    return FrozenCLIP(load_clip("tiny"))


# Tunable tensors whose initial value is a constant by design, the same for every seed: the
# zero-initialised up-projections of FedMPT's and RAM's adapters and FedMPT's last gate layer
# (round 0 is then plain prompts with uniform gating), and PyTorch's own constant inits in
# FedTPG's decoder layer and FedMVP's PromptFormer (attention biases 0, LayerNorm 1 and 0).
CONSTANT_AT_START = re.compile(r"(adapter|local\.\d+|adapters\.\d+)\.up\.(weight|bias)$|^gate\.mlp\.2\.|"
                               r"in_proj_bias$|out_proj\.bias$|norm\d?\.(weight|bias)$")


@pytest.mark.parametrize("method", ["fedmpt", *BASELINES])
def test_the_seed_decides_every_initial_value(tiny, method):
    """The same seed builds the same tunable state; another seed changes every randomly
    initialised tensor (contexts, queries, negative features, deep prompts, adapters' and
    gate's first layers, attention and decoder weights), whatever torch's global RNG holds."""
    classes = ["circle", "square", "triangle"]
    torch.manual_seed(123)
    first = build(method, tiny, classes, dataset="shapes", seed=0).tunable_state()
    torch.manual_seed(456)  # the caller's random state plays no part
    again = build(method, tiny, classes, dataset="shapes", seed=0).tunable_state()
    other = build(method, tiny, classes, dataset="shapes", seed=1).tunable_state()
    assert list(first) == list(again) == list(other)
    assert all(torch.equal(first[k], again[k]) for k in first)
    constant = {k for k in first if CONSTANT_AT_START.search(k)}
    for name in constant:
        assert torch.equal(first[name], other[name]) and first[name].unique().numel() == 1, name
    same = [k for k in first if k not in constant and torch.equal(first[k], other[k])]
    assert not same, f"{method}: seeds 0 and 1 give the same {same}"
    assert len(constant) < len(first)


@pytest.mark.parametrize("method", BASELINES)
def test_every_tunable_tensor_gets_a_gradient_and_the_backbone_stays_frozen(tiny, method):
    torch.manual_seed(0)
    model = build(method, tiny, ["circle", "square", "triangle"], dataset="shapes")
    frozen = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    inputs = model.encode_images(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    targets = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, -1]])
    logits = model(*inputs)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    state = model.tunable_state()
    assert state and not any(name.startswith("backbone.") for name in state)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # zero-initialised adapter outputs pass gradient on from the second step
        optimizer.zero_grad()
        model.loss(inputs, targets, asymmetric_loss).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:  # a tunable tensor the loss never reaches would travel for nothing
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(torch.equal(frozen[k], v) for k, v in tiny.model.state_dict().items())
    assert all(not torch.equal(state[k], v) for k, v in model.tunable_state().items())


@pytest.mark.slow
@pytest.mark.parametrize("method", BASELINES)
def test_each_method_learns_on_the_offline_dataset(shapes_root, tmp_path, method):
    cfg, model_cfg = federate.parse_config(["--root", str(shapes_root), "--out", str(tmp_path / method),
                                            "--method", method, "--rounds", "2", "--clients", "3"])
    history = federate.run(cfg, model_cfg)
    assert all(row["loss"] is not None and torch.isfinite(torch.tensor(row["loss"])) for row in history[1:])
    assert history[-1]["mAP"] > history[0]["label_prior_mAP"], [row["mAP"] for row in history]
    saved = json.loads((tmp_path / method / "config.json").read_text())
    assert saved["method"] == method and saved["tunable_params"] == sum(
        t.numel() for t in torch.load(tmp_path / method / "state.pt").values())


def test_region_pooling_is_dualcoops():
    """DualCoOp's code: 20 x the cosines of [negative; positive] prompts with every region, a
    softmax over regions of the positive half weighs both halves, x 5; the yes/no softmax of the
    two pooled scores equals the sigmoid of our logit."""
    from baselines.common import region_logits
    g = torch.Generator().manual_seed(0)
    P = torch.nn.functional.normalize(torch.randn(3, 9, 16, generator=g), dim=-1)
    T = torch.nn.functional.normalize(torch.randn(2, 5, 16, generator=g), dim=-1)
    output = 20 * torch.einsum("bnd,kd->bkn", P, torch.cat([T[1], T[0]]))  # (B, 2C, N): negatives first
    weights = output[:, 5:].softmax(dim=-1).repeat(1, 2, 1)
    negative, positive = (5 * (output * weights).sum(-1)).reshape(3, 2, 5).unbind(1)
    expected = torch.stack([negative, positive], dim=-1).softmax(dim=-1)[..., 1]
    assert torch.allclose(torch.sigmoid(region_logits(P, T)), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["fedtpg", "fed-maple", "fedmvp"])
def test_single_label_methods_pool_regions_unless_told_global(tiny, method):
    from baselines.common import global_logits, region_logits
    classes = ["circle", "square", "triangle"]
    attributes = load_attributes("shapes", classes) if method == "fedmvp" else None
    models = {pooling: experiment.build_model(method, tiny, classes, load_conditions("", "shapes"),
                                              ModelConfig(pooling=pooling), attributes, seed=0)
              for pooling in ("regions", "global")}
    inputs = models["regions"].encode_images(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        T = models["regions"].text_features()
        if method == "fedtpg":
            v, P = inputs
        else:
            v, P = models["regions"].image_features(*inputs)  # the prompted features
        assert torch.allclose(models["regions"](*inputs), region_logits(torch.nn.functional.normalize(P, dim=-1), T),
                              atol=1e-5)
        assert torch.allclose(models["global"](*inputs), global_logits(v, T, tiny.logit_scale), atol=1e-5)


def test_ctx_init_starts_the_coop_familys_positive_context_from_the_template():
    import clip
    from backbone import FrozenCLIP, load_clip
    from baselines.coop import FedDualCoOp, FedPosCoOp
    from options import ModelConfig
    backbone = FrozenCLIP(load_clip("tiny"))
    template = backbone.model.token_embedding(clip.tokenize(["a photo of a"])[0, 1:5])  # (4, Dt)
    for method in (FedPosCoOp, FedDualCoOp):
        plain = method(backbone, ["circle", "square"], cfg=ModelConfig(), seed=1).prompts.context
        built = method(backbone, ["circle", "square"], cfg=ModelConfig(ctx_init="a photo of a"), seed=1).prompts.context
        assert torch.equal(built[0, 0, -4:], template) and torch.equal(built[0, 0, :-4], plain[0, 0, :-4])
        assert torch.equal(built[1:], plain[1:])  # DualCoOp's negative context stays random
