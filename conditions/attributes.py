"""FedMVP's class attribute descriptions from an LLM: the prompt and the checks of an answer.

`python -m conditions.discover --attributes` sends the prompt and writes the accepted answer as
an attribute file (baselines/attributes/<dataset>.json's format; `baselines.fedmvp.load_attributes`
reads it). Long class lists are asked in chunks of at most `--classes-per-request` classes, each
chunk its own conversation: an answer for 20 classes is short enough to check and send back.
"""
import clip

import data

AERIAL = "Its images are aerial and satellite images: describe how each class looks from above."
VIEWS = {"multiscene": AERIAL, "mlrsnet": AERIAL,  # what a dataset's images are; else photographs
         "shapes": "Its images are small synthetic pictures of simple shapes."}
MIN_WORDS, MAX_WORDS = 3, 25
MAX_COMPLAINTS = 10  # a complaint lists at most this many problems


def chunks(class_names, size: int) -> list:
    """The classes in consecutive chunks of at most `size` (0: one chunk), as even as possible."""
    class_names = list(class_names)
    parts = max(1, -(-len(class_names) // size)) if size > 0 else 1
    return [class_names[i * len(class_names) // parts:(i + 1) * len(class_names) // parts]
            for i in range(parts)]


def attribute_prompt(dataset: str, all_classes, class_names, n: int) -> str:
    """The user message that asks for n descriptions of each of `class_names` (a chunk of
    `all_classes`); a class whose prompt name differs from its key is listed with both."""
    view = VIEWS.get(dataset, "Its images are photographs.")
    lines = [f'We train a multi-label image classifier on the dataset "{dataset}" by prompting CLIP. '
             f"{view} Its {len(all_classes)} classes are: "
             f"{', '.join(data.prompt_name(c) for c in all_classes)}."]
    if len(class_names) < len(all_classes):
        lines.append(f"This request is about {len(class_names)} of them.")
    lines += [f"For each class below write exactly {n} short visual descriptions: plain English "
              f"sentences of {MIN_WORDS} to {MAX_WORDS} words that name the class and say what it "
              "looks like (shape, colour, texture, parts) or where it is seen. A class's "
              "sentences must differ from each other; describe what sets it apart from the "
              "other classes.",
              "Classes (the JSON key, then in brackets how to say it where it differs):"]
    lines += [f"- {c}" if data.prompt_name(c) == c else f"- {c} ({data.prompt_name(c)})"
              for c in class_names]
    lines.append("Answer with strict JSON and nothing else, with the keys exactly as listed: "
                 '{"attributes": {"<class>": ["<sentence>", ...], ...}}')
    return "\n".join(lines)


def sentence_tokens(sentence: str) -> int:
    """CLIP tokens of a sentence, [SOS] and [EOT] included."""
    return int(clip.tokenize([sentence], context_length=1000, truncate=True).argmax(dim=-1)) + 1


def attribute_problems(attributes, class_names, n: int, context_length: int = 77):
    """({class: [sentence, ...]} in class order, whitespace tidied; [problem sentences]).

    Valid: an object with one key per class (as listed, or its prompt name; case is ignored)
    and no other; each value a list of exactly n distinct (ignoring case) sentences of printable
    text, MIN_WORDS to MAX_WORDS words that fit CLIP's `context_length` tokens."""
    if not isinstance(attributes, dict):
        return {}, ["'attributes' must be a JSON object mapping each class to a list of sentences"]
    keys = {}
    for c in class_names:
        keys[c.lower()] = keys[data.prompt_name(c).lower()] = c
    found, problems, unknown = {}, [], []
    for key, sentences in attributes.items():
        c = keys.get(" ".join(str(key).lower().split()))
        if c is None:
            unknown.append(key)
        elif c in found:
            problems.append(f"class {c!r} is given twice")
        else:
            found[c] = sentences
    missing = [c for c in class_names if c not in found]
    if missing:
        problems.append(f"classes missing: {', '.join(missing)}")
    if unknown:
        problems.append(f"not classes of this request: {', '.join(map(repr, unknown))}")
    tidy = {}
    for c in [c for c in class_names if c in found]:
        sentences = found[c]
        if not isinstance(sentences, list) or not all(isinstance(t, str) for t in sentences):
            problems.append(f"{c!r} must map to a list of sentences (strings)")
            continue
        sentences = tidy[c] = [" ".join(t.split()) for t in sentences]
        if len(sentences) != n:
            problems.append(f"{c!r} has {len(sentences)} sentences, not exactly {n}")
        lowered = [t.lower() for t in sentences]
        if len(set(lowered)) < len(lowered):
            problems.append(f"{c!r} repeats a sentence")
        for t in sentences:
            if not t.isprintable() or not MIN_WORDS <= len(t.split()) <= MAX_WORDS:
                problems.append(f"{c!r}: {t!r} is not a sentence of {MIN_WORDS}-{MAX_WORDS} words")
            elif sentence_tokens(t) > context_length:
                problems.append(f"{c!r}: {t!r} exceeds CLIP's {context_length} tokens")
    if len(problems) > MAX_COMPLAINTS:
        problems = problems[:MAX_COMPLAINTS] + [f"and {len(problems) - MAX_COMPLAINTS} more problems"]
    return tidy, problems
