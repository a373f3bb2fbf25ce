"""Every option, in one place: what a run computes (`Config`), the method's model (`ModelConfig`),
how the run is executed (the fields marked `execution`) and Flower's own (`FlowerConfig`); the
rules between options (`validate`); and what is made from the fields: the command lines
(`build_parser`), the range checks and docs/usage.md's table (python docs/options_table.py --write).

Each option is a dataclass field made by `option(default, help, choices=..., range=...)`. Choices
come from the registries they name (data.DATASETS, baselines.METHODS, fedmpt.LOSSES,
aggregation.AGGREGATORS), so a new entry there is a new choice here.
"""
import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

import baselines
import data
import zeroshot
from aggregation import AGGREGATORS
from backbone import ARCHITECTURES
from errors import FedMPTError
from fedmpt import LOSSES

BEGIN, END = "<!-- options: made by python docs/options_table.py --write -->", "<!-- end of options -->"


def option(default, help: str, **rules):
    """A config field with its help and rules (`choices`, `range` as "(0, 1]" or "[1, inf)",
    `shown` for a default that is computed, `execution=True` for how a run is executed rather
    than what it computes, `added` for an option newer than saved runs: their config.json may lack
    it)."""
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class Config:
    dataset: str = option("shapes", "shapes is the offline world, generated on first use", choices=tuple(data.DATASETS))
    root: str = option("", "dataset directory", shown="data/<dataset>")
    method: str = option("fedmpt", "FedMPT or a comparison method (baselines/)", choices=tuple(baselines.METHODS))
    clip: str = option("shapes", "the frozen CLIP: shapes (small, pretrained offline, shipped in shapes/weights/), "
                                 "tiny (random weights) or a real one: " + ", ".join(a for a in ARCHITECTURES if a != "tiny"))
    clip_weights: str = option("", "a local CLIP .pt file instead of the download", shown="none (download)")
    random_init: bool = option(False, "random weights for a named architecture (no download)")
    conditions: str = option("", "condition JSON file, or none (one generic condition: the ablation)",
                             shown="conditions/<dataset>.json")
    attributes: str = option("", "FedMVP's class descriptions (else templates)",
                             shown="baselines/attributes/<dataset>.json")
    clients: int = option(4, "clients: K-means clusters of the training label vectors", range="[1, inf)")
    rounds: int = option(10, "communication rounds", range="[1, inf)")
    local_epochs: int = option(1, "local epochs per round", range="[1, inf)")
    client_fraction: float = option(1.0, "share of the clients sampled each round", range="(0, 1]")
    lr: float = option(0.0, "SGD learning rate, cosine over the rounds; 0 = the method's own (its class's "
                            f"learning_rate, chosen on a validation split: fedmpt {baselines.model_class('fedmpt').learning_rate})",
                       range="[0, inf)", shown="0 (the method's own)")
    grad_clip: float = option(10.0, "a guard: clip a local step's gradient norm above this (0 = off); "
                                    "metrics.json records the share of clipped steps", range="[0, inf)")
    batch_size: int = option(32, "images per local step", range="[1, inf)")
    heterogeneity: float = option(1.0, "t: share of a client's images from its own K-means cluster "
                                       "(1 = each client is its cluster, small t ~ IID)", range="(0, 1]")
    clients_by: str = option("kmeans", "kmeans (the paper's label clusters, with t) or scene (mlrsnet's scene "
                                       "folders dealt into --clients sites)", choices=("kmeans", "scene"))
    min_labels: int = option(0, "keep only images with at least N labels, train and test (the authors' "
                                "COCO/NUS-WIDE runs: 5, MLRSNet: 7; 0 = every image)", range="[0, inf)")
    label_mask: float = option(0.0, "partial annotation: each training positive becomes unknown with this "
                                    "probability (seeded; test labels are never masked)", range="[0, 1)")
    unseen: str = option("", "classes no client labels, scored zero-shot: names (comma-separated), a file of "
                             "names, or random:F (a seeded share F of the classes)", shown="none", added="0.2")
    zsl_split: str = option("", "a published zero-shot split, its files in ROOT/annotations/: 48/17 (coco2014) or "
                                "925/81 (nuswide)", choices=("", "48/17", "925/81"), shown="none", added="0.2")
    validation: float = option(0.0, "share of the training images held out (seeded, before the client split); "
                                    "metrics.json records val_mAP each round: choose settings on it", range="[0, 1)")
    loss: str = option("asl", "asl (asymmetric loss) or bce", choices=tuple(LOSSES))
    seed: int = option(0, "seed of every initial value, the client split, client sampling and data order")
    out: str = option("", "run directory", shown="runs/<dataset>-<method>-<timestamp>")
    aggregate: str = option("mean", "mean (FedAvg, weighted by samples), median or trimmed-mean (robust)",
                            choices=tuple(AGGREGATORS))
    client_eval: bool = option(False, "metrics.json also scores every client on its own test images (assigned by "
                                      "the rule that split the training images): per-client mAP, mean, std, worst "
                                      "(clients_eval.py)", added="0.4")
    personalize: int = option(0, "after the last round each client fine-tunes the global state for N local epochs "
                                 "and is scored on its own test images: personalized.json (plain loop; 0 = off)",
                              range="[0, inf)", added="0.4")
    client_dropout: float = option(0.0, "each sampled client fails to report with this probability (seeded by "
                                        "the seed and the round, the same on both engines); metrics.json records "
                                        "who dropped", range="[0, 1)", added="0.4")
    dp_noise: float = option(-1.0, "client-level DP (DP-FedAvg, privacy.py): noise multiplier z; Gaussian noise of "
                                   "std z*S/m on the mean of the m clipped updates, with --dp-clip S; 0 = clipping and "
                                   "equal weights without noise (no privacy: a check); -1 = off",
                             range="[-1, inf)", shown="-1 (off)", added="0.4")
    dp_clip: float = option(0.0, "client-level DP: L2 norm S each client's update (its state minus the global state, "
                                 "every tunable tensor together) is clipped to; needs --dp-noise; 0 = off",
                            range="[0, inf)", shown="0 (off)", added="0.4")
    dp_delta: float = option(1e-5, "client-level DP: the delta at which metrics.json reports epsilon (dp_epsilon) "
                                   "each round; below 1/--clients", range="(0, 1)", added="0.4")
    dp_max_epsilon: float = option(0.0, "client-level DP: refuse a run whose --rounds would spend more epsilon "
                                        "(says how many rounds fit); 0 = no limit", range="[0, inf)", added="0.4")
    resume: str = option("", "a run directory to continue from its last checkpoint, with its own options")
    download: bool = option(False, "download and extract VOC2007 into --root first (voc2007 only)")
    skip_unreadable: bool = option(False, "decode every image first; leave out (and list) the unreadable ones")
    plot: bool = option(False, "fedmpt: save plans.png, the transport plans and gate of a few test images")
    precision: str = option("fp32", "fp32, or bf16: the frozen encoders under autocast; the similarities, the "
                                    "transport, the gate, the logits, the loss and the tunable state stay float32",
                            choices=("fp32", "bf16"), added="0.2")
    # How the run is executed, not what it computes (`execution`: they may change beside --resume)
    device: str = option("auto", "auto: cuda when visible", choices=("auto", "cpu", "cuda"), execution=True)
    threads: int = option(0, "torch CPU threads (0 = torch's default, one per core); give 1 when other "
                             "work shares the cores (docs/usage.md)", range="[0, inf)", execution=True)
    cache_dir: str = option("", "the feature store", shown="$FEDMPT_CACHE, else ~/.cache/fedmpt", execution=True)
    workers: int = option(-1, "DataLoader workers that decode images while encoding (-1: the CPU count, "
                              "at most 8)", range="[-1, inf)", execution=True)
    text_encoding: str = option("auto", "how prompts go through CLIP's text encoder: shared (a prefix the "
                                         "classes of a condition share runs once: 2.5x faster offline), full "
                                         "(every prompt whole) or auto (shared on CUDA, full on the CPU); exact "
                                         "both, they differ by float rounding (speed/shared_prefix.py)",
                                choices=("auto", "shared", "full"), execution=True)
    parallel_clients: int = option(1, "train N clients of a round side by side in one process: one text-encoder "
                                      "call for their prompts, each its own gradient (equal to one by one up to "
                                      "float rounding; not fed-maple, fed-ram; speed/parallel_clients.py)",
                                   range="[1, inf)", execution=True)
    compile: bool = option(False, "fewer, larger kernels in each training step: its loss compiled (torch.compile), "
                                  "CLIP's blocks straight into scaled_dot_product_attention, the Sinkhorn's iterations "
                                  "fused; equal up to float rounding; the first steps compile (minutes on a CPU; "
                                  "speed/compiled.py)", execution=True)


