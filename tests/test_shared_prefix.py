"""Shared-prefix text encoding (FrozenCLIP.encode_shared) is CLIP's encode_text: prompts that
share [SOS, contexts, condition] run that prefix once, and their features and gradients equal
CLIP's own computation on the whole prompts (float32 to 1e-5 relative, float64 to 1e-12)."""
import types

import clip
import pytest
import torch

import data
import experiment
from backbone import FrozenCLIP, load_clip
from conditions import load_conditions
from options import ModelConfig
from shapes.model import load_shapes_clip

CLASSES = data.known_classes("voc2007")


def fedmpt(backbone, classes=CLASSES, dataset="voc2007", **options):
    return experiment.build_model("fedmpt", backbone, classes, load_conditions("", dataset), ModelConfig(**options),
                                  seed=0)


def as_tokens(model, backbone, names, seed=0):
    """Give the prompts' learned contexts the embeddings of real tokens, and return the token ids
    (S*K*C, L) of the prompts they make: what CLIP's encode_text reads."""
    prompts, generator = model.prompts, torch.Generator().manual_seed(seed)
    (K, C), S, L = prompts.shape, prompts.signs, backbone.context_length
    M = prompts.context.shape[2]
    placeholder = " ".join(["X"] * (M + (0 if prompts.class_context is None else prompts.class_context.shape[2])))
    conditions = load_conditions("", "voc2007")["conditions"] if K > 1 else [""]
    texts = [f"{placeholder} {cond} {name}.".replace("  ", " ") for cond in conditions[:K] for name in names]
    tokens = clip.tokenize(texts, context_length=L).reshape(1, K, C, L).repeat(S, 1, 1, 1)
    embed = backbone.model.token_embedding
    shared = torch.randint(1000, 40000, (S, K, M), generator=generator)
    tokens[..., 1:1 + M] = shared[:, :, None]
    with torch.no_grad():
        prompts.context.copy_(embed(shared))
        if prompts.class_context is not None:
            own = torch.randint(1000, 40000, (S, C, prompts.class_context.shape[2]), generator=generator)
            tokens[..., 1 + M:1 + M + own.shape[2]] = own[:, None]
            prompts.class_context.copy_(embed(own))
    return tokens.flatten(0, 2)


def relative_error(a, b) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


def shared_features(model, backbone):
    backbone.text_encoding = "shared"
    try:
        return model.prompts.encode(backbone)
    finally:
        backbone.text_encoding = "auto"


@pytest.mark.parametrize("name, class_ctx", [("tiny", 0), ("shapes", 0), ("shapes", 4)])
def test_shared_prefix_features_equal_clips_encode_text(name, class_ctx):
    backbone = FrozenCLIP(load_clip("tiny") if name == "tiny" else load_shapes_clip())
    model = fedmpt(backbone, class_ctx=class_ctx)
    tokens = as_tokens(model, backbone, [data.prompt_name(c) for c in CLASSES])
    with torch.no_grad():
        expected = backbone.model.encode_text(tokens)  # (S*K*C, D)
        shared = shared_features(model, backbone)
    assert shared.shape == expected.shape
    assert relative_error(shared, expected) < 1e-5
    # it ran the prefix once per condition and sign: far fewer positions than the whole prompts
    prompts = model.prompts
    assert prompts.prefix_positions >= 1 + 16 + (0 if class_ctx else 1) and prompts.suffix_rows[1] <= 32


def test_shared_prefix_equals_encode_text_in_float64():
    clip_model = load_clip("tiny").double()
    for module in clip_model.modules():  # CLIP's LayerNorm computes in float32: here in float64
        if isinstance(module, clip.model.LayerNorm):
            module.forward = types.MethodType(torch.nn.LayerNorm.forward, module)
    backbone = FrozenCLIP(clip_model)
    model = fedmpt(backbone).double()
    tokens = as_tokens(model, backbone, [data.prompt_name(c) for c in CLASSES])
    with torch.no_grad():
        expected = backbone.model.encode_text(tokens)
        shared = shared_features(model, backbone)
    assert shared.dtype == torch.float64 and relative_error(shared, expected) < 1e-12


@pytest.mark.parametrize("class_ctx", [0, 4])
def test_shared_prefix_gradients_equal_the_whole_prompts(class_ctx):
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip("tiny"))
    model = fedmpt(backbone, class_ctx=class_ctx)
    tuned = [p for p in model.prompts.parameters()]
    weights = torch.randn(len(model.prompts.eot), backbone.width)
    grads = {}
    for encoding in ("full", "shared"):
        backbone.text_encoding = encoding
        loss = (model.prompts.encode(backbone) * weights).sum()
        grads[encoding] = torch.autograd.grad(loss, tuned)
    backbone.text_encoding = "auto"
    for full, shared in zip(grads["full"], grads["shared"]):
        assert float(full.abs().max()) > 0 and relative_error(shared, full) < 1e-5


@pytest.mark.parametrize("method", ["fed-poscoop", "fed-dualcoop", "fedtpg", "fedmvp"])
def test_the_coop_family_shares_sos_and_contexts_exactly(method):
    """Fed-PosCoOp, Fed-DualCoOp, FedTPG (generated contexts) and FedMVP share [SOS, contexts]."""
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip("tiny"))
    attributes = {"attributes": {c: [f"a photo of a {c}."] for c in CLASSES}} if method == "fedmvp" else None
    model = experiment.build_model(method, backbone, CLASSES, load_conditions("", "voc2007"), ModelConfig(),
                                   attributes, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    features, grads = {}, {}
    for encoding in ("full", "shared"):
        backbone.text_encoding = encoding
        features[encoding] = model.text_features()
        tuned = [p for p in model.parameters() if p.requires_grad]
        weights = torch.randn(features[encoding].shape, generator=torch.Generator().manual_seed(1))
        used = torch.autograd.grad((features[encoding] * weights).sum(), tuned, allow_unused=True)
        grads[encoding] = [g for g in used if g is not None]
    assert model.prompts.prefix_positions == 1 + model.n_ctx
    assert relative_error(features["shared"], features["full"]) < 1e-5
    assert grads["full"] and all(relative_error(s, f) < 1e-4 for s, f in zip(grads["shared"], grads["full"]))


@pytest.mark.parametrize("dataset", ["voc2007", "coco2014"])
def test_shared_text_positions_are_within_1_2_of_the_exact_minimum(dataset):
    """Positions run: 2K padded prefixes + 2KC padded suffixes; the exact minimum: each
    condition's own prefix once per sign, each prompt's own suffix to its end token."""
    backbone = FrozenCLIP(load_clip("tiny"))
    model = fedmpt(backbone, data.known_classes(dataset), dataset)
    prompts = model.prompts
    length, (R, Ls) = prompts.shared_length, prompts.suffix_rows  # (2K,)
    eot = prompts.eot.reshape(len(length), -1)  # (2K, C)
    run = len(length) * (prompts.prefix_positions + R * Ls)
    minimum = int(length.sum() + (eot - length[:, None] + 1).sum())
    whole = int((prompts.eot + 1).sum())  # each prompt whole, to its own end token
    assert run / minimum <= 1.2 and whole / run > 3


def test_auto_keeps_the_whole_prompts_on_the_cpu():
    """--text-encoding auto shares prefixes on CUDA only: the offline figures keep their rounding."""
    backbone = FrozenCLIP(load_clip("tiny"))
    model = fedmpt(backbone)
    assert backbone.text_encoding == "auto" and not backbone.shares_prefixes()
    backbone.encode_shared = None  # would fail if called
    model.text_features()
