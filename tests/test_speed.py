"""The fast paths of speed/ equal the plain path they replace.

Shared-prefix text encoding (speed/shared_prefix.py): prompts that share [SOS, contexts,
condition] run that prefix once, and their features and gradients equal CLIP's own computation on
the whole prompts (float32 to 1e-5 relative, float64 to 1e-12); SharedPrefixText(model) trains
as the model itself does.

Parallel clients (speed/parallel_clients.py, --parallel-clients N): clients trained side by side
in one process (one text-encoder call per step, summed losses) end exactly where the sequential
loop ends them, to 1e-5 in their training numbers and tunable state; methods that cannot share
the encoder call are refused (exit 2).
"""
import types

import clip
import pytest
import torch

import client
import data
import experiment
import federate
import options
import speed
from backbone import FrozenCLIP, load_clip
from baselines.fedmvp import load_attributes
from conditions import load_conditions
from errors import FedMPTError
from fedmpt import asymmetric_loss
from options import Config, ModelConfig
from shapes.model import load_shapes_clip
from speed.parallel_clients import train_together
from speed.shared_prefix import SharedLayout, SharedPrefixText, encode_shared, text_positions
from store import features

CLASSES = data.known_classes("voc2007")


def fedmpt(backbone, classes=CLASSES, dataset="voc2007", **model_options):
    return experiment.build_model("fedmpt", backbone, classes, load_conditions("", dataset),
                                  ModelConfig(**model_options), seed=0)


def build(method, backbone, classes=CLASSES):
    attributes = load_attributes("voc2007", classes) if method == "fedmvp" else None
    return experiment.build_model(method, backbone, classes, load_conditions("", "voc2007"), ModelConfig(),
                                  attributes, seed=0)


def moved_off_the_start(model, seed=0):
    """Every tunable tensor moved off its (partly zero-initialised) start, by a seeded draw."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def relative_error(a, b) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


# ---- Shared-prefix text encoding ------------------------------------------------------------
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


def shared_features(model, backbone, layout):
    """The prompts' text-encoder features (S*K*C, D) by the shared layout."""
    embeddings, _ = model.prompts()
    return encode_shared(backbone, layout, embeddings)


@pytest.mark.parametrize("name, class_ctx", [("tiny", 0), ("shapes", 0), ("shapes", 4)])
def test_shared_prefix_features_equal_clips_encode_text(name, class_ctx):
    backbone = FrozenCLIP(load_clip("tiny") if name == "tiny" else load_shapes_clip())
    model = fedmpt(backbone, class_ctx=class_ctx)
    tokens = as_tokens(model, backbone, [data.prompt_name(c) for c in CLASSES])
    layout = SharedLayout(model.prompts)
    with torch.no_grad():
        expected = backbone.model.encode_text(tokens)  # (S*K*C, D)
        shared = shared_features(model, backbone, layout)
    assert shared.shape == expected.shape
    assert relative_error(shared, expected) < 1e-5
    # it ran the prefix once per condition and sign: far fewer positions than the whole prompts
    assert layout.prefix_positions >= 1 + 16 + (0 if class_ctx else 1) and layout.rows[1] <= 32


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
        shared = shared_features(model, backbone, SharedLayout(model.prompts))
    assert shared.dtype == torch.float64 and relative_error(shared, expected) < 1e-12


@pytest.mark.parametrize("class_ctx", [0, 4])
def test_shared_prefix_gradients_equal_the_whole_prompts(class_ctx):
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip("tiny"))
    model = fedmpt(backbone, class_ctx=class_ctx)
    tuned = [p for p in model.prompts.parameters()]
    weights = torch.randn(len(model.prompts.eot), backbone.width)
    layout = SharedLayout(model.prompts)
    encodings = {"full": lambda: backbone.encode_prompts(*model.prompts()),
                 "shared": lambda: shared_features(model, backbone, layout)}
    grads = {name: torch.autograd.grad((encode() * weights).sum(), tuned) for name, encode in encodings.items()}
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
    moved_off_the_start(model)
    features, grads = {}, {}
    for encoding, encoded in (("full", model), ("shared", SharedPrefixText(model))):
        features[encoding] = encoded.text_features()
        tuned = [p for p in model.parameters() if p.requires_grad]
        weights = torch.randn(features[encoding].shape, generator=torch.Generator().manual_seed(1))
        used = torch.autograd.grad((features[encoding] * weights).sum(), tuned, allow_unused=True)
        grads[encoding] = [g for g in used if g is not None]
    assert SharedLayout(model.prompts).prefix_positions == 1 + model.n_ctx
    assert relative_error(features["shared"], features["full"]) < 1e-5
    assert grads["full"] and all(relative_error(s, f) < 1e-4 for s, f in zip(grads["shared"], grads["full"]))


