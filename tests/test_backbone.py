"""The frozen CLIP: its text side runs only the positions that matter and stays exact; a weights
file that is not a CLIP checkpoint is named."""
import warnings

import clip
import pytest
import torch
import torch.nn.functional as F

import experiment
from backbone import FrozenCLIP, load_clip
from conditions import load_conditions
from errors import FedMPTError
from options import ModelConfig
from shapes.model import load_shapes_clip

CLASSES = ["circle", "square", "triangle", "potted plant"]


def full_length_features(backbone: FrozenCLIP, embeddings, eot, after=None):
    """The reference: all context positions, under the blocks' own (full) causal mask (prompts cut
    after their last end token are filled up with random tokens: none may change an end token)."""
    m = backbone.model
    fill = torch.randn(len(embeddings), m.context_length - embeddings.shape[1], embeddings.shape[2])
    embeddings = torch.cat([embeddings, fill], dim=1)  # (P, 77, Dt)
    x = m.ln_final(backbone.run_blocks(m.transformer.resblocks, embeddings + m.positional_embedding, after))
    return x[torch.arange(len(x)), eot] @ m.text_projection


@pytest.mark.parametrize("name", ["tiny", "shapes"])
def test_short_text_encoding_equals_clips_encode_text(name):
    model = load_clip("tiny") if name == "tiny" else load_shapes_clip()
    backbone = FrozenCLIP(model)
    texts = ["a photo of a circle.", "a large red square on the left.", "x"]
    tokens = clip.tokenize(texts, context_length=model.context_length)
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokens), dim=-1)
    assert int(tokens.argmax(-1).max()) + 1 < model.context_length  # the short path is taken
    assert torch.allclose(backbone.encode_texts(texts), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["fedmpt", "fed-maple", "fed-ram"])
def test_short_prompts_equal_the_full_context_with_learned_tokens_and_deep_changes(method):
    """Learned contexts (FedMPT), deep prompts replacing tokens (MaPLe), adapters on every
    token (RAM): each method's text features equal those computed over all positions."""
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip("tiny"))
    model = experiment.build_model(method, backbone, CLASSES, load_conditions("", "shapes"), ModelConfig(), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # away from the zero-initialised start
        short = model.text_features()
        backbone.encode_prompts = lambda e, eot, after=None: full_length_features(backbone, e, eot, after)
        full = model.text_features()
    assert short.shape == full.shape and torch.allclose(short, full, atol=1e-5)


def test_short_encoding_keeps_gradients_to_the_contexts():
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip("tiny"))
    model = experiment.build_model("fedmpt", backbone, CLASSES, load_conditions("", "shapes"), ModelConfig(), seed=0)
    embeddings, eot = model.prompts()
    short = backbone.encode_prompts(embeddings, eot)
    full = full_length_features(backbone, embeddings, eot)
    (grad_short,) = torch.autograd.grad(short.square().sum(), model.prompts.context)
    (grad_full,) = torch.autograd.grad(full.square().sum(), model.prompts.context)
    # float32 sums of gradients that reach ~900 round differently on different CPUs (an AVX-512
    # machine put 64 of 20,480 entries outside atol 1e-6, by at most 5e-7 of the largest): the
    # absolute tolerance is scaled to the gradient's size
    scale = float(grad_full.abs().max())
    assert scale > 100
    assert torch.allclose(grad_short, grad_full, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "tensors"])
def test_clip_weights_that_are_not_a_clip_checkpoint_name_the_file(tmp_path, content):
    path = tmp_path / "weights.pt"
    if content == "tensors":
        torch.save({"a": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(FedMPTError, match=f"--clip-weights {path}: not a CLIP checkpoint"):
        load_clip("ViT-B/16", str(path))


def test_loading_clip_weights_hides_torch_jit_loads_deprecation_only(tmp_path, monkeypatch):
    """clip.load opens every weights file with torch.jit.load first (the official weights are
    TorchScript archives); its FutureWarning is not ours to show (backbone.quiet_clip_load), any
    other warning still is, and the model comes back as clip.load gave it, in float32."""
    import backbone
    model = clip.model.CLIP(*backbone.ARCHITECTURES["tiny"]).half()

    def load(name, device, jit, **where):  # what clip.load does on torch >= 2.10
        warnings.warn("`torch.jit.load` is deprecated. Please switch to `torch.export`.", FutureWarning)
        warnings.warn("a warning of the weights' own", UserWarning)
        return model, None
    monkeypatch.setattr(backbone.clip, "load", load)
    (tmp_path / "weights.pt").write_bytes(b"archive")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_clip("ViT-B/16", str(tmp_path / "weights.pt"))
    assert [str(w.message) for w in caught] == ["a warning of the weights' own"]
    assert loaded is model and loaded.logit_scale.dtype == torch.float32
