"""Options validated once per distinct set of values are shared; every other rule stays."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import gradcheck_svc as gcs
from gradcheck_svc.errors import InvalidOptionError
from gradcheck_svc.options import CheckOptions, explicit_options, resolve_options


def test_equal_options_resolve_to_one_frozen_value() -> None:
    first = resolve_options(mode="full", error_bars=2.5)
    again = resolve_options(error_bars=2.5, mode="full")
    assert first is again
    assert first == CheckOptions(mode="full", error_bars=2.5)
    assert resolve_options() is resolve_options()
    with pytest.raises(ValidationError):  # frozen: a shared value cannot be changed by one caller
        first.error_bars = 3.0  # type: ignore[misc]


def test_new_option_sets_keep_being_kept_after_many_others() -> None:
    for seed in range(200):  # more distinct sets than are kept
        resolve_options(seed=seed, mode="fast")
    assert resolve_options(seed=1000, mode="fast") is resolve_options(mode="fast", seed=1000)


def test_values_of_another_type_are_validated_on_their_own() -> None:
    assert resolve_options(max_worst=3).max_worst == 3
    with pytest.raises(InvalidOptionError):
        resolve_options(max_worst=3.5)
    with pytest.raises(InvalidOptionError):
        resolve_options(max_worst=[3])  # unhashable: validated (and refused) without the cache
    with pytest.raises(InvalidOptionError):
        resolve_options(no_such_option=1)


def test_explicit_options_lists_what_differs_from_the_defaults_in_a_new_dict() -> None:
    options = resolve_options(mode="auto", kinks="fail")
    listed = explicit_options(options)
    assert listed == {"kinks": "fail"}
    listed["eps"] = 1.0
    assert explicit_options(options) == {"kinks": "fail"}
    assert explicit_options(resolve_options()) == {}


def test_a_report_lists_the_options_set() -> None:
    report = gcs.check(lambda x: x**2, torch.tensor(9.0, dtype=torch.float64), error_bars=3, kinks="fail")
    assert report.ok
    assert report.options["error_bars"] == 3.0 and report.options["kinks"] == "fail"
    assert "mode" not in report.options