@pytest.mark.parametrize("dataset", ["voc2007", "coco2014"])
def test_shared_text_positions_are_within_1_2_of_the_exact_minimum(dataset):
    """Positions run: 2K padded prefixes + 2KC padded suffixes; the exact minimum: each
    condition's own prefix once per sign, each prompt's own suffix to its end token."""
    backbone = FrozenCLIP(load_clip("tiny"))
    model = fedmpt(backbone, data.known_classes(dataset), dataset)
    prompts, layout = model.prompts, SharedLayout(model.prompts)
    length, (R, Ls) = layout.length, layout.rows  # (2K,)
    eot = prompts.eot.reshape(len(length), -1)  # (2K, C)
    run = len(length) * (layout.prefix_positions + R * Ls)
    minimum = int(length.sum() + (eot - length[:, None] + 1).sum())
    whole = int((prompts.eot + 1).sum())  # each prompt whole, to its own end token
    assert run / minimum <= 1.2 and whole / run > 3
    counted = text_positions(model)  # what the benchmarks report
    assert (counted["run"], counted["minimum"]) == (run, minimum) and counted["whole"] >= whole


@pytest.mark.parametrize("method", ["fedmpt", "fed-dualcoop"])
def test_the_shared_prefix_wrapper_trains_as_the_model_itself(method):
    """SharedPrefixText(model): the same loss and the same gradient of every tunable tensor as
    the model (to 1e-5 relative), the same tunable state and its names."""
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip("tiny"))
    model = moved_off_the_start(build(method, backbone))
    wrapped = SharedPrefixText(model)
    images = torch.randn(6, 3, backbone.resolution, backbone.resolution, generator=torch.Generator().manual_seed(2))
    targets = (torch.rand(6, len(CLASSES), generator=torch.Generator().manual_seed(3)) < 0.3).long()
    inputs = model.encode_images(images)
    tuned = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for name, trained in (("model", model), ("wrapped", wrapped)):
        loss = trained.loss(inputs, targets, asymmetric_loss)
        results[name] = loss.detach(), torch.autograd.grad(loss, tuned, allow_unused=True)
    (loss, grads), (wrapped_loss, wrapped_grads) = results["model"], results["wrapped"]
    assert relative_error(wrapped_loss, loss) < 1e-5
    assert any(g is not None for g in grads)
    for g, wrapped_g in zip(grads, wrapped_grads):
        assert (g is None) == (wrapped_g is None)
        if g is not None:
            assert relative_error(wrapped_g, g) < 1e-5
    assert wrapped.tunable_state().keys() == model.tunable_state().keys()
    assert all(torch.equal(t, model.tunable_state()[k]) for k, t in wrapped.tunable_state().items())


def test_auto_keeps_the_whole_prompts_on_the_cpu():
    """--text-encoding auto shares prefixes on CUDA only: the offline figures keep their rounding."""
    backbone = FrozenCLIP(load_clip("tiny"))
    model = fedmpt(backbone)
    assert speed.with_text_encoding(model, "auto") is model
    assert speed.with_text_encoding(model, "full") is model
    shared = speed.with_text_encoding(model, "shared")
    assert isinstance(shared, SharedPrefixText) and shared.model is model
    maple = build("fed-maple", backbone)  # deep prompts change tokens inside the encoder: whole prompts
    assert speed.with_text_encoding(maple, "shared") is maple


# ---- Parallel clients -----------------------------------------------------------------------
PARALLEL = ["fedmpt", "fed-poscoop", "fed-dualcoop", "fedtpg", "fedmvp"]
ROWS = [list(range(0, 13)), list(range(13, 34)), list(range(34, 40))]  # 2, 3 and 1 batches an epoch


