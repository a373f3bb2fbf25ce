"""FedMPT: federated multi-label prompt tuning of a frozen CLIP through conditions.

For an image with global feature v (D,) and patch features P (N, D), class c and sign s:

    T^s[k, c]   = TextAdapter(CLIP_text(ctx^s_k, "<condition k> <class c>."))      (2, K, C, D)
    S[n, k]     = cos(PatchAdapter(P)[n], T^s[k, c])                                 (N, K)
    Q           = Sinkhorn(cost = 1 - S, eps)   columns sum to 1/K; rows ~1/N          (N, K)
    z^s[c, k]   = K * sum_n Q[n, k] S[n, k]      condition score (a transported cosine)
    g           = softmax(MLP(v))                gate over conditions              (K,)
    logit[c]    = tau * sum_k g[k] (z^+[c, k] - z^-[c, k]),   tau = CLIP's logit scale

sigmoid(logit) is DualCoOp's two-way softmax over the positive and negative prompt. The row
(region) marginal is a penalty rho KL(Q 1 | 1/N) rather than a constraint (`--ot-rho`, default
0.1 = eps; inf gives the specification's exact marginal). With an exact marginal every region must
be transported, so with few objects most conditions are forced onto background and z is close to
a mean over regions; on the shapes world that cost 8 mAP (docs/results.md, bias study). CLIP stays
frozen; the contexts, the two adapters and the gate are all that trains and travels
(`FedMPT.tunable_state`). Adapters sit after the frozen encoders, so an image's frozen features
(v, P) never change and are computed once (`FrozenCLIP.encode_image_tokens`, backbone.py).
"""
import warnings
from contextlib import contextmanager

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # raised inside clip
import clip  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ot  # noqa: E402
from backbone import FrozenCLIP  # noqa: E402
from errors import FedMPTError  # noqa: E402
from gating import ConditionGate  # noqa: E402
from prompts import ConditionPrompts  # noqa: E402


