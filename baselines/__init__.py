"""The paper's comparison methods under one protocol: `python federate.py --method M`.

Each method is a `fedmpt.PromptModel`: the same frozen CLIP, data, client split, FedAvg loop
and metrics as FedMPT, and FedAvg exchanges exactly its own tunable tensors. Multi-label output
is the same for all: a positive and a negative text side per class and

    logit[c] = tau * (s+[c] - s-[c]),   tau = CLIP's logit scale,

so sigmoid(logit) is DualCoOp's two-way softmax. Sizes are each paper's published defaults;
with CLIP ViT-B/16 on VOC2007 the tunable counts land within 10% of the FedMPT paper's Table 5
(`python federate.py --method M --clip ViT-B/16 --random-init --count-params`, tested).

Inputs: methods that change only the text side or act after the encoders (Fed-PosCoOp,
Fed-DualCoOp, FedTPG) use the cached frozen features (v, P), like FedMPT. Methods that prompt or
adapt inside the image encoder (Fed-MaPLe, FedMVP, Fed-RAM) cache the encoder's input at the
first layer they change and run the rest at every step, so their cost is real. A ResNet tower
has no transformer layers: there visual prompts join the attention pool's keys and values, and
adapters act on the last stage's grid.
"""
from backbone import FrozenCLIP
from baselines.coop import FedDualCoOp, FedPosCoOp
from baselines.fedmvp import FedMVP
from baselines.fedtpg import FedTPG
from baselines.maple import FedMaPLe
from baselines.ram import FedRAM
from fedmpt import FedMPT, ModelConfig

METHODS = {"fedmpt": FedMPT, "fedmvp": FedMVP, "fed-dualcoop": FedDualCoOp, "fed-poscoop": FedPosCoOp,
           "fedtpg": FedTPG, "fed-maple": FedMaPLe, "fed-ram": FedRAM}
# SGD rate per method (loss averaged over images): the best final validation mAP of
# benchmarks/sweep.py on the offline world; the tables, and where the clip still sets most
# steps (FedMVP, Fed-DualCoOp), are in docs/choices.md. On other data, sweep again.
LEARNING_RATES = {"fedmpt": 1e-1, "fedmvp": 1e-3, "fed-dualcoop": 1e-3, "fed-poscoop": 3.0, "fedtpg": 1e-2,
                  "fed-maple": 3e-3, "fed-ram": 3e-2}


def build(method: str, backbone: FrozenCLIP, class_names, conditions, cfg: ModelConfig, attributes=(), *,
          seed: int):
    """The model of `method` on a frozen backbone (FedMPT takes the conditions, FedMVP the
    attribute descriptions); `seed` decides every initial value of its tunable tensors."""
    if method == "fedmpt":
        return FedMPT(backbone, class_names, conditions, cfg, seed=seed)
    return METHODS[method](backbone, class_names, conditions, cfg, attributes=attributes, seed=seed)