def client_setup(method, text_encoding="auto"):
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip("tiny"))
    model = speed.with_text_encoding(build(method, backbone), text_encoding)
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


@pytest.mark.parametrize("method", [m if m == "fed-dualcoop" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in PARALLEL])  # one in the fast tier: each trains three clients twice
def test_clients_side_by_side_equal_the_sequential_loop(method):
    model, stored, targets, cfg = client_setup(method)
    start, one_by_one = sequential(model, stored, targets, cfg)
    generators = [federate.client_generator(cfg, 1, c) for c in range(len(ROWS))]
    together = train_together(model, start, stored, targets, ROWS, generators, cfg, 0.05)
    assert_close(together, one_by_one)
    assert any(not torch.equal(together[0][0][name], start[name]) for name in start)  # it trained
    assert one_by_one[1][2]["clip_share"] > 0  # the guard clipped (per client)


def test_fedmpt_side_by_side_with_shared_prefixes():
    model, stored, targets, cfg = client_setup("fedmpt", text_encoding="shared")
    assert isinstance(model, SharedPrefixText)
    start, one_by_one = sequential(model, stored, targets, cfg)
    generators = [federate.client_generator(cfg, 1, c) for c in range(len(ROWS))]
    assert_close(train_together(model, start, stored, targets, ROWS, generators, cfg, 0.05), one_by_one)


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


@pytest.mark.slow  # each dtype and rho compiles once (inductor, about 20-30 s of one core)
@pytest.mark.parametrize("rho", [0.1, float("inf")])
def test_the_fused_sinkhorn_equals_ot_sinkhorn_in_float64(rho):
    """Fused Sinkhorn (speed/fused_sinkhorn.py, compiled iterations) against the plain loop: the
    full iterations (tol 0, as on CUDA) and the CPU's early stop alike; a masked pair (cost inf)
    and a region without mass (a_n = 0) keep their zeros."""
    import ot
    from speed.fused_sinkhorn import sinkhorn as fused
    generator = torch.Generator().manual_seed(0)
    cost = 2 * torch.rand(3, 4, 49, 5, generator=generator, dtype=torch.float64)
    cost[0, 0, 3, 1] = float("inf")
    a = torch.full((3, 4, 49), 1.0, dtype=torch.float64)
    a[1, 2, :7] = 0
    a = a / a.sum(-1, keepdim=True)
    for tol in (0.0, None):
        expected = ot.sinkhorn(cost, 0.1, a=a, tol=tol, rho=rho)
        plan = fused(cost, 0.1, a=a, tol=tol, rho=rho)
        assert torch.allclose(plan, expected, rtol=0, atol=1e-12)
        assert plan[0, 0, 3, 1] == 0 and (plan[1, 2, :7] == 0).all()


@pytest.mark.slow  # compiles once (inductor)
def test_the_fused_sinkhorn_equals_ot_sinkhorn_in_float32_at_fedmpts_shape():
    """At a FedMPT batch's shape (B images x 2 signs x C classes problems of N x K), float32: within
    1e-6 of the largest plan entry (the compiled reductions sum in their own order), and as close to
    the float64 plan as the plain loop's float32 is."""
    import ot
    from speed.fused_sinkhorn import sinkhorn as fused
    cost = 2 * torch.rand(4, 2, 20, 196, 5, generator=torch.Generator().manual_seed(1))
    expected, exact = ot.sinkhorn(cost, 0.1, tol=0, rho=0.1), ot.sinkhorn(cost.double(), 0.1, tol=0, rho=0.1)
    plan = fused(cost, 0.1, tol=0, rho=0.1)
    assert plan.dtype == torch.float32
    assert torch.allclose(plan, expected, rtol=0, atol=1e-6 * float(expected.max()))
    assert (plan.double() - exact).abs().max() <= 2 * (expected.double() - exact).abs().max() + 1e-9


# ---- Fewer, larger kernels (speed/compiled.py, --compile) ------------------------------------
def image_method(method, backbone):
    attributes = {"attributes": load_attributes("shapes", ["circle", "square"])["attributes"]} if method == "fedmvp" else None
    return experiment.build_model(method, backbone, ["circle", "square"], load_conditions("", "shapes"), ModelConfig(),
                                  attributes, seed=0)


