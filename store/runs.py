"""Run directories: what a run writes, and what `--resume` and `predict.py` read back.

    config.json      every resolved option, the classes, the conditions, sizes and fingerprints
    conditions.json  the condition set the run trained with (what --resume reads back)
    attributes.json  FedMVP's class descriptions, when the method has them
    clients.png      the client label distributions (splits.plot_client_distributions)
    metrics.json     a row per round (round 0: before training, with the reference scores)
    checkpoint.pt    after every round: global state, round, history, client-sampling RNG state
    state.pt         the final global tunable state
    thresholds.json  with --validation: per-class thresholds chosen on the held-out images (predict.py's)

Every file is written whole or not at all (store/files.py); checkpoint.pt before metrics.json,
so that metrics.json never runs ahead of what --resume continues from.
Checkpoints load as tensors only (`weights_only=True`): a planted file cannot run code.

Also what a run does around its rounds: `resume` (the run's own options and checkpoint), the
thread note, how a failing or interrupted round ends the run, and the checks after the last round.
"""
import dataclasses
import json
import os
import pickle
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from errors import FedMPTError, Interrupted, RunFailed
import zeroshot
from options import Config, ModelConfig, config_from, field_problems, flag
from store.files import save_tensors, write_atomic, write_json


def run_directory(cfg, resume_hint: str = "python federate.py --resume") -> Path:
    """--out, else runs/<dataset>-<method>-<timestamp>: FedMPTError, before anything starts, where
    it cannot be a run directory (it, or a folder on its path, is an existing file, or it is a
    link this code did not create) or, for a new run (no --resume), where it already holds one
    (its metrics.json or config.json): nothing of that run is overwritten."""
    out = Path(cfg.out or f"runs/{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.is_symlink():
        raise FedMPTError(f"--out {out} is a symbolic link (to {out.readlink()}); give the folder itself.")
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise FedMPTError(f"--out {out}: {path} is a file, not a folder; give another --out.")
    if not cfg.resume and ((out / "metrics.json").exists() or (out / "config.json").exists()):
        raise FedMPTError(f"--out {out} already holds a run; continue it with {resume_hint} {out}, or choose another "
                          "--out.")
    return out


def load_checkpoint(path: Path, fix: str) -> object:
    """torch.load of a checkpoint or state file (tensors only, onto the CPU: a run trained on a
    GPU loads anywhere), with an error that names the file and `fix`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        # torch's own message advises weights_only=False, which would run code from the file
        reason = "missing" if isinstance(error, FileNotFoundError) else "truncated or damaged"
        raise FedMPTError(f"cannot load {path}: the file is {reason} ({type(error).__name__}); {fix}.") from None


def read_checkpoint(path: Path, fix: str) -> dict:
    """checkpoint.pt, checked for its format: {global_state: {name: tensor}, round, history
    (a row per round so far), rng_state}; anything else is a FedMPTError naming the file."""
    checkpoint = load_checkpoint(path, fix)
    state = checkpoint.get("global_state") if isinstance(checkpoint, dict) else None
    history = checkpoint.get("history") if isinstance(checkpoint, dict) else None
    fits = (isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())
            and isinstance(checkpoint.get("round"), int) and isinstance(checkpoint.get("rng_state"), dict)
            and isinstance(history, list) and len(history) == checkpoint["round"] + 1
            and all(isinstance(row, dict) for row in history))
    if not fits:
        raise FedMPTError(f"{path} is not a checkpoint this code wrote (it needs global_state, round, history and "
                          f"rng_state, one history row per round); {fix}.")
    return checkpoint


def read_state(path: Path, fix: str) -> dict:
    """state.pt, checked for its format: {name: tensor}."""
    state = load_checkpoint(path, fix)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise FedMPTError(f"{path} is not a tunable state (a dict of tensors); {fix}.")
    return state


def read_saved_config(run_dir) -> dict:
    """The whole config.json of a run."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FedMPTError(f"run {run_dir}: cannot read {path} ({error}).") from None


def read_run_config(run_dir, config_classes, record_keys) -> tuple:
    """The options a run was started with, checked against their own definition: one config
    per class of `config_classes`, then the whole config.json. Every option must be there (those
    marked `execution`, which only say how a run is executed, and those marked `added`, which runs
    saved before them lack and which then take their default, what those runs did, may be missing) and within its
    type, choices and range, and nothing may be there but options and `record_keys`."""
    path = Path(run_dir) / "config.json"
    saved = read_saved_config(run_dir)
    if not isinstance(saved, dict):
        raise FedMPTError(f"{path} holds a JSON {type(saved).__name__}, not a run's configuration; restore the "
                          "run's own config.json, or train the run again with another --out.")
    fields = [f for config_class in config_classes for f in dataclasses.fields(config_class)]
    missing = [flag(f.name) for f in fields if f.name not in saved  # `added`: runs saved before it lack it
               and not (f.metadata.get("execution") or f.metadata.get("added"))]
    unknown = sorted(set(saved) - {f.name for f in fields} - set(record_keys))
    configs = [config_from(config_class, saved) for config_class in config_classes]
    problems = [f"it lacks {', '.join(missing)}"] if missing else []
    problems += [problem for config in configs for problem in field_problems(config)]
    problems += [f"no option or run record is called {', '.join(unknown)}"] if unknown else []
    problems += record_problems(saved)
    if problems:
        raise FedMPTError(f"{path} is not a configuration this code can continue: {'; '.join(problems)}. Restore the "
                          "run's own config.json, or train the run again with another --out.")
    return (*configs, saved)


def check_extension(run_dir, rounds: int, done: int) -> bool:
    """--rounds beside --resume, checked and nothing written: True when it extends the run, False
    when it names the run's own rounds; fewer (or no more than are done) is a FedMPTError."""
    saved = read_saved_config(run_dir)
    if rounds == saved["rounds"]:
        return False
    if rounds < saved["rounds"] or rounds <= done:
        raise FedMPTError(f"--rounds {rounds} beside --resume extends a run: give more than its {saved['rounds']} rounds "
                          f"({done} done).")
    return True


def is_names(value) -> bool:
    """A list of distinct, non-empty strings (class or condition names)."""
    return (isinstance(value, list) and all(isinstance(name, str) and name.strip() for name in value)
            and len(set(value)) == len(value))


# config.json's run record fields that are read back, and the type each must have
RECORD_TYPES = {
    "classes": ("a list of distinct class names", is_names),
    "condition_set": ('{"conditions": [names], ...}',
                      lambda v: isinstance(v, dict) and is_names(v.get("conditions")) and bool(v["conditions"])),
    "unseen_classes": ("a list of distinct class names", is_names),
    "root": ("a path (a string)", lambda v: isinstance(v, str)),
    "backbone_sha256": ("a sha256 (a string) or null", lambda v: v is None or isinstance(v, str)),
    "extended": ("a list of {after_round, rounds_before, rounds}", lambda v: isinstance(v, list)
                 and all(isinstance(e, dict) for e in v)),
}


def record_problems(saved: dict) -> list:
    """What is wrong with the run record fields config.json holds (each checked where present)."""
    problems = [f"{name} must be {what}, not {json.dumps(saved[name])[:60]}"
                for name, (what, fits) in RECORD_TYPES.items() if name in saved and not fits(saved[name])]
    classes, unseen = saved.get("classes"), saved.get("unseen_classes")
    if not problems and is_names(classes) and is_names(unseen) and set(unseen) - set(classes):
        problems.append(f"unseen_classes names {sorted(set(unseen) - set(classes))[:5]}, not in classes")
    return problems


def require_record(run_dir, saved: dict, names):
    """The run record fields a command reads: each must be in config.json (read_run_config
    checked the types of those present)."""
    missing = [name for name in names if name not in saved]
    if missing:
        raise FedMPTError(f"{Path(run_dir) / 'config.json'} lacks the run record {', '.join(missing)}: it is not a "
                          "finished run's configuration. Restore the run's own config.json, or train it again.")


def extend_rounds(run_dir, rounds: int, done: int):
    """--rounds beside --resume: a run extended past its own rounds (recorded in its config.json);
    its learning rate follows the cosine over the new total from here on. Called once every
    check of the resumed run has passed (check_extension first): a refused resume writes nothing."""
    if not check_extension(run_dir, rounds, done):
        return
    saved = read_saved_config(run_dir)
    print(f"note: --rounds {rounds} extends the run from {saved['rounds']} rounds; from round {done + 1} on the learning "
          f"rate follows the cosine over {rounds} rounds, so the result is not that of a run begun with --rounds "
          f"{rounds}.", file=sys.stderr)
    extended = saved.get("extended", []) + [{"after_round": done, "rounds_before": saved["rounds"], "rounds": rounds}]
    write_json(Path(run_dir) / "config.json", {**saved, "rounds": rounds, "extended": extended})


# What config.json holds besides the options (experiment.save_run_directory, the engines' records, resume's notes).
RUN_RECORD = ("root", "device_used", "out", "classes", "condition_set", "attribute_source", "tunable_params",
              "backbone_sha256", "feature_cache", "loss_over_images", "encoded_images", "client_sizes", "client_names",
              "label_skew", "images", "similar_class_pairs", "masked_positives", "skipped_images", "engine",
              "superlink", "round_timeout", "min_nodes", "extended", "unseen_classes", "negative_only_images")


def read_config(run_dir: str):
    """(Config, ModelConfig, the whole config.json) of a run, checked (read_run_config)."""
    return read_run_config(run_dir, (Config, ModelConfig), RUN_RECORD)


def resume(run_dir: str, given: dict = None):
    """--resume RUN: (Config, ModelConfig, checkpoint or None). The run's own options (resume_config),
    its checkpoint.pt checked before the long setup, and --rounds beside it checked (extend_rounds
    writes it once the run's setup passed)."""
    cfg, model_cfg = resume_config(run_dir, given)
    path, checkpoint = Path(run_dir) / "checkpoint.pt", None
    if path.exists():
        checkpoint = read_checkpoint(path, "restore it, or delete it to train the run again from round 0 with --resume")
    if "rounds" in (given or {}):  # checked now; config.json records it once every check of the run passed
        check_extension(run_dir, cfg.rounds, checkpoint["round"] if checkpoint else 0)
    return cfg, model_cfg, checkpoint


def finished_history(run_dir, rounds: int):
    """--resume of a finished run (its metrics.json reaches its `rounds`, its state.pt is written):
    its history, after saying so and where its state is; nothing is set up or written. None for
    a run that has rounds left (or is extended by --rounds)."""
    run_dir = Path(run_dir)
    try:
        history = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # resume's own checks (checkpoint.pt) say what is wrong with such a run
    if not (run_dir / "state.pt").exists() or not history or history[-1].get("round") != rounds:
        return None
    print(f"--resume {run_dir}: the run is finished ({rounds} of {rounds} rounds, final mAP {history[-1]['mAP']:.2f}); "
          f"its state is in {run_dir / 'state.pt'}. Nothing to do and nothing written: label images with python "
          f"predict.py --run {run_dir}, or give --rounds N (more than {rounds}) beside --resume to extend it.")
    return history


def resume_config(run_dir: str, given: dict = None):
    """The run's own options; its conditions from the copy it saved (an edited source file
    must not change a resumed model). `given`: options named beside --resume, {name: value}.
    Those that only say how the run is executed (the fields marked `execution`) apply, and
    --rounds may extend the run; any other is refused: it would change what the saved rounds
    were trained with."""
    cfg, model_cfg, saved = read_config(run_dir)
    cfg.unseen = zeroshot.resumed_unseen(cfg.unseen, saved)  # the names it resolved, not the file read again
    given = {name: value for name, value in (given or {}).items() if name != "resume"}
    execution = {f.name for f in dataclasses.fields(Config) if f.metadata.get("execution")}
    refused = [flag(name) for name in given if name not in execution | {"rounds"}]
    if refused:
        raise FedMPTError(f"--resume {run_dir} continues the run with its own options; {', '.join(refused)} would change "
                          "what its saved rounds were trained with. Start a new run (another --out) to change them; "
                          f"beside --resume only --rounds (to extend it), {', '.join(flag(n) for n in sorted(execution))} "
                          "apply.")
    for name, value in given.items():
        setattr(cfg, name, value)
    cfg.out, cfg.resume = str(run_dir), str(run_dir)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("note: the run was trained with --device cuda; no CUDA device is visible here, so it "
              "continues on the CPU.", file=sys.stderr)
        cfg.device = "cpu"
    if cfg.conditions != "none" and (Path(run_dir) / "conditions.json").exists():
        cfg.conditions = str(Path(run_dir) / "conditions.json")
    if (Path(run_dir) / "attributes.json").exists():
        cfg.attributes = str(Path(run_dir) / "attributes.json")
    return cfg, model_cfg


def continue_from(checkpoint: dict, rng: np.random.Generator, out: Path):
    """A resumed run's history and first round; the client-sampling generator as it was. A run
    stopped between the two writes of a round: metrics.json catches up with checkpoint.pt."""
    rng.bit_generator.state = checkpoint["rng_state"]
    print(f"resuming {out} after round {checkpoint['round']}")
    write_json(out / "metrics.json", checkpoint["history"])
    return checkpoint["history"], checkpoint["round"] + 1


def client_failed(round_index: int, clients: list, error: Exception) -> RunFailed:
    """What a client update that raised (out of memory, a bug) ends the run with: RunFailed naming
    the round, the client(s) and the error, with a hint for out of memory."""
    oom = isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower() \
        or "can't allocate memory" in str(error)
    who = f"client {clients[0]}" if len(clients) == 1 else f"clients {clients}"
    return RunFailed(f"round {round_index}, {who}: {type(error).__name__}: {error}"
                     + ("; out of memory: try a smaller --batch-size" if oom else ""))


@contextmanager
def round_failure(out: Path, round_index: int):
    """A round that fails (RunFailed: its traceback goes to error.log) or is interrupted (Ctrl-C)
    ends the run with what was kept and how to continue it."""
    try:
        yield
    except RunFailed as failure:
        write_atomic(out / "error.log", "".join(traceback.format_exception(failure.__cause__)).encode())
        kept = f"checkpoint.pt keeps round {round_index - 1}" if round_index > 1 else "no round finished"
        raise RunFailed(f"{failure} (traceback in {out / 'error.log'}; {kept}; fix the cause and "
                        f"continue with --resume {out})") from failure.__cause__
    except KeyboardInterrupt:
        kept = (f"{out / 'checkpoint.pt'} keeps round {round_index - 1}" if round_index > 1
                else "no round had finished")
        raise Interrupted(f"interrupted in round {round_index}: {kept}; continue with "
                          f"python federate.py --resume {out}") from None


def warn_after_run(history: list, lr: float, grad_clip: float, stalled_rounds: int = 3) -> list:
    """After the last round (both engines), a warning for each way the run may have learned
    nothing it reports; returns their names ([] for a run that learned):
    - "untrained": the final model ranks the test images no better than the label prior (within
      1 mAP), whatever the exit code says; it tells a collapse (round 0 was better) from a task
      the backbone cannot see;
    - "stalled" (else): the training loss and gradient norm stayed flat over the last
      `stalled_rounds` rounds (loss within 2%, gradient norm within half its mean) while the final
      mAP is within 5 of the label prior: it stopped learning early;
    - "clipped": the gradient-norm guard clipped more than half of the local steps (metrics.json's
      clip_share, each trained round counted alike), so the clip, not the gradient, set the steps."""
    final, start, prior = history[-1]["mAP"], history[0]["mAP"], history[0]["label_prior_mAP"]
    said = []
    flat = [row for row in history[1:] if row.get("loss") is not None and not row.get("failed")][-stalled_rounds:]
    spread = lambda key: np.ptp([row[key] for row in flat]) / max(abs(np.mean([row[key] for row in flat])), 1e-12)
    if final <= prior + 1.0:
        said.append("untrained")
        print(f"warning: the final model ranks the test images no better than the label prior (final mAP "
              f"{final:.2f}, label prior {prior:.2f}, round 0 {start:.2f}). "
              + (f"Training lost what round 0 had: the steps were too large for this data; try --lr {lr / 3:.3g}, "
                 "or --loss bce (ASL's gradient vanishes once every probability saturates: docs/choices.md)."
                 if start > prior + 1.0 else
                 "It never rose above it: check the labels, and the vocabulary warning above if any."), file=sys.stderr)
    elif len(flat) == stalled_rounds and final <= prior + 5.0 and spread("loss") <= 0.02 and spread("grad_norm") <= 0.5:
        said.append("stalled")
        print(f"warning: training stopped learning: over rounds {flat[0]['round']}-{flat[-1]['round']} the loss stayed "
              f"at {flat[-1]['loss']:.4g} and the gradient norm at {flat[-1]['grad_norm']:.3g}, and the final mAP "
              f"{final:.2f} is within 5 of the label prior {prior:.2f}. Try --loss bce (ASL's gradient vanishes once "
              f"every probability saturates: docs/choices.md), another --lr than {lr:g}, or for FedMPT --class-ctx 4; "
              "compare the choices on --validation.", file=sys.stderr)
    shares = [row["clip_share"] for row in history[1:] if row.get("clip_share") is not None]
    if grad_clip and shares and np.mean(shares) > 0.5:
        said.append("clipped")
        norm = float(np.mean([row["grad_norm"] for row in history[1:] if row.get("clip_share") is not None]))
        print(f"warning: the gradient-norm guard clipped {np.mean(shares):.0%} of the local steps over the run (mean "
              f"gradient norm {norm:.3g}, --grad-clip {grad_clip:g}): the clip, not the gradient, set the length of "
              f"those steps, so --lr {lr:g} acted through it. Try a lower --lr, or --grad-clip 0 to see the raw norms "
              "(docs/choices.md).", file=sys.stderr)
    return said


def check_trained(history: list, first_round: int, start_state: dict, final_state: dict):
    """After the last round: a run that could not train is a failed run (RunFailed, exit 1), not a
    finished one. It could not when no client update was aggregated in any of its rounds (every
    one rejected or failed: `failed` in each row), or when the rounds this process ran left the
    global state exactly as it found it."""
    trained = [row for row in history if row["round"] >= 1]
    ran_here = [row for row in trained if row["round"] >= first_round]
    unchanged = bool(ran_here) and all(torch.equal(start_state[name], final_state[name]) for name in start_state)
    if trained and all(row.get("failed") for row in trained):
        cause = (f"no client update was aggregated in any of its {len(trained)} rounds (every one was rejected or "
                 "failed: the reasons are logged above, non-finite values after too large steps above all)")
    elif unchanged:
        cause = (f"the global state did not change in rounds {ran_here[0]['round']}-{ran_here[-1]['round']} (the "
                 "updates were too small to move a float32 value)")
    else:
        return
    raise RunFailed(f"the run could not train: {cause}. Its rows are in metrics.json, but it is not a finished "
                    "run (no state.pt). Try a lower --lr (or 0, the method's own), keep --grad-clip on (its "
                    "default 10), and start again with another --out.")
