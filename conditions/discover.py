"""Discover a dataset's conditions with an LLM and write them as a condition file, or (with
--attributes) FedMVP's class attribute descriptions as an attribute file.

    python -m conditions.discover --dataset voc2007 --root data/voc2007 \
        --base-url http://127.0.0.1:8080/v1 --model NAME --out conditions/voc2007.json
    python -m conditions.discover --attributes --dataset voc2007 \
        --base-url http://127.0.0.1:8080/v1 --model NAME --out baselines/attributes/voc2007-llm.json

The conditions prompt lists the classes and (with --root) the most frequent label pairs of the
training split; the answer must hold K valid conditions (`conditions.condition_problems`). The
attributes prompt asks for N sentences per class (`conditions.attributes`), in chunks of at most
--classes-per-request classes. Either way a bad answer goes back to the LLM with the complaint
and it is asked again; --out is written only when every answer is valid.
"""
import argparse
import contextlib
import datetime
import http.client
import io
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
from pathlib import Path

import torch

import data
from baselines.fedmvp import ATTRIBUTES_DIR
from conditions import attributes as attribute_text
from conditions import condition_problems
from errors import FedMPTError, exit_code
from store.files import write_json

# We call the chat-completions endpoint with the standard library's http.client rather than the
# `openai` package: discovery is a few POSTs, it adds no dependency, and it speaks to any
# OpenAI-compatible server (a hosted API, llama.cpp's llama-server, vLLM) with nothing but a base
# URL. http.client follows no redirect (the key goes to --base-url alone), and chat_completion
# bounds the whole exchange by --timeout and the reply by MAX_ANSWER_BYTES.
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


MAX_ANSWER_BYTES = 4 * 2 ** 20  # a chat completion of K conditions is a few KB; more is not an answer
SHOWN_CHARACTERS = 2000  # what of an answer an error message quotes


def shown(text: str) -> str:
    """An answer as a message may quote it: non-printable characters (terminal escapes too)
    written as escapes, at most SHOWN_CHARACTERS of them."""
    safe = "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text[:SHOWN_CHARACTERS])
    return safe + (f" ... ({len(text) - SHOWN_CHARACTERS} more characters)" if len(text) > SHOWN_CHARACTERS else "")


def parse_answer(answer: str, key: str = "conditions"):
    """The value of `key` in an answer's JSON object (a ```json fence is tolerated), or a
    problem sentence."""
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", answer.strip(), flags=re.DOTALL)
    try:
        content = json.loads(fenced.group(1) if fenced else answer)
    except json.JSONDecodeError as error:
        return None, f"the answer is not valid JSON ({error})"
    except RecursionError:
        return None, "the answer's JSON nests deeper than Python's parser goes"
    if not isinstance(content, dict) or key not in content:
        return None, f'the answer must be a JSON object with the key "{key}"'
    return content[key], None


class Refused(OSError):
    """A reply this client will not take: too large, too slow as a whole, or a redirect."""