def test_batch_first_blocks_equal_clips_blocks():
    """speed.compiled.run_blocks (tokens kept (B, L, W), one projection viewed as q, k, v, straight
    into scaled_dot_product_attention) against FrozenCLIP.run_blocks: the image tower, and the text
    tower with its own causal mask, a cut causal mask and a hook after each block; float32 to 1e-5 of
    the tokens' scale (CLIP's LayerNorm computes in float32 whatever the model's dtype)."""
    from speed.compiled import run_blocks
    model = load_clip("tiny")
    torch.manual_seed(0)
    hook = lambda i, x: torch.cat([x[:, :1], x[:, 1:] * (1 + 0.1 * i)], dim=1)
    image, text, cut = torch.randn(3, 65, 128), torch.randn(3, model.context_length, 128), torch.randn(3, 9, 128)
    mask = torch.full((9, 9), float("-inf")).triu(1)
    for blocks, x, extra in [(model.visual.transformer.resblocks, image, {}),
                             (model.visual.transformer.resblocks, image, {"after": hook}),
                             (model.transformer.resblocks, text, {}),
                             (model.transformer.resblocks, cut, {"after": hook, "attn_mask": mask})]:
        with torch.no_grad():
            expected, fast = FrozenCLIP.run_blocks(blocks, x, **extra), run_blocks(blocks, x, **extra)
        assert torch.allclose(fast, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("method", ["fed-maple", "fedmvp", "fed-ram"])
def test_the_image_encoder_on_batch_first_blocks_trains_as_clips(method):
    """The methods that run the image encoder every step: their loss and gradients on the
    batch-first blocks equal CLIP's own blocks' within float32 tolerance."""
    from speed.compiled import run_blocks
    backbone = FrozenCLIP(load_clip("tiny"))
    model = image_method(method, backbone)
    torch.manual_seed(1)
    with torch.no_grad():
        inputs = [x.float() for x in model.encode_images(torch.randn(3, 3, 64, 64))]
    targets = torch.tensor([[1, 0], [0, 1], [1, 1]])
    results = []
    for batch_first in (False, True):
        if batch_first:
            backbone.run_blocks = run_blocks
        loss = model.loss(inputs, targets, asymmetric_loss)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((loss, torch.autograd.grad(loss, params)))
    (loss, grads), (fast_loss, fast_grads) = results
    assert torch.allclose(fast_loss, loss, rtol=1e-5, atol=1e-6)
    for g, fast in zip(grads, fast_grads):
        assert torch.allclose(fast, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-8)


@pytest.mark.slow  # compiles the step (inductor): a minute or more of one core
@pytest.mark.parametrize("method, text_encoding", [("fedmpt", "shared"), ("fed-maple", "full")])
def test_the_compiled_step_trains_as_the_eager_one(method, text_encoding):
    """--compile (speed.compiled.CompiledStep): two local steps of SGD from the same state end at
    the eager steps' tunable state within float32 tolerance, and the compiled step leaves the
    backbone's blocks and ot.sinkhorn as they were."""
    import ot
    from speed.compiled import CompiledStep
    backbone = FrozenCLIP(load_clip("tiny"))
    model = speed.with_text_encoding(image_method(method, backbone), text_encoding)
    torch.manual_seed(2)
    with torch.no_grad():
        inputs = [x.float() for x in model.encode_images(torch.randn(4, 3, 64, 64))]
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    start, states = model.tunable_state(), []
    for runner in (model, CompiledStep(model)):
        runner.load_tunable_state(start)
        params = [p for p in runner.parameters() if p.requires_grad]
        optimizer = client.local_optimizer(params, 0.05)
        for _ in range(2):
            loss = runner.loss(inputs, targets, asymmetric_loss)
            optimizer.zero_grad()
            loss.backward()
            client.clip_and_step(optimizer, params, 10.0, loss, len(targets))
        states.append(runner.tunable_state())
    assert "run_blocks" not in vars(backbone) and ot.sinkhorn.__module__ == "ot"
    for name, expected in states[0].items():
        assert torch.allclose(states[1][name], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-7), name
