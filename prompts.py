"""Condition prompts: what FedMPT's text side learns, and where its conditions come from.

One prompt per (condition k, class c) and sign s in {+, -}:

    [SOS] ctx^s_k,1 ... ctx^s_k,M  <condition k> <class name c> . [EOT]

The M context vectors are learnable and shared by all classes of a condition (one set for the
positive, one for the negative prompt, as in DualCoOp); the tokens of the condition and class
name are fixed buffers (as in CoOp's PromptLearner). Conditions are short phrases (colour,
background, ...) that explain why labels co-occur; a JSON file per dataset holds them.
"""
import argparse
import datetime
import http.client
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import torch
import torch.nn as nn

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # raised inside clip
import clip  # noqa: E402

import data  # noqa: E402
import shapes  # noqa: E402
from errors import FedMPTError  # noqa: E402

CONDITIONS_DIR = Path(__file__).resolve().parent / "conditions"
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
    problems = condition_problems(conditions, known_class_names(dataset))
    if problems:
        raise FedMPTError(f"condition file {path} is invalid: {'; '.join(problems)}. Fix the "
                          "file, or run `python prompts.py discover` to write a new one.")
    return {"dataset": content.get("dataset", dataset), "conditions": conditions,
            "source": content.get("source", "unknown"), "file": str(path)}


ATTRIBUTES_DIR = Path(__file__).resolve().parent / "attributes"