def chat_completion(base_url: str, model: str, messages, api_key: str, timeout: float) -> str:
    """One POST {base_url}/chat/completions at temperature 0; returns the answer's text.
    `timeout` bounds the whole exchange, not each read (a server that drips bytes is cut off);
    the reply may hold MAX_ANSWER_BYTES at most; a redirect is not followed (the API key is
    never sent anywhere but --base-url)."""
    url = urllib.parse.urlsplit(f"{base_url.rstrip('/')}/chat/completions")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise FedMPTError(f"--base-url {base_url}: give an http:// or https:// address.")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body = json.dumps({"model": model, "messages": messages, "temperature": 0}).encode()
    deadline = time.monotonic() + timeout
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    connection = kind(url.hostname, url.port, timeout=timeout)
    watchdog = threading.Timer(timeout, cut_off, args=(connection,))  # headers dripped byte by byte too
    watchdog.start()
    try:
        connection.request("POST", url.path + (f"?{url.query}" if url.query else ""), body=body, headers=headers)
        sock = connection.sock  # the response keeps reading from it after the connection lets go
        response = connection.getresponse()
        if 300 <= response.status < 400:
            said = (f"a redirect to {response.getheader('Location')}, not followed (the key goes to --base-url "
                    "alone): point --base-url at the server itself")
            raise urllib.error.HTTPError(url.geturl(), response.status, said, response.headers,
                                         io.BytesIO(said.encode()))
        chunks, size = [], 0
        while chunk := read_before(response, sock, deadline):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise Refused(f"the reply is over {MAX_ANSWER_BYTES // 2 ** 20} MiB: not a chat completion")
            chunks.append(chunk)
        payload = b"".join(chunks)
        if response.status >= 400:
            raise urllib.error.HTTPError(url.geturl(), response.status, payload.decode(errors="replace"),
                                         response.headers, io.BytesIO(payload))
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() >= deadline and not isinstance(error, (Refused, urllib.error.HTTPError)):
            raise TimeoutError("the whole reply took longer than --timeout") from None
        raise
    finally:
        watchdog.cancel()
        connection.close()
    answer = json.loads(payload)["choices"][0]["message"]["content"]
    if not isinstance(answer, str):
        raise TypeError(f"message content is {shown(repr(answer))}, not text")
    return answer


def cut_off(connection):
    """The watchdog: end a connection whose whole exchange ran past its deadline."""
    with contextlib.suppress(OSError, AttributeError):
        connection.sock.shutdown(socket.SHUT_RDWR)


