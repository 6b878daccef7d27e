"""Artifact selection and ``fetch_repo_manifest`` against the hub stand-in."""

from __future__ import annotations

import hashlib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from llmlb.errors import AmbiguousArtifacts, HubRepoNotFound, HubUnavailable, NoSupportedArtifacts
from llmlb.hub.artifacts import RemoteFile, quantization_from_name, select_artifacts
from llmlb.hub.repo import RepoManifest, fetch_repo_manifest, parse_repo_ref
from llmlb.model_storage import InvalidModelId

from tests.hub_fixtures import HubUrl, make_repo, start_hub
from tests.procs import free_port, spawner

CONFIG = b'{"architectures": ["LlamaForCausalLM"]}'
TOKENIZER = b'{"version": "1.0"}'
INDEX = orjson.dumps(
    {
        "metadata": {"total_size": 24},
        "weight_map": {
            "a": "model-00001-of-00003.safetensors",
            "b": "model-00002-of-00003.safetensors",
            "c": "model-00003-of-00003.safetensors",
            "d": "model-00001-of-00003.safetensors",
        },
    }
)


def _files(*names: str) -> list[RemoteFile]:
    return [RemoteFile(n, 10, "0" * 64) for n in names]


def _index_reader(path: str) -> object:
    assert path == "model.safetensors.index.json"
    return orjson.loads(INDEX)


# ---- pure selection rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("gemma-3-270m-it-Q4_K_M.gguf", "Q4_K_M"),
        ("model-q8_0.gguf", "Q8_0"),
        ("Llama-3-8B.IQ3_XXS.gguf", "IQ3_XXS"),
        ("x-f16.gguf", "F16"),
        ("x-BF16-00001-of-00002.gguf", "BF16"),
        ("Q5_K_S/model-00001-of-00002.gguf", "Q5_K_S"),
        ("UD-Q4_K_XL.gguf", "Q4_K_XL"),
        ("plain.gguf", None),
    ],
)
def test_quantization_from_name(name: str, quant: str | None) -> None:
    assert quantization_from_name(name) == quant


def test_single_gguf_with_extras_ignored() -> None:
    sel = select_artifacts(_files("README.md", "m-Q4_K_M.gguf", "mmproj-f16.gguf"))
    assert (sel.format, sel.primary, sel.required, sel.quantization) == (
        "gguf",
        "m-Q4_K_M.gguf",
        ["m-Q4_K_M.gguf"],
        "Q4_K_M",
    )


def test_split_gguf_takes_every_split() -> None:
    names = [f"big-Q8_0-0000{i}-of-00003.gguf" for i in (2, 1, 3)]
    sel = select_artifacts(_files(*names))
    assert sel.required == sorted(names) and sel.primary.endswith("00001-of-00003.gguf")
    # An incomplete split set is not a model.
    with pytest.raises(NoSupportedArtifacts):
        select_artifacts(_files(names[0], names[1]))


def test_several_gguf_are_ambiguous_until_hinted() -> None:
    files = _files(
        "m-Q4_K_M.gguf", "m-Q8_0.gguf", "s-F16-00001-of-00002.gguf", "s-F16-00002-of-00002.gguf"
    )
    with pytest.raises(AmbiguousArtifacts) as info:
        select_artifacts(files)
    assert info.value.choices == ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "s-F16-00001-of-00002.gguf"]
    assert select_artifacts(files, "m-Q8_0.gguf").required == ["m-Q8_0.gguf"]
    assert select_artifacts(files, "q4_k_m").primary == "m-Q4_K_M.gguf"  # a quant tag works too
    split = select_artifacts(files, "s-F16-00002-of-00002.gguf")
    assert split.required == ["s-F16-00001-of-00002.gguf", "s-F16-00002-of-00002.gguf"]
    with pytest.raises(NoSupportedArtifacts):
        select_artifacts(files, "other.gguf")


def test_safetensors_single_and_sharded() -> None:
    single = select_artifacts(
        _files(
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "generation_config.json",
            "README.md",
        )
    )
    assert single.format == "safetensors" and single.quantization is None
    assert single.required == [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "generation_config.json",
    ]
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    sharded = select_artifacts(
        _files(
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors.index.json",
            *shards,
        ),
        read_index=_index_reader,
    )
    assert sharded.primary == "model.safetensors.index.json"
    assert sharded.required == [
        "model.safetensors.index.json",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        *shards,
    ]
    with pytest.raises(NoSupportedArtifacts, match="model-00003-of-00003"):
        select_artifacts(
            _files("config.json", "tokenizer.json", "model.safetensors.index.json", *shards[:2]),
            read_index=_index_reader,
        )
    with pytest.raises(NoSupportedArtifacts):  # no tokenizer.json: not a usable model
        select_artifacts(_files("config.json", "model.safetensors"))


