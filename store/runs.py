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
"""
import dataclasses
import json
import pickle
import sys
import time
from pathlib import Path

import torch

from errors import FedMPTError, RunFailed
from store.files import save_tensors, write_json
from tools.options import config_from, field_problems, flag


def default_out(cfg) -> str:
    """--out, else runs/<dataset>-<method>-<timestamp>; refused at once where it cannot be a
    run directory (check_out_folder)."""
    out = cfg.out or f"runs/{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out_folder(out)
    return out


def check_new_run(out, resume_hint: str = "python federate.py --resume"):
    """An --out for a new run: FedMPTError, before anything starts, when it is a file or already
    holds a run (its metrics.json or config.json): nothing of that run is overwritten."""
    check_out_folder(out)
    if (Path(out) / "metrics.json").exists() or (Path(out) / "config.json").exists():
        raise FedMPTError(f"--out {out} already holds a run; continue it with {resume_hint} {out}, or choose another "
                          "--out.")


def check_out_folder(out, option: str = "--out"):
    """A folder to write into: FedMPTError when `out`, or a folder on its path, is an existing
    file (or a link this code did not create), before anything is built or written."""
    out = Path(out)
    for path in (out, *out.parents):
        if path.is_symlink() and path == out:
            raise FedMPTError(f"{option} {out} is a symbolic link (to {path.readlink()}); give the folder itself.")
        if path.exists() and not path.is_dir():
            raise FedMPTError(f"{option} {out}: {path} is a file, not a folder; give another {option}.")


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


def write_run_files(out: Path, resolved: dict, conditions: dict, attributes=None):
    """A new run's config.json, conditions.json and attributes.json (FedMVP)."""
    write_json(out / "config.json", resolved)
    write_json(out / "conditions.json", conditions)
    if attributes:
        write_json(out / "attributes.json", attributes)


def save_round(out: Path, history: list, global_state: dict, round_index: int, rng_state=None):
    """After a training round checkpoint.pt (what --resume continues from), then metrics.json
    (a row per round): a write that fails leaves both at the last round that was saved whole."""
    fix = f"continue the run with python federate.py --resume {out}"
    if round_index > 0:
        save_tensors({"global_state": global_state, "round": round_index, "history": history,
                      "rng_state": rng_state}, out / "checkpoint.pt", fix)
    write_json(out / "metrics.json", history, fix)


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