def read_before(response, sock, deadline) -> bytes:
    """The next piece of the reply, or TimeoutError once the deadline has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the whole reply took longer than --timeout")
    sock.settimeout(left)
    return response.read1(65536)


def ask(prompt, check, again, base_url, model, api_key, timeout=60.0, retries=3,
        what="conditions"):
    """Ask until `check(answer)` returns (value, []) and return the value; at most 1 + `retries`
    requests.

    An invalid answer stays in the conversation, followed by a message saying what was wrong
    with it and `again` (what to answer). Server errors (5xx, 429), refused connections and
    timeouts are retried after a short, growing pause (0.5 s, 1 s, 2 s, then 4 s); other HTTP
    errors (4xx: key, URL, model name) stop at once."""
    messages = [{"role": "user", "content": prompt}]
    for attempt in range(1 + retries):
        try:
            answer = chat_completion(base_url, model, messages, api_key, timeout)
        except urllib.error.HTTPError as error:
            detail = shown(error.read().decode(errors="replace")[:300])
            if error.code < 500 and error.code != 429:
                raise FedMPTError(f"{base_url} answered HTTP {error.code}: {detail}. Check "
                                  "--base-url (usually ending in /v1), --model and the API key "
                                  f"in ${API_KEY_VARIABLES[0]}.") from None
            failure, fix = f"HTTP {error.code}: {detail}", "retry later or raise --retries"
        except Refused as error:
            failure, fix = str(error), "check that --base-url is an OpenAI-compatible API"
        except (OSError, http.client.HTTPException) as error:  # timeouts, refused connections
            if isinstance(getattr(error, "reason", error), TimeoutError):
                failure, fix = f"no whole answer within --timeout {timeout:g} s", "raise --timeout"
            else:
                failure = f"cannot connect ({getattr(error, 'reason', error)})"
                fix = "check that an OpenAI-compatible server listens at --base-url"
        except (ValueError, LookupError, TypeError) as error:
            failure = f"the reply is not a chat completion ({shown(repr(error))})"
            fix = "check that --base-url is an OpenAI-compatible API"
        else:
            value, problems = check(answer)
            if not problems:
                return value
            failure = f"invalid answer: {shown('; '.join(problems))}. The answer was:\n{shown(answer)}\n"
            fix = "raise --retries or try another --model"
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": f"That answer is invalid: "
                          f"{'; '.join(problems)}. Answer again with {again}."}]
            continue
        if attempt < retries:
            time.sleep(min(0.5 * 2 ** attempt, 4.0))
    raise FedMPTError(f"no valid {what} from {base_url} (model {model}) after "
                      f"{1 + retries} request(s); last: {failure}. To fix: {fix}.")


def ask_for_conditions(prompt, class_names, k, base_url, model, api_key, timeout=60.0,
                       retries=3, context_length=77, n_ctx=16) -> list:
    """k valid conditions (`conditions.condition_problems`), whitespace tidied."""
    def check(answer):
        conditions, problem = parse_answer(answer, "conditions")
        problems = [problem] if problem else condition_problems(
            conditions, class_names, k, context_length, n_ctx)
        return (None if problems else [" ".join(c.split()) for c in conditions]), problems
    return ask(prompt, check, f'strict JSON {{"conditions": [...]}} holding exactly {k} conditions',
               base_url, model, api_key, timeout, retries)


def ask_for_attributes(prompt, class_names, n, base_url, model, api_key, timeout=60.0,
                       retries=3, context_length=77, what="attribute descriptions") -> dict:
    """{class: n sentences} for exactly `class_names` (`conditions.attributes.attribute_problems`)."""
    def check(answer):
        attributes, problem = parse_answer(answer, "attributes")
        if problem:
            return None, [problem]
        return attribute_text.attribute_problems(attributes, class_names, n, context_length)
    return ask(prompt, check, f'strict JSON {{"attributes": {{"<class>": [...]}}}} holding exactly '
               f"{n} sentences for each listed class and no other key", base_url, model, api_key,
               timeout, retries, what)


def dataset_classes(dataset, root, attribute_file=None):
    """(classes, training targets or None): the dataset's fixed classes, or with `root` those of
    its training split; failing both, the classes of `attribute_file` if it exists (so that the
    shipped attribute files of multiscene and mlrsnet can be regenerated without their data)."""
    classes, targets = data.known_classes(dataset), None
    if root:
        try:
            train_set = data.load_dataset(dataset, root, "train")
            classes, targets = train_set.classes, train_set.targets
        except FedMPTError as error:
            print(f"note: no training split ({error}); the prompt lists class names only.",
                  file=sys.stderr)
    if not classes and attribute_file is not None and attribute_file.exists():
        try:
            classes = list(json.loads(attribute_file.read_text())["attributes"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FedMPTError(f"cannot read the classes of {attribute_file} ({error!r}); pass "
                              "--root with the dataset's training data.") from None
        print(f"note: the classes of {attribute_file}.", file=sys.stderr)
    if not classes:
        raise FedMPTError(f"--dataset {dataset}: unknown; choose shapes, voc2007, coco2014 or "
                          "nuswide, or pass --root with its training data.")
    return classes, targets


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def api_key_from_environment() -> str:
    return next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), "")


def discover(dataset, root, base_url, model, k, out, timeout=60.0, retries=3,
             context_length=77, n_ctx=16) -> dict:
    """Build the prompt from the dataset's classes (and, with its training split, its label
    co-occurrences), ask the LLM, validate, and write the condition file `out`."""
    classes, targets = dataset_classes(dataset, root)
    names = [data.prompt_name(c) for c in classes]
    cooccurrences = label_cooccurrences(targets, names) if targets is not None else []
    prompt = build_prompt(dataset, names, cooccurrences, k)
    conditions = ask_for_conditions(prompt, classes, k, base_url, model, api_key_from_environment(),
                                    timeout, retries, context_length, n_ctx)
    result = {"dataset": dataset, "conditions": conditions, "source": f"llm:{model}",
              "created": now(), "base_url": base_url, "prompt": prompt,
              "cooccurrences": cooccurrences}
    write_json(Path(out), result)
    return result


def discover_attributes(dataset, root, base_url, model, n, out, timeout=60.0, retries=3,
                        context_length=77, per_request=20) -> dict:
    """Ask the LLM for n attribute sentences per class, `per_request` classes at a time (0: all
    at once), validate every answer, and write the attribute file `out` once all are valid."""
    classes, _ = dataset_classes(dataset, root, ATTRIBUTES_DIR / f"{dataset}.json")
    api_key, parts = api_key_from_environment(), attribute_text.chunks(classes, per_request)
    attributes, prompts, first = {}, [], 1
    for part in parts:
        prompt = attribute_text.attribute_prompt(dataset, classes, part, n)
        what = "attribute descriptions" + (f" for classes {first}-{first + len(part) - 1} of "
                                           f"{len(classes)}" if len(parts) > 1 else "")
        attributes.update(ask_for_attributes(prompt, part, n, base_url, model, api_key, timeout,
                                             retries, context_length, what))
        prompts.append(prompt)
        first += len(part)
    result = {"dataset": dataset, "source": f"llm:{model}", "generated": now(),
              "note": f"{n} sentences per class by {model}, written by python -m "
                      "conditions.discover --attributes",
              "base_url": base_url, "prompts": prompts, "attributes": attributes}
    write_json(Path(out), result)
    return result


def main(argv=None) -> int:
    command = argparse.ArgumentParser(
        prog="python -m conditions.discover",
        description="Ask an OpenAI-compatible chat-completions endpoint for K conditions that "
                    "explain the dataset's label dependencies and write them as a condition "
                    "file; with --attributes, for N descriptions of each class instead, written "
                    "as a FedMVP attribute file.",
        epilog=f"API key: ${API_KEY_VARIABLES[0]} (else ${API_KEY_VARIABLES[1]}), sent as "
               "'Authorization: Bearer'; leave both unset for a local server.")
    command.add_argument("--dataset", required=True, help="shapes, voc2007, coco2014 or nuswide; "
                         "others with --root (--attributes: or the classes of its shipped file)")
    command.add_argument("--root", default="", help="dataset root; its training labels add "
                         "co-occurrence counts to the prompt")
    command.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    command.add_argument("--model", required=True, help="model name the server knows")
    command.add_argument("--k", type=int, default=5, help="number of conditions K")
    command.add_argument("--out", required=True, help="condition (or attribute) JSON file to write")
    command.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    command.add_argument("--retries", type=int, default=3, help="extra requests after a bad one")
    command.add_argument("--context-length", type=int, default=77,
                         help="CLIP's text context (77; 32 for --clip tiny)")
    command.add_argument("--n-ctx", type=int, default=16, help="context tokens M per prompt")
    command.add_argument("--attributes", action="store_true",
                         help="ask for FedMVP's class attribute descriptions, not conditions")
    command.add_argument("--sentences", type=int, default=3,
                         help="--attributes: descriptions N per class")
    command.add_argument("--classes-per-request", type=int, default=20,
                         help="--attributes: classes asked for in one conversation (0: all)")
    return exit_code(run_discovery, command.parse_args(argv))


def run_discovery(args):
    if args.k < 1 or args.timeout <= 0 or args.retries < 0:
        raise FedMPTError("--k must be >= 1, --timeout > 0 and --retries >= 0.")
    if args.sentences < 1 or args.classes_per_request < 0:
        raise FedMPTError("--sentences must be >= 1 and --classes-per-request >= 0.")
    if args.attributes:
        result = discover_attributes(args.dataset, args.root, args.base_url, args.model, args.sentences,
                                     args.out, args.timeout, args.retries, args.context_length,
                                     args.classes_per_request)
        print(f"attribute descriptions ({result['source']}): {args.sentences} for each of "
              f"{len(result['attributes'])} classes; wrote {args.out}")
    else:
        result = discover(args.dataset, args.root, args.base_url, args.model, args.k, args.out, args.timeout,
                          args.retries, args.context_length, args.n_ctx)
        print(f"conditions ({result['source']}): {', '.join(result['conditions'])}; wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
