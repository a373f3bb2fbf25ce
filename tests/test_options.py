"""Options from one source: the command line, the checks and docs/usage.md's table are made from
the config fields; the command line tells a newcomer what was wrong and where a run went."""
import argparse
import ast
import collections
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import client
import federate
import flower_app
import options
import predict
from options import Config, FlowerConfig, ModelConfig
from store import runs

REPO = Path(__file__).resolve().parents[1]

usage_table = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location(
    "options_table", Path(__file__).resolve().parents[1] / "docs" / "options_table.py"))
spec.loader.exec_module(usage_table)  # docs/options_table.py, the script that writes the table


def test_the_usage_table_is_made_from_the_fields_and_is_current():
    table = options.options_table(usage_table.sections())
    for config_class in (Config, ModelConfig, FlowerConfig):
        for field in dataclasses.fields(config_class):
            assert f"| `{options.flag(field.name)}` |" in table, field.name
    assert table in usage_table.USAGE.read_text(), "docs/usage.md is stale: python docs/options_table.py --write"


def test_help_lists_every_option_its_choices_and_its_real_default():
    text = parser_of(federate.parse_config, []).format_help()
    flat = " ".join(text.split())
    for config_class in (Config, ModelConfig):
        for field in dataclasses.fields(config_class):
            assert options.flag(field.name) in text
            assert field.metadata.get("help"), f"{field.name} has no help"
            for choice in field.metadata.get("choices", ()):
                assert choice in flat, (field.name, choice)
    assert "default: data/<dataset>" in flat and "default: 0 (the method's own)" in flat
    assert "fedmpt 0.1" in flat  # FedMPT's real rate, from its class


@pytest.mark.parametrize("value, spec, inside", [(0.0, "(0, 1]", False), (1.0, "(0, 1]", True), (0.5, "[0, 1)", True),
                                                 (1.0, "[0, 1)", False), (float("inf"), "(0, inf]", True),
                                                 (float("inf"), "(0, inf)", False), (-1, "[-1, inf)", True),
                                                 (float("nan"), "[0, inf)", False)])
def test_ranges_read_as_written(value, spec, inside):
    Ranged = dataclasses.make_dataclass("Ranged", [("x", float, options.option(0.5, "x", range=spec))])
    problems = options.field_problems(Ranged(x=value))
    assert problems == ([] if inside else [f"--x {value}: must lie in {spec}"])


def test_an_error_names_only_the_options_that_were_wrong(capsys, monkeypatch):
    monkeypatch.setattr(runs.os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # busy cores: the error is still all it says
    assert federate.main(["--method", "foo"]) == 2
    error = capsys.readouterr().err
    assert error.strip() == ("error: --method foo: choose one of fedmpt, fedmvp, fed-dualcoop, fed-poscoop, fedtpg, "
                             "fed-maple, fed-ram.")
    assert federate.main(["--clients", "0", "--ot-rho", "0", "--loss", "mse"]) == 2
    error = capsys.readouterr().err
    assert "--clients 0: must lie in [1, inf)" in error and "--ot-rho 0.0: must lie in (0, inf]" in error
    assert "--loss mse: choose one of asl, bce" in error and "--lr" not in error


@pytest.mark.slow
def test_a_run_prints_where_its_options_went_not_the_options(shapes_root, tmp_path, capsys):
    out, threads = tmp_path / "run", torch.get_num_threads()
    try:
        assert federate.main(["--root", str(shapes_root), "--out", str(out), "--rounds", "1", "--clients", "2",
                              "--batch-size", "128", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:  # later tests in this process compare runs bit for bit with other processes
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert f"options and sizes: {out / 'config.json'}" in printed and "backbone_sha256" not in printed
    assert json.loads((out / "config.json").read_text())["threads"] == 1


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_naming_the_checkpoint_and_the_resume_command(shapes_root, tmp_path, capsys,
                                                                                 monkeypatch):
    out, real, calls = tmp_path / "run", client.local_train, []

    def interrupted_in_round_2(*args):
        calls.append(1)
        if len(calls) > 2:  # 2 clients: round 2's first client
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(federate, "local_train", interrupted_in_round_2)
    assert federate.main(["--root", str(shapes_root), "--out", str(out), "--rounds", "3", "--clients", "2",
                          "--batch-size", "128"]) == 130
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == (f"error: interrupted in round 2: {out / 'checkpoint.pt'} keeps round 1; continue with "
                         f"python federate.py --resume {out}")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 1


# ---- Every option is defined once ---------------------------------------------------------------
class Parsed(Exception):
    """Raised in place of parsing: the parser an entry point built is in hand."""


def parser_of(command, *args) -> argparse.ArgumentParser:
    """The parser `command(*args)` builds, caught as it starts to parse (nothing runs after)."""
    built = []

    def caught(parser, *_, **__):
        built.append(parser)
        raise Parsed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", caught)
        with pytest.raises(Parsed):
            command(*args)
    return built[0]


ENTRY_POINTS = {"federate": (federate.parse_config, []), "predict": (predict.parse_options, ["--evaluate"]),
                "flower_app": (flower_app.main, [])}


def definitions(entry_point: str) -> collections.Counter:
    """Where the options of an entry point are defined, by flag: each field of options.py's
    dataclasses its build_parser call takes (those in `only`, if given), and each literal
    add_argument("--x", ...) in its source."""
    found = collections.Counter()
    for node in ast.walk(ast.parse((REPO / f"{entry_point}.py").read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", None))
        if name == "add_argument":
            found.update(arg.value for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-"))
        elif name == "build_parser":
            classes = [getattr(options, element.id) for element in node.args[0].elts]
            only = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "only"), None)
            found.update(options.flag(f.name) for config_class in classes for f in dataclasses.fields(config_class)
                         if only is None or f.name in only)
    return found


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_option_is_defined_once(entry_point):
    parser = parser_of(*ENTRY_POINTS[entry_point])
    given = [flag for action in parser._actions for flag in action.option_strings
             if not isinstance(action, argparse._HelpAction)]
    defined = definitions(entry_point)
    assert given and len(given) == len(set(given))
    twice = {flag: defined[flag] for flag in given if defined[flag] != 1}
    assert not twice, f"{entry_point}: options not defined exactly once (flag: definitions): {twice}"
    assert set(defined) <= set(given), f"{entry_point}: defined but not in its parser: {set(defined) - set(given)}"


def test_predict_takes_the_options_it_shares_with_training_from_config():
    fields = {options.flag(f.name): f for f in dataclasses.fields(Config)}
    shared = ["--device", "--dataset", "--root", "--cache-dir"]
    literals = collections.Counter()
    for node in ast.walk(ast.parse((REPO / "predict.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            literals.update(arg.value for arg in node.args if isinstance(arg, ast.Constant))
    actions = {flag: action for action in parser_of(*ENTRY_POINTS["predict"])._actions for flag in action.option_strings}
    for flag in shared:
        assert definitions("predict")[flag] == 1 and not literals[flag], flag
        field, action = fields[flag], actions[flag]
        assert action.type is type(field.default) and action.field is field, flag  # its --help is the field's
    assert actions["--device"].default == Config.device  # the same choices and default as training's
