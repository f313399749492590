"""Selection settings from mm_processor_kwargs: defaults, validation, messages naming the key."""

from __future__ import annotations

import pytest

from qtsplus_vllm.options import OptionError, SelectionOptions, parse_options


def test_defaults_leave_the_model_unchanged():
    options = parse_options({})
    assert options == SelectionOptions()
    assert (options.select, options.rho_scale, options.rho_min, options.rho_max, options.max_tokens) == (
        True,
        1.0,
        0.0,
        1.0,
        None,
    )
    assert options.max_pixels == 360 * 420


def test_valid_values_are_taken():
    options = parse_options(
        {"qtsplus_select": False, "qtsplus_rho_scale": 0.5, "qtsplus_rho_min": 0.1, "qtsplus_rho_max": 0.3,
         "qtsplus_max_tokens": 64, "max_pixels": 200704, "min_pixels": 3136}
    )  # fmt: skip
    assert options == SelectionOptions(False, 0.5, 0.1, 0.3, 64, 200704, 3136)
    assert options.preprocess_config().max_pixels == 200704


def test_a_small_max_pixels_lowers_the_default_floor():
    options = parse_options({"max_pixels": 28 * 28 * 16})
    assert options.min_pixels == options.max_pixels == 28 * 28 * 16


@pytest.mark.parametrize(
    "kwargs, key, fragment",
    [
        ({"qtsplus_selekt": True}, "qtsplus_selekt", "unknown key"),
        ({"qtsplus_select": "no"}, "qtsplus_select", "true or false"),
        ({"qtsplus_select": 0}, "qtsplus_select", "true or false"),
        ({"qtsplus_rho_scale": 0}, "qtsplus_rho_scale", "(0.0, 100.0]"),
        ({"qtsplus_rho_scale": float("nan")}, "qtsplus_rho_scale", "number"),
        ({"qtsplus_rho_scale": "2"}, "qtsplus_rho_scale", "number"),
        ({"qtsplus_rho_min": -0.1}, "qtsplus_rho_min", "[0.0, 1.0]"),
        ({"qtsplus_rho_max": 1.5}, "qtsplus_rho_max", "(0.0, 1.0]"),
        ({"qtsplus_rho_min": 0.6, "qtsplus_rho_max": 0.4}, "qtsplus_rho_min", "above qtsplus_rho_max"),
        ({"qtsplus_max_tokens": 0}, "qtsplus_max_tokens", "[1, "),
        ({"qtsplus_max_tokens": 2.5}, "qtsplus_max_tokens", "integer"),
        ({"qtsplus_max_tokens": True}, "qtsplus_max_tokens", "integer"),
        ({"max_pixels": 10}, "max_pixels", "[784, "),
        ({"max_pixels": 100000, "min_pixels": 200000}, "min_pixels", "above max_pixels"),
    ],
)
def test_invalid_values_name_the_key(kwargs, key, fragment):
    with pytest.raises(OptionError) as err:
        parse_options(kwargs)
    assert err.value.key == key
    assert repr(key) in str(err.value) and fragment in str(err.value)
    assert isinstance(err.value, ValueError)  # vLLM answers ValueError with HTTP 400


def test_cache_key_differs_for_every_setting():
    keys = {SelectionOptions().cache_key(), SelectionOptions(select=False).cache_key(),
            SelectionOptions(rho_scale=2.0).cache_key(), SelectionOptions(max_tokens=5).cache_key(),
            SelectionOptions(max_pixels=1000).cache_key()}  # fmt: skip
    assert len(keys) == 5
    assert SelectionOptions(**dict(SelectionOptions(rho_min=0.2).cache_key())) == SelectionOptions(
        rho_min=0.2
    )