def test_both_formats_need_a_hint_and_shard_hint_means_index() -> None:
    files = _files(
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "m-Q4_0.gguf",
    )
    with pytest.raises(AmbiguousArtifacts) as info:
        select_artifacts(files, read_index=_index_reader)
    assert info.value.choices == ["m-Q4_0.gguf", "model.safetensors.index.json"]
    sel = select_artifacts(files, "model-00001-of-00003.safetensors", read_index=_index_reader)
    assert sel.format == "safetensors" and sel.primary == "model.safetensors.index.json"
    assert select_artifacts(files, "m-Q4_0.gguf", read_index=_index_reader).format == "gguf"


def test_metal_file_is_optional_and_nothing_usable() -> None:
    sel = select_artifacts(_files("m.gguf", "model.metal.bin"))
    assert sel.required == ["m.gguf"] and sel.optional == [("model.metal.bin", ["metal"])]
    with pytest.raises(NoSupportedArtifacts):
        select_artifacts(_files("README.md", "pytorch_model.bin"))


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("Org/Name", ("Org/Name", None, None)),
        ("https://huggingface.co/Org/Name", ("Org/Name", None, None)),
        ("https://huggingface.co/Org/Name/tree/dev", ("Org/Name", "dev", None)),
        (
            "https://huggingface.co/Org/Name/blob/main/a-Q8_0.gguf",
            ("Org/Name", "main", "a-Q8_0.gguf"),
        ),
        ("huggingface.co/Org/Name/resolve/abc/sub/x.gguf", ("Org/Name", "abc", "sub/x.gguf")),
        ("http://127.0.0.1:9/Org/Name", ("Org/Name", None, None)),
    ],
)
def test_parse_repo_ref(ref: str, expected: tuple) -> None:
    assert parse_repo_ref(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "Name",
        "a/b/c",
        "Org/../x",
        "Org/na--me",
        "ftp://h/O/N",
        "https://huggingface.co/Org",
        "Org/Name/",
    ],
)
def test_parse_repo_ref_rejects_malformed(ref: str) -> None:
    with pytest.raises(InvalidModelId):
        parse_repo_ref(ref)


# ---- fetch_repo_manifest against the stand-in --------------------------------------------------

GGUF_A = b"GGUF" + bytes(range(256)) * 40
GGUF_B = b"GGUF" + b"\x01" * 5000
SHARDS = {f"model-0000{i}-of-00003.safetensors": bytes([i]) * (100 * i) for i in (1, 2, 3)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubUrl]:
    root = tmp_path_factory.mktemp("hub-root")
    make_repo(
        root,
        "Org/One",
        {"one-Q4_K_M.gguf": GGUF_A, "README.md": b"# one", "model.metal.bin": b"metal"},
    )
    make_repo(root, "Org/Two", {"two-Q4_K_M.gguf": GGUF_A, "two-Q8_0.gguf": GGUF_B})
    make_repo(
        root,
        "Org/Sharded",
        {
            "config.json": CONFIG,
            "tokenizer.json": TOKENIZER,
            "model.safetensors.index.json": INDEX,
            **SHARDS,
        },
    )
    make_repo(root, "Org/Empty", {"README.md": b"nothing here"})
    spawn, stop_all = spawner(tmp_path_factory.mktemp("hub-log"))
    try:
        yield start_hub(spawn, root, "--log-requests", str(root / "requests.jsonl"))
    finally:
        stop_all()


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_manifest_for_single_gguf(hub: HubUrl) -> None:
    manifest = fetch_repo_manifest("Org/One", endpoint=hub)
    assert isinstance(manifest, RepoManifest)
    assert len(manifest.revision) == 40 and manifest.revision != "main"
    assert (manifest.repo, manifest.format, manifest.filename, manifest.quantization) == (
        "Org/One",
        "gguf",
        "one-Q4_K_M.gguf",
        "Q4_K_M",
    )
    primary, metal = manifest.files
    assert primary.to_dict() == {
        "filename": "one-Q4_K_M.gguf",
        "format": "gguf",
        "size_bytes": len(GGUF_A),
        "sha256": hashlib.sha256(GGUF_A).hexdigest(),
        "url": f"{hub}/Org/One/resolve/{manifest.revision}/one-Q4_K_M.gguf",
        "priority": 0,
        "optional": False,
        "backends": [],
    }
    assert (metal.filename, metal.optional, metal.backends, metal.priority) == (
        "model.metal.bin",
        True,
        ["metal"],
        1,
    )
    assert manifest.total_size_bytes == len(GGUF_A) + len(b"metal")
    assert manifest.chat_template is None
    assert _download(primary.url) == GGUF_A  # pinned URLs resolve on the hub
    assert orjson.loads(orjson.dumps(manifest.to_dict()))["files"][0]["priority"] == 0


