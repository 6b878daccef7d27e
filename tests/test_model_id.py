"""Model id rules: normalisation, rejection of bad ids, ':QUANT' suffixes, path containment."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmlb import _model_storage as native
from llmlb.model_storage import InvalidModelId, ModelStorage, normalize_model_id, split_quant

ALLOWED = set(string.ascii_lowercase + string.digits + "._-/:")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("gpt-oss-20b", "gpt-oss-20b"),
        ("OpenAI/GPT-OSS-20B", "openai/gpt-oss-20b"),
        ("a/b/c", "a/b/c"),
        ("llama-3.2-1b:Q4_K_M", "llama-3.2-1b:q4_k_m"),
        ("org/model.v1_final:iq2_xxs", "org/model.v1_final:iq2_xxs"),
        ("a...", "a..."),
        ("a.b/c.", "a.b/c."),
        ("a" * 256, "a" * 256),
    ],
)
def test_valid_ids_normalise_to_lowercase(raw: str, expected: str) -> None:
    assert normalize_model_id(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty id"),
        ("/abs", "leading '/'"),
        ("trailing/", "trailing '/'"),
        ("a//b", "empty path segment"),
        ("a/./b", "segment '.'"),
        ("..", "segment '..'"),
        ("a/../b", "segment '..'"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("a b", "space"),
        ("a\tb", "control character"),
        ("caf\u00e9", "non-ASCII"),
        ("a+b", "character '+'"),
        ("a" * 257, "longer than 256"),
        ("a:b:c", "more than one ':'"),
        (":q4", "nothing before ':'"),
        ("model:", "empty quantisation"),
        ("model:q4/k", "in the quantisation"),
        ("../x:q4", "segment '..'"),
        # the store's own dot-directories can never be named by an id
        (".staging/x", "segment '.staging' starts with '.'"),
        ("org/.hidden", "segment '.hidden' starts with '.'"),
        ("...a", "starts with '.'"),
        (".locks/m:q4", "starts with '.'"),
    ],
)
def test_invalid_ids_raise_with_the_rule_named(raw: str, reason: str) -> None:
    with pytest.raises(InvalidModelId) as info:
        normalize_model_id(raw)
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)


def test_whitespace_is_rejected_not_stripped() -> None:
    for raw in (" model", "model ", "model\n"):
        with pytest.raises(InvalidModelId):
            normalize_model_id(raw)


def test_split_quant() -> None:
    assert split_quant("Llama-3.2-1B:Q4_K_M") == ("llama-3.2-1b", "q4_k_m")
    assert split_quant("org/name") == ("org/name", None)
    with pytest.raises(InvalidModelId):
        split_quant("a::b")


@pytest.mark.parametrize(
    ("quant", "file_name", "matches"),
    [
        ("q4_k_m", "Llama-3.2-1B-Instruct-Q4_K_M.gguf", True),
        ("Q4_K_M", "model.q4_k_m.gguf", True),
        ("q4_k_m", "model-Q4_K_M-00001-of-00002.gguf", True),
        ("q4_k", "model-Q4_K_M.gguf", False),
        ("q8_0", "model-Q4_K_M.gguf", False),
        ("k_m", "model-Q4_K_M.gguf", True),  # '_' before counts as a boundary
        ("4_k_m", "model-Q4_K_M.gguf", False),
        ("f16", "model-bf16.gguf", False),
    ],
)
def test_quant_token_matches_file_names_case_insensitively(
    quant: str, file_name: str, matches: bool
) -> None:
    assert native.quant_matches_file_name(quant, file_name) is matches


def test_model_dir_is_inside_models_dir(tmp_path: Path) -> None:
    store = ModelStorage(tmp_path)
    assert store.model_dir("OpenAI/GPT-OSS-20B") == tmp_path / "openai" / "gpt-oss-20b"
    assert store.model_dir("llama:Q4_K_M") == tmp_path / "llama"
    with pytest.raises(InvalidModelId):
        store.model_dir("../escape")


_PIECES = st.sampled_from(
    [
        "a",
        "B",
        "z9",
        "x.y",
        "-",
        "_",
        ".",
        "..",
        "",
        "...",
        "\\",
        "\x00",
        ":",
        "q4_K_M",
        "\u00e9",
        " ",
        "/",
        "%2e%2e",
        "~",
        "$HOME",
    ]
)
_CANDIDATES = st.one_of(
    st.lists(_PIECES, max_size=8).map("/".join),
    st.lists(_PIECES, max_size=8).map("".join),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.text(alphabet="aZ09._-/:\\", max_size=300),
)


@settings(max_examples=400, deadline=None)
@given(raw=_CANDIDATES)
def test_no_accepted_id_maps_outside_models_dir(
    tmp_path_factory: pytest.TempPathFactory, raw: str
) -> None:
    root = tmp_path_factory.getbasetemp() / "store"
    store = ModelStorage(root)
    try:
        model_id = normalize_model_id(raw)
    except InvalidModelId:
        with pytest.raises(InvalidModelId):
            store.model_dir(raw)
        return
    # Accepted: canonical, idempotent, within the character set and length limit.
    assert normalize_model_id(model_id) == model_id
    assert set(model_id) <= ALLOWED and len(model_id) <= 256
    assert model_id == raw.lower()
    directory = store.model_dir(raw)
    assert os.path.normpath(directory) == str(directory)  # no '.', '..' or '//' left
    relative = directory.relative_to(root)
    assert relative.parts and ".." not in relative.parts
    assert not any(part.startswith(".") for part in relative.parts)  # never a store dot-dir
    assert str(relative) == split_quant(raw)[0]


@settings(max_examples=200, deadline=None)
@given(
    segments=st.lists(
        st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=12),
        min_size=1,
        max_size=5,
    ),
    quant=st.none()
    | st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=8),
)
def test_well_formed_ids_are_accepted(segments: list[str], quant: str | None) -> None:
    if any(s.startswith(".") for s in segments):
        with pytest.raises(InvalidModelId, match="starts with '.'|segment '\\.\\.?'"):
            normalize_model_id("/".join(segments))
        return
    raw = "/".join(segments) + (f":{quant}" if quant else "")
    assert normalize_model_id(raw) == raw.lower()
    base, got_quant = split_quant(raw)
    assert base == "/".join(segments).lower()
    assert got_quant == (quant.lower() if quant else None)