@dataclass
class ModelConfig:
    """The methods' own options (FedMPT's, and `pooling` for the comparison methods)."""
    n_ctx: int = option(16, "M context tokens per condition and sign", range="[1, inf)")
    class_ctx: int = option(0, "FedMPT: Mc context tokens of each class's own per sign, after the shared ones "
                               "(CoOp's class-specific context; 0 = the paper's shared contexts)", range="[0, inf)")
    ctx_init: str = option("", "CoOp's ctx_init: a template (e.g. \"a photo of a\") whose token embeddings start the last "
                               "positive contexts (fedmpt, fed-poscoop, fed-dualcoop; the rest random, as without it)",
                           shown="none (random contexts)", added="0.3")
    ot_eps: float = option(0.1, "entropic regularisation eps of the region-condition transport", range="(0, inf)")
    ot_iters: int = option(100, "Sinkhorn iterations at most", range="[1, inf)")
    ot: str = option("sinkhorn", "the transport: sinkhorn, or uniform (the independent plan: ablation)",
                     choices=("sinkhorn", "uniform"))
    ot_rho: float = option(0.1, "KL weight rho of the region marginal: semi-relaxed transport (regions may "
                                "stay out); inf = the exact marginal of the specification", range="(0, inf]")
    gate: str = option("mlp", "the gate over conditions: mlp, or uniform (weights 1/K: ablation)",
                       choices=("mlp", "uniform"))
    adapter_reduction: int = option(4, "bottleneck reduction of the two adapters", range="[1, inf)")
    adapter_alpha: float = option(0.5, "residual mix of the adapters (0.2, CLIP-Adapter's, learned too slowly "
                                       "offline; 0.8 diverged)", range="[0, 1]")
    pooling: str = option("regions", "fedtpg, fed-maple, fedmvp: regions (DualCoOp's class-specific region "
                                     "aggregation, the paper's protocol) or global (the global feature alone)",
                          choices=("regions", "global"))