def test_manifest_for_sharded_safetensors(hub: HubUrl) -> None:
    manifest = fetch_repo_manifest("https://huggingface.co/Org/Sharded", endpoint=hub)
    assert manifest.format == "safetensors" and manifest.quantization is None
    names = [f.filename for f in manifest.files]
    assert names == ["model.safetensors.index.json", "config.json", "tokenizer.json", *SHARDS]
    assert [f.priority for f in manifest.files] == list(range(len(names)))
    by_name = {f.filename: f for f in manifest.files}
    assert by_name["config.json"].sha256 is None  # small non-LFS file
    shard = by_name["model-00002-of-00003.safetensors"]
    assert shard.sha256 == hashlib.sha256(SHARDS[shard.filename]).hexdigest()
    assert shard.format == "safetensors" and by_name["config.json"].format == "json"
    hinted = fetch_repo_manifest(
        "Org/Sharded", filename="model-00001-of-00003.safetensors", endpoint=hub
    )
    assert hinted.filename == "model.safetensors.index.json"


def test_manifest_hints_and_ambiguity(hub: HubUrl) -> None:
    with pytest.raises(AmbiguousArtifacts) as info:
        fetch_repo_manifest("Org/Two", endpoint=hub)
    assert info.value.choices == ["two-Q4_K_M.gguf", "two-Q8_0.gguf"]
    chosen = fetch_repo_manifest("Org/Two", filename="two-Q8_0.gguf", endpoint=hub)
    assert (chosen.filename, chosen.quantization) == ("two-Q8_0.gguf", "Q8_0")
    from_url = fetch_repo_manifest(
        "https://huggingface.co/Org/Two/blob/main/two-Q8_0.gguf", endpoint=hub
    )
    assert from_url.files[0].sha256 == hashlib.sha256(GGUF_B).hexdigest()
    pinned = fetch_repo_manifest(
        "Org/Two", revision=chosen.revision, filename="two-Q8_0.gguf", endpoint=hub
    )
    assert pinned.revision == chosen.revision
    with pytest.raises(NoSupportedArtifacts):
        fetch_repo_manifest("Org/Empty", endpoint=hub)


def test_manifest_errors(hub: HubUrl) -> None:
    with pytest.raises(HubRepoNotFound):
        fetch_repo_manifest("Org/Missing", endpoint=hub)
    with pytest.raises(HubRepoNotFound):
        fetch_repo_manifest("Org/One", revision="no-such-branch", endpoint=hub)
    with pytest.raises(InvalidModelId):
        fetch_repo_manifest("not a repo", endpoint=hub)


def test_token_is_sent_only_when_given(hub: HubUrl, monkeypatch: pytest.MonkeyPatch) -> None:
    log = hub.root / "requests.jsonl"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    before = len(log.read_bytes().splitlines())
    fetch_repo_manifest("Org/Sharded", endpoint=hub)
    fetch_repo_manifest("Org/Sharded", endpoint=hub, token="hf_explicit")
    entries = [orjson.loads(line) for line in log.read_bytes().splitlines()[before:]]
    assert [e["authorization"] for e in entries if e["path"].startswith("/api/")] == [False, True]
    # The index fetch (a resolve GET) follows the same rule.
    assert [e["authorization"] for e in entries if "/resolve/" in e["path"]] == [False, True]
    assert b"hf_explicit" not in log.read_bytes() and b"hf_from_env" not in log.read_bytes()


def test_hub_5xx_is_unavailable(spawn, tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_repo(root, "Org/One", {"one.gguf": GGUF_A})
    hub = start_hub(spawn, root, "--fault", "status:code=503,times=1,route=api")
    with pytest.raises(HubUnavailable):
        fetch_repo_manifest("Org/One", endpoint=hub)
    assert fetch_repo_manifest("Org/One", endpoint=hub).filename == "one.gguf"


def test_hub_down_is_unavailable() -> None:
    with pytest.raises(HubUnavailable):
        fetch_repo_manifest("Org/One", endpoint=f"http://127.0.0.1:{free_port()}")
