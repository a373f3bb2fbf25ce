"""Options from one source: each option is a config dataclass field (`fedmpt.option`) with its
help, its choices or its range; the command line, the range checks and docs/usage.md's table are
made from those fields here (the table: python docs/options_table.py --write).
"""
import argparse
import dataclasses
import math
import re

from errors import FedMPTError

BEGIN, END = "<!-- options: made by python docs/options_table.py --write -->", "<!-- end of options -->"


def flag(name: str) -> str:
    """The command-line flag of a field name: class_ctx -> --class-ctx."""
    return "--" + name.replace("_", "-")


def config_from(config_class, values: dict):
    """A config dataclass from a dict that may hold more (parsed options, a saved config.json)."""
    return config_class(**{f.name: values[f.name] for f in dataclasses.fields(config_class) if f.name in values})


def shown_default(field) -> str:
    """The default as a user reads it: the field's `shown` text, else its value."""
    if "shown" in field.metadata:
        return field.metadata["shown"]
    if isinstance(field.default, bool):
        return "off"
    return str(field.default)


def help_text(field) -> str:
    rules = field.metadata
    parts = [rules.get("help", "")]
    if "choices" in rules:
        parts.append(f"choices: {', '.join(map(str, rules['choices']))}")
    if "range" in rules:
        parts.append(f"range {rules['range']}")
    if not isinstance(field.default, bool):
        parts.append(f"default: {shown_default(field)}")
    return "; ".join(p for p in parts if p)


def build_parser(config_classes, prog=None, description=None) -> argparse.ArgumentParser:
    """argparse from the dataclasses' fields: --field-name, typed, with the field's default and help."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    for config_class in config_classes:
        for field in dataclasses.fields(config_class):
            if isinstance(field.default, bool):
                parser.add_argument(flag(field.name), action="store_true", help=help_text(field))
            else:
                metavar = {int: "N", float: "X"}.get(type(field.default), "TEXT")
                parser.add_argument(flag(field.name), type=type(field.default), default=field.default,
                                    metavar=metavar, help=help_text(field))
    return parser


def given_options(argv, *configs) -> dict:
    """{field name: parsed value} of the options named on the command line `argv`."""
    named = {argument.split("=")[0] for argument in argv if argument.startswith("--")}
    return {f.name: getattr(config, f.name) for config in configs for f in dataclasses.fields(config) if flag(f.name) in named}


def in_range(value, spec: str) -> bool:
    """Whether `value` lies in an interval written "(0, 1]", "[1, inf)", "(0, inf]"."""
    low_bracket, low, high, high_bracket = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])", spec).groups()
    low, high = float(low), float(high)
    if math.isnan(value):
        return False
    above = value >= low if low_bracket == "[" else value > low
    below = value <= high if high_bracket == "]" else value < high
    return above and below


def field_problems(config) -> list:
    """A message for each field outside its choices or range ("--name VALUE: ...")."""
    problems = []
    for field in dataclasses.fields(config):
        value, rules, kind = getattr(config, field.name), field.metadata, type(field.default)
        number = kind in (int, float) and isinstance(value, int if kind is int else (int, float))
        if not (isinstance(value, kind) or number) or isinstance(value, bool) != (kind is bool):
            problems.append(f"{flag(field.name)} {value!r}: must be {'a number' if kind in (int, float) else 'a ' + kind.__name__}")
        elif "choices" in rules and value not in rules["choices"]:
            problems.append(f"{flag(field.name)} {value}: choose one of {', '.join(map(str, rules['choices']))}")
        elif "range" in rules and not in_range(value, rules["range"]):
            problems.append(f"{flag(field.name)} {value}: must lie in {rules['range']}")
    return problems


def check_fields(*configs):
    """Raises FedMPTError naming every option outside its choices or range."""
    problems = [p for config in configs for p in field_problems(config)]
    if problems:
        raise FedMPTError("; ".join(problems) + ".")


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