@dataclass
class FlowerConfig:
    superlink: str = option("", "HOST:PORT (or a Flower connection name) of a running SuperLink",
                            shown="start one here")
    round_timeout: float = option(3600.0, "seconds an exchange (the preparation, each round) waits for replies",
                                  range="(0, inf)")
    min_nodes: int = option(1, "SuperNodes connected before a round starts", range="[1, inf)")


def validate(cfg: Config, model_cfg: ModelConfig):
    """Raises FedMPTError naming every bad option: each field outside its choices or range, and
    each rule between options broken. It reports; it changes nothing."""
    problems = field_problems(cfg) + field_problems(model_cfg)
    method = baselines.model_class(cfg.method) if cfg.method in baselines.METHODS else None
    rules = [(not cfg.download or cfg.dataset == "voc2007",
              "--download: only voc2007 can be downloaded; see docs/datasets.md for coco2014 and nuswide"),
             (model_cfg.class_ctx == 0 or cfg.method == "fedmpt",
              f"--class-ctx {model_cfg.class_ctx}: FedMPT's option (--method fedmpt)"),
             (not model_cfg.ctx_init or cfg.method in ("fedmpt", "fed-poscoop", "fed-dualcoop"),
              f"--ctx-init: the learned contexts of fedmpt, fed-poscoop and fed-dualcoop; {cfg.method} has its own"),
             (not cfg.plot or cfg.method == "fedmpt", "--plot: draws FedMPT's transport plans; use it with --method fedmpt"),
             (not (cfg.unseen and cfg.zsl_split), "--unseen and --zsl-split: the published split names its unseen "
                                                  "classes; give one of the two"),
             (cfg.parallel_clients == 1 or method is None or hasattr(method, "text_from"),
              f"--parallel-clients {cfg.parallel_clients}: {cfg.method} changes tokens inside CLIP's text encoder "
              "(deep prompts, adapters), so its clients cannot share one encoder call; use --parallel-clients 1"),
             (not cfg.compile or cfg.parallel_clients == 1,
              f"--compile with --parallel-clients {cfg.parallel_clients}: the compiled step trains one client at a "
              "time; give one of the two")]
    if cfg.dp_noise != -1.0 or cfg.dp_clip or cfg.dp_max_epsilon:  # client-level DP (privacy.py)
        rules += dp_rules(cfg, fields_fit=not problems)
    if cfg.unseen or cfg.zsl_split:  # every method scores the classes it never trained on, or says why not
        why = zeroshot.cannot_score_unseen(cfg.method, model_cfg.class_ctx)
        rules.append((not why, f"--{'unseen' if cfg.unseen else 'zsl-split'}: {cfg.method} cannot score unseen "
                               f"classes: {why}"))
    problems += [message for ok, message in rules if not ok]
    if problems:
        raise FedMPTError("; ".join(problems) + ".")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FedMPTError("--device cuda: no CUDA device is visible; use --device cpu.")


