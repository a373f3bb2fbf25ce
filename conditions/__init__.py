"""Conditions: the shipped condition files (conditions/<dataset>.json), loading and validating
them. `python -m conditions.discover` asks an LLM for a dataset's conditions (discover.py).
"""
import collections
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # raised inside clip
import clip  # noqa: E402

import data  # noqa: E402
from errors import FedMPTError  # noqa: E402

CONDITIONS_DIR = Path(__file__).resolve().parent
DEFAULT_CONDITIONS = ["color", "background", "scene type", "spatial layout", "pose"]


def load_conditions(spec: str, dataset: str) -> dict:
    """Resolve `--conditions`: '' = the shipped file of the dataset, 'none' = one generic
    condition (the ablation), anything else = a path to a condition file."""
    if spec == "none":
        return {"dataset": dataset, "conditions": [""], "source": "none"}
    path = Path(spec) if spec else CONDITIONS_DIR / f"{dataset}.json"
    if not spec and not path.exists():
        return {"dataset": dataset, "conditions": list(DEFAULT_CONDITIONS), "source": "default"}
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FedMPTError(f"cannot read condition file {path}: {error}. "
                          "Pass --conditions FILE with a JSON file, or 'none'.") from None
    conditions = content.get("conditions") if isinstance(content, dict) else None
    # a user's file is checked here; the shipped ones by tests/test_conditions.py
    problems = condition_problems(conditions, data.known_classes(dataset)) if spec else []
    if problems:
        raise FedMPTError(f"condition file {path} is invalid: {'; '.join(problems)}. Fix the "
                          "file, or run `python -m conditions.discover` to write a new one.")
    return {"dataset": content.get("dataset", dataset), "conditions": conditions,
            "source": content.get("source", "unknown"), "file": str(path)}


# ---- Validating conditions ----------------------------------------------------------------
def prompt_length(condition: str, class_name: str, n_ctx: int = 16) -> int:
    """Tokens, [SOS] and [EOT] included, of the prompt ConditionPrompts builds for this pair."""
    text = f"{' '.join(['X'] * n_ctx)} {condition} {class_name}.".replace("  ", " ")
    tokens = clip.tokenize([text], context_length=1000, truncate=True)  # (1, 1000)
    return int(tokens.argmax(dim=-1)) + 1  # [EOT] has the largest token id


def condition_problems(conditions, class_names, k=None, context_length=77, n_ctx=16) -> list:
    """Everything wrong with a list of conditions, as sentences; [] means valid.

    Rules: a list of exactly k (if given) conditions, unique ignoring case; each 1-4 words of
    printable text; none a class name (as annotated or as prompted, ignoring case); and each
    fits CLIP's `context_length` tokens in the prompt "X*n_ctx <condition> <longest class>."."""
    if not isinstance(conditions, list) or not conditions:
        return ["'conditions' must be a non-empty list of strings"]
    if not all(isinstance(c, str) for c in conditions):
        return [f"every condition must be a string, got {conditions!r}"]
    if k is not None and len(conditions) != k:  # and nothing else is checked: a long list costs nothing
        return [f"expected exactly {k} conditions, got {len(conditions)}"]
    problems = []
    counts = collections.Counter(" ".join(c.lower().split()) for c in conditions)
    duplicates = sorted(c for c, n in counts.items() if n > 1)
    if duplicates:
        problems.append(f"conditions repeat (ignoring case): {', '.join(map(repr, duplicates))}")
    names = {n.lower() for n in class_names} | {data.prompt_name(n).lower() for n in class_names}
    prompted = [data.prompt_name(n) for n in class_names]
    lengths = [prompt_length("", name, n_ctx) for name in prompted]
    longest = prompted[lengths.index(max(lengths))] if prompted else ""  # the first of the longest
    for condition in conditions:
        if not condition.isprintable() or not 1 <= len(condition.split()) <= 4:
            problems.append(f"{condition!r} is not 1-4 words of printable text")
        elif " ".join(condition.lower().split()) in names:
            problems.append(f"{condition!r} is a class name; conditions must differ from classes")
        elif prompt_length(condition, longest, n_ctx) > context_length:
            problems.append(f"{condition!r} is too long: with {n_ctx} context tokens and the "
                            f"class '{longest}' its prompt exceeds CLIP's {context_length} tokens")
    return problems
