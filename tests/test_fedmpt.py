"""The model: shapes, finiteness, what trains and what stays frozen, the loss."""
import clip
import pytest
import torch
import torch.nn.functional as F

import client
import ot
from backbone import FrozenCLIP, load_clip
from errors import FedMPTError
from fedmpt import FedMPT, asymmetric_loss, bce_loss
from options import ModelConfig

CLASSES = ["circle", "square", "triangle"]
CONDITIONS = ["color", "background", "scene type", "spatial layout", "pose"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FedMPT(FrozenCLIP(load_clip("tiny")), CLASSES, CONDITIONS, ModelConfig(), seed=0)


def images(n=3, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_patch_features_have_shape_B_N_D(model):
    v, P = model.backbone.encode_image_tokens(images(3))
    assert v.shape == (3, 128) and P.shape == (3, 64, 128)  # 64 px / 8 px patches -> N = 64
    # the class token through ln_post and proj is exactly CLIP's own image feature
    assert torch.allclose(v, model.backbone.model.encode_image(images(3)), atol=1e-5)


def test_resnet_patch_features_have_shape_B_N_D():
    torch.manual_seed(0)
    resnet = clip.model.CLIP(64, 128, (1, 1, 1, 1), 16, None, 32, 49408, 64, 2, 1).eval()
    x = torch.randn(2, 3, 128, 128)
    v, P = FrozenCLIP(resnet).encode_image_tokens(x)
    assert v.shape == (2, 64) and P.shape == (2, 16, 64)  # 128 px / 32 -> 4 x 4 grid
    assert torch.allclose(v, resnet.encode_image(x), atol=1e-5)


def test_forward_gives_finite_logits_of_shape_B_C(model):
    v, P = model.backbone.encode_image_tokens(images(4))
    logits = model(v, P)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    T = model.text_features()
    assert T.shape == (2, 5, 3, 128)
    assert torch.allclose(T.norm(dim=-1), torch.ones(2, 5, 3), atol=1e-5)


def test_one_text_call_and_one_transport_solve_per_forward(model, monkeypatch):
    calls = {"text": [], "ot": []}
    encode, solve = model.backbone.encode_prompts, ot.sinkhorn
    monkeypatch.setattr(model.backbone, "encode_prompts",
                        lambda e, eot: calls["text"].append(e.shape) or encode(e, eot))
    monkeypatch.setattr(ot, "sinkhorn", lambda cost, *a, **k: calls["ot"].append(cost.shape) or solve(cost, *a, **k))
    v, P = model.backbone.encode_image_tokens(images(4))
    model(v, P)
    # all 2*K*C prompts in one batch, cut after their last end token (once, when built)
    assert calls["text"] == [(2 * 5 * 3, model.prompts.positions, 128)] and model.prompts.positions < 32
    assert calls["ot"] == [(4, 2, 3, 64, 5)]  # all B*2*C problems of N x K in one solve


def test_only_contexts_adapters_and_gate_are_tunable(model):
    names = set(model.tunable_state())
    assert names == {"prompts.context", "text_adapter.down.weight", "text_adapter.down.bias",
                     "text_adapter.up.weight", "text_adapter.up.bias", "patch_adapter.down.weight",
                     "patch_adapter.down.bias", "patch_adapter.up.weight", "patch_adapter.up.bias",
                     "gate.mlp.0.weight", "gate.mlp.0.bias", "gate.mlp.2.weight", "gate.mlp.2.bias"}
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_backbone_is_bit_identical_after_training_steps():
    torch.manual_seed(0)
    model = FedMPT(FrozenCLIP(load_clip("tiny")), CLASSES, CONDITIONS, ModelConfig(), seed=0)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    tunable_before = model.tunable_state()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    v, P = model.backbone.encode_image_tokens(images(4))
    targets = torch.tensor([[1, 0, -1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    for _ in range(3):
        loss = asymmetric_loss(model(v, P), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.backbone.training
    changed = [k for k, t in model.tunable_state().items() if not torch.equal(t, tunable_before[k])]
    assert "prompts.context" in changed and "gate.mlp.2.weight" in changed


def test_asl_matches_its_formula_and_masks_ignored_targets():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, 3.0]], requires_grad=True)
    targets = torch.tensor([[1, 0, -1], [0, 1, 0]])
    loss = asymmetric_loss(logits, targets)
    p = torch.sigmoid(logits.detach())
    expected = 0.0
    for (i, j), t in zip([(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)], [1, 0, 0, 1, 0]):
        q = p[i, j]
        if t == 1:
            expected -= (1 - q) * torch.log(q)
        else:
            m = max(q - 0.05, 0)
            expected -= m ** 2 * torch.log(1 - m)
    assert torch.allclose(loss, expected / 2, atol=1e-6)  # summed over classes, mean over the 2 images
    loss.backward()
    assert logits.grad[0, 2] == 0  # the ignored pair gets no gradient


def random_logits_and_targets(seed=0):
    """float64 logits spread wide enough that many negatives fall below ASL's margin
    (p < 0.05, z < -2.94) and many above it; targets in {1, 0, -1}."""
    generator = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(64, 20, generator=generator, dtype=torch.float64)
    targets = torch.randint(-1, 2, (64, 20), generator=generator)
    return logits, targets


def test_asl_value_is_unchanged_by_constant_focusing_weights():
    """Detaching the focusing weights changes the gradient, not the value: the loss equals the
    formula computed with every term differentiable."""
    logits, targets = random_logits_and_targets()
    p = torch.sigmoid(logits)
    p_m = (p - 0.05).clamp(min=0)
    old = (1 - p).pow(1.0) * F.logsigmoid(logits), p_m.pow(2.0) * torch.log((1 - p_m).clamp(min=1e-8))
    positive, known = (targets == 1).double(), (targets >= 0).double()
    expected = -((positive * old[0] + (1 - positive) * old[1]) * known).sum() / len(logits)
    assert torch.allclose(asymmetric_loss(logits, targets), expected, rtol=1e-12, atol=0)


def test_asl_gradient_is_the_closed_form_with_constant_focusing_weights():
    """With w+ = (1-p)^1 and w- = p_m^2 held constant (dp/dz = p (1-p)), per image (the loss is
    a mean over the B images, so each element's gradient is the following over B):
        positive:  d/dz [-w+ log p]         = -w+ (1 - p)
        negative:  d/dz [-w- log(1 - p_m)]  =  w- p (1 - p) / (1 - p_m)   if p > 0.05
                                             =  0                           if p < 0.05 (p_m = 0)
        ignored (-1): 0"""
    logits, targets = random_logits_and_targets()
    logits.requires_grad_(True)
    asymmetric_loss(logits, targets).backward()
    p = torch.sigmoid(logits.detach())
    p_m = (p - 0.05).clamp(min=0)
    expected = torch.where(targets == 1, -(1 - p) * (1 - p),
                           torch.where(p > 0.05, p_m ** 2 * p * (1 - p) / (1 - p_m), torch.zeros_like(p)))
    expected = torch.where(targets == -1, torch.zeros_like(p), expected) / len(logits)
    negatives = targets == 0
    assert (negatives & (p < 0.05)).sum() > 50 and (negatives & (p > 0.05)).sum() > 50  # both regions tested
    assert torch.allclose(logits.grad, expected, rtol=0, atol=1e-6 / len(logits))
    assert torch.all(logits.grad[targets == -1] == 0)
    # differentiating through the weights (the former implementation) gives another gradient
    former = logits.detach().clone().requires_grad_(True)
    q = torch.sigmoid(former)
    q_m = (q - 0.05).clamp(min=0)
    terms = torch.where(targets == 1, (1 - q) * F.logsigmoid(former), q_m ** 2 * torch.log(1 - q_m))
    (-(terms * (targets >= 0))).sum().div(len(former)).backward()
    assert not torch.allclose(former.grad, expected, rtol=0, atol=1e-3 / len(former))


def test_bce_masks_ignored_targets_like_asl():
    logits, targets = random_logits_and_targets(seed=1)
    logits.requires_grad_(True)
    loss = bce_loss(logits, targets)
    loss.backward()
    known = targets >= 0
    y = (targets == 1).double()
    expected = F.binary_cross_entropy_with_logits(logits.detach()[known], y[known], reduction="sum") / len(logits)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    p = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad, torch.where(known, p - y, torch.zeros_like(p)) / len(logits), rtol=0, atol=1e-12)
    assert torch.all(logits.grad[targets == -1] == 0)


def test_uniform_ablations_run(model):
    torch.manual_seed(0)
    ablation = FedMPT(model.backbone, CLASSES, CONDITIONS, ModelConfig(ot="uniform", gate="uniform"), seed=0)
    v, P = model.backbone.encode_image_tokens(images(2))
    assert torch.isfinite(ablation(v, P)).all()
    assert not any(k.startswith("gate") for k in ablation.tunable_state())


def test_unknown_clip_name_is_a_clear_error():
    with pytest.raises(FedMPTError, match="ViT-B/16"):
        load_clip("ViT-Z/99")
    with pytest.raises(FedMPTError, match="no such file"):
        load_clip("ViT-B/16", weights="/nonexistent/ViT-B-16.pt")


def test_conditions_place_all_their_mass_and_regions_may_stay_out(model):
    v, P = model.backbone.encode_image_tokens(images(2))
    _, Q, g = model(v, P, plans=True)  # (B, 2, C, N, K), default --ot-rho 0.1: semi-relaxed
    K, N = Q.shape[-1], Q.shape[-2]
    assert torch.allclose(Q.sum(-2), torch.full_like(Q.sum(-2), 1 / K), atol=1e-5)  # columns exact
    assert (Q.sum(-1) - 1 / N).abs().max() > 1e-3  # rows are not forced to 1/N
    exact = FedMPT(model.backbone, CLASSES, CONDITIONS, ModelConfig(ot_rho=float("inf")), seed=0)
    exact.load_tunable_state(model.tunable_state())
    _, Q0, _ = exact(v, P, plans=True)
    assert torch.allclose(Q0.sum(-1), torch.full_like(Q0.sum(-1), 1 / N), atol=1e-4)  # --ot-rho inf: the spec
    assert torch.allclose(g.sum(-1), torch.ones(2))


def two_kinds_of_images(T, n=256, seed=0):
    """A synthetic case where the gate must weigh per image: the frozen inputs (v, P) of n images,
    one class. In kind-0 images condition 0's region tells the truth and condition 1's says the
    opposite; in kind-1 images the reverse. The regions are the initial condition prompts
    themselves (T: (2, K=2, 1, D), sign 0 = "yes"), so the region sets of (kind 0, positive) and
    (kind 1, negative) are the same: only v, which holds the kind, can tell them apart."""
    generator = torch.Generator().manual_seed(seed)
    D = T.shape[-1]
    kind = torch.arange(n) % 2
    y = (torch.rand(n, generator=generator) < 0.5).long()
    u = F.normalize(torch.randn(D, generator=torch.Generator().manual_seed(99)), dim=0)  # the same for every seed
    v = torch.where(kind[:, None] == 0, u, -u) + 0.3 * torch.randn(n, D, generator=generator) / D ** 0.5
    truth, lie = 1 - y, y  # sign index of the region each condition holds: 0 "yes", 1 "no"
    P = torch.stack([T[truth, kind, 0], T[lie, 1 - kind, 0]], dim=1)  # (n, 2, D)
    return v, P + 0.1 * torch.randn(P.shape, generator=generator) / D ** 0.5, y[:, None], kind


@pytest.mark.slow  # trains a gate twice (~7 s): the fast tier stays under 90 s
@pytest.mark.parametrize("gate", ["mlp", "uniform"])
def test_gate_weights_move_when_the_condition_that_carries_the_label_changes_per_image(gate):
    """Trained with the federated client update (local_train: its loss, lr and clipping), the
    gate learns which condition to trust per image and the class becomes separable on new images
    of the same kinds; a uniform gate cannot separate it (its logits ignore v)."""
    import metrics
    from options import Config
    model = FedMPT(FrozenCLIP(load_clip("tiny")), ["circle"], ["color", "background"], ModelConfig(gate=gate), seed=0)
    with torch.no_grad():
        T = model.text_features()
    v, P, targets, kind = two_kinds_of_images(T)
    cfg = Config(lr=0.03)
    state = model.tunable_state()
    for round_index in range(40):
        state, _, stats = client.local_train(model, state, (v, P), targets, torch.arange(len(v)), cfg, cfg.lr,
                                               torch.Generator().manual_seed(round_index))
    assert stats["clip_share"] == 0  # the gradient, not the clip, set these steps
    model.load_tunable_state(state)
    v, P, targets, kind = two_kinds_of_images(T, seed=1)  # held-out images
    with torch.no_grad():
        weight = model.gate(v)[:, 0]
        ap = metrics.multilabel_metrics(model(v, P), targets, top_k=1)["mAP"]
    gap = abs(float(weight[kind == 0].mean() - weight[kind == 1].mean()))
    if gate == "mlp":
        assert gap > 0.25 and ap > 95, (gap, ap)
    else:
        assert gap == 0 and ap < 75, (gap, ap)


def two_look_alike_classes(n=200, seed=0, D=None):
    """Frozen inputs (v, P) of n images and two classes whose prompts are the same text: each image
    holds exactly one of them, class 0 when region 0 holds direction a, class 1 when it holds
    direction b; the other regions are noise."""
    generator = torch.Generator().manual_seed(seed)
    a, b = F.normalize(torch.randn(2, D, generator=torch.Generator().manual_seed(7)), dim=-1)
    first = (torch.rand(n, generator=generator) < 0.5).long()
    y = torch.stack([first, 1 - first], dim=1)
    P = torch.randn(n, 4, D, generator=generator) / D ** 0.5
    P[:, 0] += 2 * torch.where(first[:, None] == 1, a, b)
    return P.mean(dim=1), P, y


@pytest.mark.parametrize("class_ctx", [0, 2])
def test_class_contexts_tell_apart_classes_whose_prompts_are_the_same_text(class_ctx):
    """Shared contexts give two classes with the same name the same logits, however long they
    train; with --class-ctx each class has contexts of its own and learns its own evidence."""
    import metrics
    from options import Config
    backbone = FrozenCLIP(load_clip("tiny"))
    model = FedMPT(backbone, ["circle", "circle"], ["color"], ModelConfig(class_ctx=class_ctx), seed=0)
    assert model.prompts.context.shape[-2] == 16
    expected = 2 * 2 * class_ctx * backbone.model.token_embedding.weight.shape[1] if class_ctx else 0
    own = model.prompts.class_context
    assert (own.numel() if own is not None else 0) == expected
    v, P, targets = two_look_alike_classes(D=backbone.width)
    cfg, state = Config(lr=0.1), model.tunable_state()
    for round_index in range(8):
        state, _, stats = client.local_train(model, state, (v, P), targets, torch.arange(len(v)), cfg, cfg.lr,
                                               torch.Generator().manual_seed(round_index))
    model.load_tunable_state(state)
    v, P, targets = two_look_alike_classes(seed=1, D=backbone.width)  # held-out images
    with torch.no_grad():
        logits = model(v, P)
    ap = metrics.multilabel_metrics(logits, targets, top_k=1)["mAP"]
    print(f"class_ctx {class_ctx}: held-out mAP {ap:.1f}")
    if class_ctx:
        assert ap > 90, ap
    else:
        assert torch.equal(logits[:, 0], logits[:, 1]) and ap < 80, ap


def test_ctx_init_puts_the_templates_embedding_in_the_last_positive_contexts_only():
    """CoOp's ctx_init: "a photo of a" (4 tokens) fills the last 4 positive contexts of every
    condition with its token embeddings; every other value, negative contexts, adapters and gate,
    is the random one the same seed gives without it; and the same seed gives the same model."""
    backbone = FrozenCLIP(load_clip("tiny"))
    plain = FedMPT(backbone, CLASSES, CONDITIONS, ModelConfig(), seed=3)
    built = [FedMPT(backbone, CLASSES, CONDITIONS, ModelConfig(ctx_init="a photo of a"), seed=3) for _ in range(2)]
    template = backbone.model.token_embedding(clip.tokenize(["a photo of a"])[0, 1:5])  # (4, Dt)
    context, random = built[0].prompts.context, plain.prompts.context  # (2, K, 16, Dt)
    assert torch.equal(context[0, :, 12:], template.expand(len(CONDITIONS), -1, -1))
    assert torch.equal(context[0, :, :12], random[0, :, :12]) and torch.equal(context[1], random[1])
    others = {name: t for name, t in plain.tunable_state().items() if name != "prompts.context"}
    assert all(torch.equal(built[0].tunable_state()[name], t) for name, t in others.items())
    assert all(torch.equal(built[0].tunable_state()[name], t) for name, t in built[1].tunable_state().items())


def test_ctx_init_longer_than_the_contexts_and_on_another_method_are_refused():
    backbone = FrozenCLIP(load_clip("tiny"))
    with pytest.raises(FedMPTError, match="--ctx-init 'a photo of a' has 4 tokens, more than --n-ctx 2"):
        FedMPT(backbone, CLASSES, CONDITIONS, ModelConfig(n_ctx=2, ctx_init="a photo of a"), seed=0)
    from options import Config, validate
    with pytest.raises(FedMPTError, match="--ctx-init"):
        validate(Config(method="fedtpg"), ModelConfig(ctx_init="a photo of a"))
    validate(Config(method="fed-dualcoop"), ModelConfig(ctx_init="a photo of a"))  # the CoOp family takes it