def dp_rules(cfg: Config, fields_fit: bool) -> list:
    """The rules of client-level DP's options, and (when every field is in its range: `fields_fit`)
    the planned rounds' epsilon within --dp-max-epsilon."""
    on = cfg.dp_clip > 0 and cfg.dp_noise >= 0
    rules = [((cfg.dp_noise == -1.0) == (cfg.dp_clip == 0), "--dp-noise and --dp-clip: client-level DP needs both, "
                                                            "the noise multiplier z and the clip norm S (e.g. --dp-noise 1 --dp-clip 1)"),
             (cfg.dp_noise >= 0 or cfg.dp_noise == -1.0, f"--dp-noise {cfg.dp_noise}: must be 0 or more (-1: off)"),
             (not on or cfg.aggregate == "mean", f"--aggregate {cfg.aggregate}: client-level DP averages the clipped "
                                                 "updates with equal weights; use --aggregate mean"),
             (not on or cfg.dp_delta * cfg.clients < 1, f"--dp-delta {cfg.dp_delta:g}: must lie below 1/--clients "
                                                       f"({1 / max(cfg.clients, 1):g}), or one client's data could be released whole"),
             (on or not cfg.dp_max_epsilon, "--dp-max-epsilon: a budget for client-level DP; give --dp-noise and --dp-clip")]
    if fields_fit and all(ok for ok, _ in rules) and on and cfg.dp_max_epsilon:
        import privacy  # dp-accounting: only a run with a privacy budget needs it here
        problem = privacy.budget_problem(cfg)
        rules.append((not problem, problem))
    return rules


# ---- What is made from the fields -------------------------------------------------------
def flag(name: str) -> str:
    """The command-line flag of a field name: class_ctx -> --class-ctx."""
    return "--" + name.replace("_", "-")


def config_from(config_class, values: dict):
    """A config dataclass from a dict that may hold more (parsed options, a saved config.json)."""
    return config_class(**{f.name: values[f.name] for f in dataclasses.fields(config_class) if f.name in values})


