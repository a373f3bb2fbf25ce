"""Options from one source: the command line, the checks and docs/usage.md's table are made from
the config fields; the command line tells a newcomer what was wrong and where a run went."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import experiment
import federate
from options import ModelConfig
from options import FlowerConfig
import options
import client
import aggregation

usage_table = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location(
    "options_table", Path(__file__).resolve().parents[1] / "docs" / "options_table.py"))
spec.loader.exec_module(usage_table)  # docs/options_table.py, the script that writes the table


def test_the_usage_table_is_made_from_the_fields_and_is_current():
    table = options.options_table(usage_table.sections())
    for config_class in (options.Config, ModelConfig, FlowerConfig):
        for field in dataclasses.fields(config_class):
            assert f"| `{options.flag(field.name)}` |" in table, field.name
    assert table in usage_table.USAGE.read_text(), "docs/usage.md is stale: python docs/options_table.py --write"


def test_help_lists_every_option_its_choices_and_its_real_default():
    text = federate.build_parser((options.Config, ModelConfig)).format_help()
    flat = " ".join(text.split())
    for config_class in (options.Config, ModelConfig):
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
    assert options.in_range(value, spec) is inside


def test_an_error_names_only_the_options_that_were_wrong(capsys):
    assert federate.main(["--method", "foo"]) == 2
    error = capsys.readouterr().err
    assert error.strip() == ("error: --method foo: choose one of fedmpt, fedmvp, fed-dualcoop, fed-poscoop, fedtpg, "
                             "fed-maple, fed-ram.")
    assert federate.main(["--clients", "0", "--ot-rho", "0", "--loss", "mse"]) == 2
    error = capsys.readouterr().err
    assert "--clients 0: must lie in [1, inf)" in error and "--ot-rho 0.0: must lie in (0, inf]" in error
    assert "--loss mse: choose one of asl, bce" in error and "--lr" not in error


def test_the_aggregation_rules_are_named_once():
    field = next(f for f in dataclasses.fields(options.Config) if f.name == "aggregate")
    assert tuple(aggregation.AGGREGATORS) == field.metadata["choices"]


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
