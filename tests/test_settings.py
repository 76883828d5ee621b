"""One name, one default, one check per setting: the settings objects, the commands' flags, the callback's config
and the result folders' summary use the same names."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

import evaluate_margin
import frequency_analysis
from callbacks import MarginCallback
from common.errors import InputError
from margins.settings import AttackSettings, RowSettings, RunSettings


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The visible options of a parser by destination (deprecated spellings are hidden)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}


def _random_parser() -> argparse.ArgumentParser:
    commands = next(a for a in frequency_analysis.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["random"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("settings", [RowSettings, AttackSettings])
def test_every_setting_of_what_and_how_is_a_flag_of_its_name_with_the_fields_default(settings):
    parsers = [_options(evaluate_margin.build_parser()), _options(_random_parser())]
    for field in dataclasses.fields(settings):
        holders = [options[field.name] for options in parsers if field.name in options]
        assert holders, f"{settings.__name__}.{field.name} has no flag"
        for action in holders:
            assert _flag(field.name) in action.option_strings, (field.name, action.option_strings)
            default = () if action.default is None and field.name == "bases" else action.default
            if field.name != "subspace":  # evaluate_margin.py's --subspace offers two of the kinds, default dct
                assert default == field.default, (field.name, action.default, field.default)


def test_the_run_settings_are_the_flags_of_their_names():
    options = _options(evaluate_margin.build_parser())
    inverse = {"progress": "no_progress", "keep_freed_memory": "return_freed_memory"}  # on by default: a flag turns off
    for field in dataclasses.fields(RunSettings):
        action = options[inverse.get(field.name, field.name)]
        assert _flag(inverse.get(field.name, field.name)) in action.option_strings
        if field.name not in inverse and field.name != "devices":
            assert action.default == field.default, field.name


def test_the_callback_takes_the_settings_objects_and_names_the_config_keys_after_the_flags():
    parameters = inspect.signature(MarginCallback).parameters
    assert parameters["rows"].annotation in (RowSettings, "RowSettings")
    assert parameters["attack"].annotation in (AttackSettings, "AttackSettings")
    names = {f.name for f in dataclasses.fields(RowSettings)} | {f.name for f in dataclasses.fields(AttackSettings)}
    assert not names & set(parameters), "a setting of rows or attack is also a parameter of its own"
    with pytest.raises(InputError, match=r"^num_samples must be >= 1 \(--margin\.rows\.num_samples\), got 0$"):
        MarginCallback(rows=RowSettings(num_samples=0))
    with pytest.raises(InputError, match=r"^max_iter must be >= 1 \(--margin\.attack\.max_iter\), got 0$"):
        MarginCallback(attack=AttackSettings(max_iter=0))


def test_settings_are_frozen_and_a_variant_is_a_copy():
    rows = RowSettings(bases=["a.npy"])
    assert rows.bases == ("a.npy",)  # a list from a config becomes a tuple: the object stays hashable and frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows.num_samples = 3  # type: ignore[misc]
    attack = AttackSettings(estimator="certify")
    assert attack.dtype is None and attack.precision == "float64" and AttackSettings().precision == "float32"
    resolved = attack.resolved("mnist")
    assert (resolved.chunk_rows, resolved.dtype) == (64, "float64") and attack.chunk_rows is None
    assert hash(rows) == hash(RowSettings(bases=("a.npy",)))