def shown_default(field, shown=None) -> str:
    """The default as a user reads it: `shown`, the field's `shown` text, else its value."""
    if shown is not None:
        return shown
    if "shown" in field.metadata:
        return field.metadata["shown"]
    if isinstance(field.default, bool):
        return "off"
    return str(field.default)


def help_text(field, shown=None) -> str:
    rules = field.metadata
    parts = [rules.get("help", "")]
    if "choices" in rules:
        parts.append(f"choices: {', '.join(map(str, rules['choices']))}")
    if "range" in rules:
        parts.append(f"range {rules['range']}")
    if not isinstance(field.default, bool):
        parts.append(f"default: {shown_default(field, shown)}")
    return "; ".join(p for p in parts if p)


class FieldHelp(argparse.HelpFormatter):
    """--help's text of an option, made from its field (help_text) when --help asks for it."""

    def _get_help_string(self, action):
        return help_text(action.field, action.shown) if hasattr(action, "field") else action.help


def build_parser(config_classes, prog=None, description=None, only=None, defaults=None) -> argparse.ArgumentParser:
    """argparse from the dataclasses' fields (those named in `only`, if given): --field-name,
    typed, with the field's default and help; `defaults` {name: (value, as shown)} replaces a
    field's default where another command means another one (predict.py: the run's own dataset)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False, formatter_class=FieldHelp)
    for config_class in config_classes:
        for field in dataclasses.fields(config_class):
            if only is not None and field.name not in only:
                continue
            default, shown = (defaults or {}).get(field.name, (field.default, None))
            if isinstance(field.default, bool):
                action = parser.add_argument(flag(field.name), action="store_true", help=field.name)
            else:
                metavar = {int: "N", float: "X"}.get(type(field.default), "TEXT")
                action = parser.add_argument(flag(field.name), type=type(field.default), default=default,
                                             metavar=metavar, help=field.name)
            action.field, action.shown = field, shown  # the help is written from them when asked for
    return parser


def field_problems(config) -> list:
    """A message for each field outside its type, choices or range ("--name VALUE: ...")."""
    problems = []
    for field in dataclasses.fields(config):
        value, rules, kind = getattr(config, field.name), field.metadata, type(field.default)
        number = kind in (int, float) and isinstance(value, int if kind is int else (int, float))
        if not (isinstance(value, kind) or number) or isinstance(value, bool) != (kind is bool):
            problems.append(f"{flag(field.name)} {value!r}: must be {'a number' if kind in (int, float) else 'a ' + kind.__name__}")
        elif "choices" in rules and value not in rules["choices"]:
            problems.append(f"{flag(field.name)} {value}: choose one of {', '.join(map(str, rules['choices']))}")
        elif "range" in rules:  # an interval written "(0, 1]", "[1, inf)", "(0, inf]"
            low_bracket, low, high, high_bracket = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])",
                                                                rules["range"]).groups()
            above = value >= float(low) if low_bracket == "[" else value > float(low)
            below = value <= float(high) if high_bracket == "]" else value < float(high)
            if math.isnan(value) or not (above and below):
                problems.append(f"{flag(field.name)} {value}: must lie in {rules['range']}")
    return problems


def options_table(sections) -> str:
    """The markdown table of every option: [(section title, config class)]."""
    lines = [BEGIN]
    for title, config_class in sections:
        lines += ["", f"**{title}**", "", "| option | default | meaning |", "|---|---|---|"]
        for field in dataclasses.fields(config_class):
            rules = field.metadata
            meaning = rules.get("help", "")
            if "choices" in rules:
                meaning += f" (choices: {', '.join(f'`{c}`' for c in rules['choices'])})"
            if "range" in rules:
                meaning += f" (range {rules['range']})"
            lines.append(f"| `{flag(field.name)}` | {shown_default(field)} | {meaning.replace('|', '/')} |")
    return "\n".join(lines + ["", END])
