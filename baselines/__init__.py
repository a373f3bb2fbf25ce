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

A method's module is imported when the method is named (`model_class`), so a run of one
method loads no other. Each class states its own SGD rate, `learning_rate` (what `--lr 0`
gives), chosen on a validation split of the offline world (docs/sweeps.md); on other data,
sweep again (benchmarks/sweep.py).
"""
import importlib

# method name -> "module:class"
METHODS = {"fedmpt": "fedmpt:FedMPT", "fedmvp": "baselines.fedmvp:FedMVP",
           "fed-dualcoop": "baselines.coop:FedDualCoOp", "fed-poscoop": "baselines.coop:FedPosCoOp",
           "fedtpg": "baselines.fedtpg:FedTPG", "fed-maple": "baselines.maple:FedMaPLe",
           "fed-ram": "baselines.ram:FedRAM"}


def model_class(method: str):
    """The class of a method, its module imported now."""
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)