def load_attributes(dataset: str, class_names, spec: str = "") -> dict:
    """FedMVP's class attribute descriptions: {class: [sentence, ...]} from
    attributes/<dataset>.json (or `spec`), else three template sentences per class."""
    path = Path(spec) if spec else ATTRIBUTES_DIR / f"{dataset}.json"
    if not spec and not path.exists():
        templates = ["a photo of a {}.", "a {} in its usual surroundings.", "a close-up of a {}."]
        return {"source": "template",
                "attributes": {c: [t.format(data.prompt_name(c)) for t in templates] for c in class_names}}
    try:
        content = json.loads(path.read_text())
        attributes = content["attributes"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise FedMPTError(f"cannot read attribute file {path} ({error!r}); it must hold "
                          '{"attributes": {"<class>": ["<sentence>", ...]}}.') from None
    missing = [c for c in class_names if not (isinstance(attributes.get(c), list) and attributes[c]
                                              and all(isinstance(t, str) and t.strip() for t in attributes[c]))]
    if missing:
        raise FedMPTError(f"attribute file {path}: no descriptions (a non-empty list of sentences) "
                          f"for {', '.join(missing)}.")
    return {"source": content.get("source", "unknown"), "file": str(path),
            "attributes": {c: attributes[c] for c in class_names}}


class ConditionPrompts(nn.Module):
    """Learnable contexts for K conditions x {+, -}; fixed condition and class-name tokens.
    With conditions [""] these are DualCoOp's prompts (CoOp's with signs=1; baselines.py)."""

    def __init__(self, class_names, conditions, n_ctx, token_embedding, context_length, tokenize, signs=2):
        super().__init__()
        K, C, M = len(conditions), len(class_names), n_ctx
        width = token_embedding.weight.shape[1]
        placeholder = " ".join(["X"] * M)
        texts = [f"{placeholder} {cond} {name}.".replace("  ", " ")
                 for cond in conditions for name in class_names]
        try:
            tokens = tokenize(texts, context_length=context_length)  # (K*C, L)
        except RuntimeError:
            raise FedMPTError(f"a condition prompt does not fit CLIP's {context_length} tokens "
                              f"with {M} context tokens; shorten the conditions or use a "
                              "smaller --n-ctx.") from None
        with torch.no_grad():
            tokens = tokens.to(token_embedding.weight.device)
            embedded = token_embedding(tokens).reshape(K, C, context_length, width)
        self.register_buffer("prefix", embedded[:, :, :1].clone(), persistent=False)  # (K, C, 1, Dt)
        self.register_buffer("suffix", embedded[:, :, 1 + M:].clone(), persistent=False)  # (K, C, L-1-M, Dt)
        self.register_buffer("eot", tokens.argmax(dim=-1).repeat(signs), persistent=False)  # (S*K*C,)
        generator = torch.Generator().manual_seed(0)
        self.context = nn.Parameter(0.02 * torch.randn(signs, K, M, width, generator=generator))  # (S, K, M, Dt)
        self.shape, self.signs = (K, C), signs

    def forward(self, context=None):
        """Prompt embeddings (S*K*C, L, Dt), sign-major, and their end-token positions. A
        `context` (S, K, M, Dt) given here replaces the learned one (FedTPG generates it)."""
        K, C = self.shape
        context = self.context if context is None else context
        context = context[:, :, None].expand(-1, -1, C, -1, -1)  # (S, K, C, M, Dt)
        prefix = self.prefix.expand(self.signs, -1, -1, -1, -1)
        suffix = self.suffix.expand(self.signs, -1, -1, -1, -1)
        prompts = torch.cat([prefix, context, suffix], dim=3)  # (S, K, C, L, Dt)
        return prompts.flatten(0, 2), self.eot


# ---- Validating conditions ----------------------------------------------------------------
def known_class_names(dataset: str) -> list:
    """The dataset's class names from the constants in data.py ([] for another dataset)."""
    return list({"shapes": shapes.SHAPES_CLASSES, "voc2007": data.VOC_CLASSES,
                 "coco2014": data.COCO_CLASSES, "nuswide": data.NUSWIDE_CLASSES}.get(dataset, []))


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
    problems = []
    if k is not None and len(conditions) != k:
        problems.append(f"expected exactly {k} conditions, got {len(conditions)}")
    lowered = [" ".join(c.lower().split()) for c in conditions]
    duplicates = sorted({c for c in lowered if lowered.count(c) > 1})
    if duplicates:
        problems.append(f"conditions repeat (ignoring case): {', '.join(map(repr, duplicates))}")
    names = {n.lower() for n in class_names} | {data.prompt_name(n).lower() for n in class_names}
    longest = max((data.prompt_name(n) for n in class_names), default="",
                  key=lambda name: prompt_length("", name, n_ctx))
    for condition in conditions:
        if not condition.isprintable() or not 1 <= len(condition.split()) <= 4:
            problems.append(f"{condition!r} is not 1-4 words of printable text")
        elif " ".join(condition.lower().split()) in names:
            problems.append(f"{condition!r} is a class name; conditions must differ from classes")
        elif prompt_length(condition, longest, n_ctx) > context_length:
            problems.append(f"{condition!r} is too long: with {n_ctx} context tokens and the "
                            f"class '{longest}' its prompt exceeds CLIP's {context_length} tokens")
    return problems


# ---- Discovering conditions with an LLM ---------------------------------------------------
# We call the chat-completions endpoint with urllib rather than the `openai` package: discovery
# is one POST, urllib adds no dependency, and it speaks to any OpenAI-compatible server
# (a hosted API, llama.cpp's llama-server, vLLM) with nothing but a base URL.
API_KEY_VARIABLES = ("FEDMPT_LLM_API_KEY", "OPENAI_API_KEY")


def label_cooccurrences(targets: torch.Tensor, class_names, top: int = 10) -> list:
    """The `top` class pairs most often present (target 1) together: [[name a, name b, images]]."""
    present = (targets == 1).float()  # (n_images, C)
    counts = torch.triu(present.T @ present, diagonal=1)  # (C, C), each pair once
    values, indices = counts.flatten().topk(min(top, counts.numel()))
    C = counts.shape[1]
    return [[class_names[int(i) // C], class_names[int(i) % C], int(v)]
            for v, i in zip(values, indices) if v > 0]


def build_prompt(dataset: str, class_names, cooccurrences, k: int) -> str:
    """The user message that asks the LLM for k conditions behind the label dependencies."""
    lines = [f'We train a multi-label image classifier on the dataset "{dataset}" by prompting '
             f"CLIP. Its {len(class_names)} classes are: {', '.join(class_names)}."]
    if cooccurrences:
        lines.append("The most frequent label pairs in its training images (pair: images) are:")
        lines += [f"- {a} + {b}: {n}" for a, b, n in cooccurrences]
    lines += [f"Name exactly {k} visual conditions (such as colour or background) that explain "
              "why labels in this dataset appear together in an image. Each condition is "
              'written before a class name in a CLIP prompt, "<condition> <class name>.", so '
              "it must be 1 to 4 plain English words, must not be a class name, and must "
              "differ from the other conditions.",
              'Answer with strict JSON and nothing else: {"conditions": ["...", "..."]}']
    return "\n".join(lines)


def parse_answer(answer: str):
    """The condition list in an answer (a ```json fence is tolerated), or a problem sentence."""
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", answer.strip(), flags=re.DOTALL)
    try:
        content = json.loads(fenced.group(1) if fenced else answer)
    except json.JSONDecodeError as error:
        return None, f"the answer is not valid JSON ({error})"
    if not isinstance(content, dict) or "conditions" not in content:
        return None, 'the answer must be a JSON object with the key "conditions"'
    return content["conditions"], None


def chat_completion(base_url: str, model: str, messages, api_key: str, timeout: float) -> str:
    """One POST {base_url}/chat/completions at temperature 0; returns the answer's text."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body = json.dumps({"model": model, "messages": messages, "temperature": 0}).encode()
    request = urllib.request.Request(f"{base_url.rstrip('/')}/chat/completions", data=body,
                                     headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())["choices"][0]["message"]["content"]
    if not isinstance(answer, str):
        raise TypeError(f"message content is {answer!r}, not text")
    return answer


def ask_for_conditions(prompt, class_names, k, base_url, model, api_key, timeout=60.0,
                       retries=3, context_length=77, n_ctx=16) -> list:
    """Ask until the answer holds k valid conditions, at most 1 + `retries` requests.

    An invalid answer stays in the conversation, followed by a message saying what was wrong
    with it. Server errors (5xx, 429), refused connections and timeouts are retried after a
    short, growing pause (0.5 s, 1 s, 2 s, then 4 s); other HTTP errors (4xx: key, URL, model
    name) stop at once."""
    messages = [{"role": "user", "content": prompt}]
    for attempt in range(1 + retries):
        try:
            answer = chat_completion(base_url, model, messages, api_key, timeout)
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:300]
            if error.code < 500 and error.code != 429:
                raise FedMPTError(f"{base_url} answered HTTP {error.code}: {detail}. Check "
                                  "--base-url (usually ending in /v1), --model and the API key "
                                  f"in ${API_KEY_VARIABLES[0]}.") from None
            failure, fix = f"HTTP {error.code}: {detail}", "retry later or raise --retries"
        except (OSError, http.client.HTTPException) as error:  # timeouts, refused connections
            if isinstance(getattr(error, "reason", error), TimeoutError):
                failure, fix = f"no answer within --timeout {timeout:g} s", "raise --timeout"
            else:
                failure = f"cannot connect ({getattr(error, 'reason', error)})"
                fix = "check that an OpenAI-compatible server listens at --base-url"
        except (ValueError, LookupError, TypeError) as error:
            failure = f"the reply is not a chat completion ({error!r})"
            fix = "check that --base-url is an OpenAI-compatible API"
        else:
            conditions, problem = parse_answer(answer)
            problems = [problem] if problem else condition_problems(
                conditions, class_names, k, context_length, n_ctx)
            if not problems:
                return [" ".join(c.split()) for c in conditions]
            failure = f"invalid answer: {'; '.join(problems)}. The answer was:\n{answer}\n"
            fix = "raise --retries or try another --model"
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": f"That answer is invalid: "
                          f"{'; '.join(problems)}. Answer again with strict JSON "
                          f'{{"conditions": [...]}} holding exactly {k} conditions.'}]
            continue
        if attempt < retries:
            time.sleep(min(0.5 * 2 ** attempt, 4.0))
    raise FedMPTError(f"no valid conditions from {base_url} (model {model}) after "
                      f"{1 + retries} request(s); last: {failure}. To fix: {fix}.")


def write_json_atomic(path: Path, content: dict):
    """Write a temporary file beside `path`, then rename it: `path` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
        json.dump(content, file, indent=1)
        file.write("\n")
    os.replace(file.name, path)


def discover(dataset, root, base_url, model, k, out, timeout=60.0, retries=3,
             context_length=77, n_ctx=16) -> dict:
    """Build the prompt from the dataset's classes (and, with its training split, its label
    co-occurrences), ask the LLM, validate, and write the condition file `out`."""
    classes, targets = known_class_names(dataset), None
    if root:
        try:
            train_set = data.load_dataset(dataset, root, "train")
            classes, targets = train_set.classes, train_set.targets
        except FedMPTError as error:
            print(f"note: no training split ({error}); the prompt lists class names only.",
                  file=sys.stderr)
    if not classes:
        raise FedMPTError(f"--dataset {dataset}: unknown; choose shapes, voc2007, coco2014 or "
                          "nuswide, or pass --root with its training data.")
    names = [data.prompt_name(c) for c in classes]
    cooccurrences = label_cooccurrences(targets, names) if targets is not None else []
    prompt = build_prompt(dataset, names, cooccurrences, k)
    api_key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), "")
    conditions = ask_for_conditions(prompt, classes, k, base_url, model, api_key, timeout,
                                    retries, context_length, n_ctx)
    result = {"dataset": dataset, "conditions": conditions, "source": f"llm:{model}",
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "base_url": base_url, "prompt": prompt, "cooccurrences": cooccurrences}
    write_json_atomic(Path(out), result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prompts.py", description="FedMPT condition prompts.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "discover", help="ask an LLM for a dataset's conditions",
        description="Ask an OpenAI-compatible chat-completions endpoint for K conditions that "
                    "explain the dataset's label dependencies; write them as a condition file.",
        epilog=f"API key: ${API_KEY_VARIABLES[0]} (else ${API_KEY_VARIABLES[1]}), sent as "
               "'Authorization: Bearer'; leave both unset for a local server.")
    command.add_argument("--dataset", required=True, help="shapes, voc2007, coco2014 or nuswide")
    command.add_argument("--root", default="", help="dataset root; its training labels add "
                         "co-occurrence counts to the prompt")
    command.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    command.add_argument("--model", required=True, help="model name the server knows")
    command.add_argument("--k", type=int, default=5, help="number of conditions K")
    command.add_argument("--out", required=True, help="condition JSON file to write")
    command.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    command.add_argument("--retries", type=int, default=3, help="extra requests after a bad one")
    command.add_argument("--context-length", type=int, default=77,
                         help="CLIP's text context (77; 32 for --clip tiny)")
    command.add_argument("--n-ctx", type=int, default=16, help="context tokens M per prompt")
    args = parser.parse_args(argv)
    try:
        if args.k < 1 or args.timeout <= 0 or args.retries < 0:
            raise FedMPTError("--k must be >= 1, --timeout > 0 and --retries >= 0.")
        result = discover(args.dataset, args.root, args.base_url, args.model, args.k, args.out,
                          args.timeout, args.retries, args.context_length, args.n_ctx)
    except FedMPTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"conditions ({result['source']}): {', '.join(result['conditions'])}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