class Adapter(nn.Module):
    """Residual bottleneck: x -> (1 - alpha) x + alpha Up(ReLU(Down(x))). Up starts at zero, so
    the adapter starts as a rescaling that cosine similarity ignores."""

    def __init__(self, width: int, reduction: int, alpha: float):
        super().__init__()
        self.down, self.up, self.alpha = nn.Linear(width, width // reduction), nn.Linear(width // reduction, width), alpha
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return (1 - self.alpha) * x + self.alpha * self.up(F.relu(self.down(x)))


@contextmanager
def seeded(seed: int):
    """Every random draw inside comes from torch's CPU generator seeded with `seed`, and that
    generator's state is restored afterwards. A model builds its initial values (contexts,
    nn.Linear's default init, ...) in here, so they follow the seed it is given and nothing else
    (not what its caller drew before), and building it draws nothing from the caller's stream.
    Models are built on the CPU, so the CPU generator is the only one seeded (and restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class PromptModel(nn.Module):
    """What the federated loop asks of a method (FedMPT below, the baselines in baselines/):

    encode_images(images) -> tuple   the frozen inputs of a batch, computed once; `input_kind` names
                                     them (the feature store keys them by it)
    text_features()                  the text side, reused over a whole evaluation
    text_inputs(), text_from(E)      (optional) the text side in two: the whole prompts for CLIP's text
                                     encoder and what follows it, text_features = text_from(encode_prompts(
                                     *text_inputs())); the fast paths (speed/) encode them their own way
    forward(*inputs, T=None)         logits (B, C); sigmoid gives the probabilities
    (constructor)                    takes `seed` and draws every initial value inside `seeded(seed)`
    loss(inputs, targets, loss_fn, T=None)   the training loss of a batch (T: text features given)
    tunable_state()                  exactly the tensors that train and travel
    """

    inputs_start_with_v = True  # encode_images' first tensor is the frozen global feature v
    learning_rate: float  # the method's SGD rate (--lr 0), chosen on a validation split (docs/sweeps.md)

    def encode_images(self, images):
        return self.backbone.encode_image_tokens(images)

    input_kind = "v,P"  # names what encode_images returns: methods that read the same frozen inputs share them

    def text_features(self):
        return self.text_from(self.backbone.encode_prompts(*self.text_inputs()))

    def text_inputs(self):
        return self.prompts()

    def loss(self, inputs, targets, loss_fn, T=None):
        return loss_fn(self(*inputs, T=T), targets)

    @property
    def device(self):
        return self.backbone.model.logit_scale.device

    def tunable_state(self) -> dict:
        """Exactly the tensors FedAvg exchanges: every parameter that trains."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_tunable_state(self, state: dict):
        """Load a tunable state; one that does not fit this model (keys, shapes) is a FedMPTError."""
        expected = {name: p for name, p in self.named_parameters() if p.requires_grad}
        if set(state) != set(expected):
            raise FedMPTError(f"tunable state does not match this model: missing "
                              f"{sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}.")
        for name, p in expected.items():
            if not isinstance(state[name], torch.Tensor) or state[name].shape != p.shape:
                raise FedMPTError(f"tunable state does not match this model: {name} has shape "
                                  f"{tuple(getattr(state[name], 'shape', ()))}, the model's is {tuple(p.shape)}.")
        self.load_state_dict(state, strict=False)


class FedMPT(PromptModel):
    """The model of the module docstring: condition prompts, transport, gate."""
    learning_rate = 0.1  # SGD rate: the best final validation mAP on the offline world (docs/sweeps.md)

    def __init__(self, backbone: FrozenCLIP, class_names, conditions, cfg, seed: int):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        D = backbone.width
        with seeded(seed):  # the contexts, the adapters' down-projections, the gate's first layer
            self.prompts = ConditionPrompts(class_names, conditions, cfg.n_ctx,
                                            backbone.model.token_embedding, backbone.context_length,
                                            clip.tokenize, class_ctx=cfg.class_ctx, ctx_init=cfg.ctx_init)
            self.text_adapter = Adapter(D, cfg.adapter_reduction, cfg.adapter_alpha)
            self.patch_adapter = Adapter(D, cfg.adapter_reduction, cfg.adapter_alpha)
            # one condition: softmax over one logit is 1, so a gate would have nothing to learn
            self.gate = ConditionGate(D, len(conditions), uniform=cfg.gate == "uniform" or len(conditions) == 1)

    def text_features(self) -> torch.Tensor:
        """All 2*K*C condition prompts through CLIP's text encoder in one call -> (2, K, C, D)."""
        return self.text_from(self.backbone.encode_prompts(*self.prompts()))

    def text_from(self, encoded):
        """The text adapter on the encoder's output (2*K*C, D), normalised -> (2, K, C, D)."""
        K, C = self.prompts.shape
        return F.normalize(self.text_adapter(encoded), dim=-1).reshape(2, K, C, -1)

    def forward(self, v: torch.Tensor, P: torch.Tensor, T: torch.Tensor = None, plans: bool = False):
        """Logits (B, C) from frozen image features v (B, D) and P (B, N, D); with plans=True also
        the transport plans Q (B, 2, C, N, K) and the gate g (B, K). Pass T to reuse the text
        features (evaluation: they do not depend on the image)."""
        T = self.text_features() if T is None else T  # (2, K, C, D)
        K = T.shape[1]
        P = F.normalize(self.patch_adapter(P), dim=-1)  # (B, N, D)
        S = torch.einsum("bnd,skcd->bscnk", P, T)  # (B, 2, C, N, K)
        # One batched solve for all B*2*C problems. The plan is computed on a detached cost:
        # gradients reach the cosines through z, not through the Sinkhorn iterations (ot.py).
        if self.cfg.ot == "uniform":
            Q = ot.uniform_plan(S)
        else:
            Q = ot.sinkhorn(1 - S.detach(), self.cfg.ot_eps, n_iters=self.cfg.ot_iters, rho=self.cfg.ot_rho)
        z = K * (Q * S).sum(dim=-2)  # (B, 2, C, K)
        g = self.gate(v)  # (B, K)
        logits = self.backbone.logit_scale * torch.einsum("bk,bck->bc", g, z[:, 0] - z[:, 1])
        return (logits, Q, g) if plans else logits


def asymmetric_loss(logits, targets, gamma_neg=2.0, gamma_pos=1.0, clip_margin=0.05):
    """ASL (Ridnik et al., ICCV 2021), summed over classes and averaged over the images of the
    batch, so a step's gradient does not grow with the batch; targets in {1, 0, -1},
    -1 (e.g. VOC difficult-only) is masked out and gets exactly zero gradient.
        L+ = -w+ log p,         w+ = (1 - p)^gamma_pos
        L- = -w- log(1 - p_m),  w- = p_m^gamma_neg,   p_m = max(p - m, 0)
    The focusing weights w+ and w- are constants in the backward pass (computed without
    gradient), as in the reference implementation (its default disable_torch_grad_focal_loss)
    and the FedMPT authors' code: they decide how much each term counts, and the gradient is
    that of the weighted cross-entropy, d/dz = -w+ (1 - p) for a positive and
    w- p (1 - p) / (1 - p_m) for a negative with p > m (0 below the margin)."""
    p = torch.sigmoid(logits)
    positive, known = (targets == 1).float(), (targets >= 0).float()
    p_m = (p - clip_margin).clamp(min=0)
    with torch.no_grad():
        w_pos, w_neg = (1 - p).pow(gamma_pos), p_m.pow(gamma_neg)
    loss_pos = w_pos * F.logsigmoid(logits)
    loss_neg = w_neg * torch.log((1 - p_m).clamp(min=1e-8))
    return -((positive * loss_pos + (1 - positive) * loss_neg) * known).sum() / len(logits)


def bce_loss(logits, targets):
    """Binary cross-entropy summed over known classes and averaged over images (targets -1 masked
    out: zero gradient). The targets take the logits' dtype (float32 targets would round float64 logits)."""
    known = (targets >= 0).to(logits.dtype)
    return (F.binary_cross_entropy_with_logits(logits, (targets == 1).to(logits.dtype), reduction="none")
            * known).sum() / len(logits)


LOSSES = {"asl": asymmetric_loss, "bce": bce_loss}  # --loss: the option's choices are these keys
