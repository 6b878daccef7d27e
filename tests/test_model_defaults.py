"""Per-model sampling defaults: read from the model's directory, applied only to the fields a
request did not set itself, bad entries dropped, changes picked up."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from llmlb.node.api import fields, openai_request
from llmlb.node.inference import model_defaults
from llmlb.node.inference.model_defaults import DEFAULTS_FILENAME, NO_DEFAULTS, parse
from llmlb.node.inference.sampling import SamplingParams

SMOL = {"temperature": 0.2, "top_p": 0.9, "repeat_penalty": 1.1}


def test_unset_fields_take_the_models_defaults_and_set_ones_win(tmp_path: Path) -> None:
    model_defaults.write(tmp_path, SMOL)
    plain = model_defaults.apply(SamplingParams(), tmp_path)
    assert (plain.temperature, plain.top_p, plain.repeat_penalty) == (0.2, 0.9, 1.1)
    assert (plain.top_k, plain.min_p) == (SamplingParams().top_k, SamplingParams().min_p)

    asked = SamplingParams(
        temperature=0.0,
        repeat_penalty=1.3,
        seed=7,
        logit_bias={5: 1.0},
        given=frozenset({"temperature", "repeat_penalty"}),
    )
    applied = model_defaults.apply(asked, tmp_path)
    assert (applied.temperature, applied.repeat_penalty, applied.top_p) == (0.0, 1.3, 0.9)
    assert applied.seed == 7 and applied.logit_bias == {5: 1.0}


def test_a_request_sending_the_neutral_value_keeps_it(tmp_path: Path) -> None:
    """``repeat_penalty: 1.0`` or ``temperature: 1.0`` sent by a client are its choice, not
    a field left unset: the model's defaults fill in only what the body does not carry."""
    model_defaults.write(tmp_path, SMOL)
    body = {"temperature": 1.0, "repeat_penalty": 1.0}
    chat = model_defaults.apply(openai_request.sampling(body), tmp_path)
    assert (chat.temperature, chat.repeat_penalty, chat.top_p) == (1.0, 1.0, 0.9)
    unset = model_defaults.apply(openai_request.sampling({"temperature": None}), tmp_path)
    assert (unset.temperature, unset.repeat_penalty) == (0.2, 1.1)
    # Responses and Messages: what they carry wins the same way.
    asked = fields.generation(temperature=1.0, top_p=None, max_tokens=None, stream=False)
    applied = model_defaults.apply(asked.sampling, tmp_path)
    assert (applied.temperature, applied.top_p, applied.repeat_penalty) == (1.0, 0.9, 1.1)


def test_no_file_changes_nothing(tmp_path: Path) -> None:
    params = SamplingParams(temperature=0.5)
    assert model_defaults.apply(params, tmp_path) is params
    assert model_defaults.for_model_dir(tmp_path / "absent") is NO_DEFAULTS


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    model_defaults.write(tmp_path, {"repeat_penalty": 1.1})
    assert model_defaults.apply(SamplingParams(), tmp_path).repeat_penalty == 1.1
    path = tmp_path / DEFAULTS_FILENAME
    path.write_bytes(orjson.dumps({"repeat_penalty": 1.2}))
    later = path.stat().st_mtime_ns + 1_000_000
    os.utime(path, ns=(later, later))
    assert model_defaults.apply(SamplingParams(), tmp_path).repeat_penalty == 1.2
    path.unlink()
    assert model_defaults.apply(SamplingParams(), tmp_path).repeat_penalty == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 3.0},
        {"top_p": -0.1},
        {"repeat_penalty": "1.1"},
        {"repeat_penalty": True},
        {"top_k": 2.5},
        {"seed": 4},
        {"frequency_penalty": float("nan")},
    ],
)
def test_bad_fields_are_dropped_one_by_one(bad: dict) -> None:
    assert parse({**bad, "min_p": 0.1}).values == {"min_p": 0.1}
    with pytest.raises(ValueError):
        model_defaults.write(Path("/nonexistent"), bad)


def test_unreadable_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / DEFAULTS_FILENAME).write_text("{not json")
    assert model_defaults.for_model_dir(tmp_path) is NO_DEFAULTS
    (tmp_path / DEFAULTS_FILENAME).write_text("[1, 2]")
    os.utime(tmp_path / DEFAULTS_FILENAME, ns=(1, 1))
    assert model_defaults.for_model_dir(tmp_path) is NO_DEFAULTS


def test_write_keeps_an_unchanged_file(tmp_path: Path) -> None:
    model_defaults.write(tmp_path, SMOL)
    path = tmp_path / DEFAULTS_FILENAME
    os.utime(path, ns=(1, 1))
    model_defaults.write(tmp_path, SMOL)
    assert path.stat().st_mtime_ns == 1
    assert orjson.loads(path.read_bytes()) == SMOL
