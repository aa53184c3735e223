"""Checkpoint readers: every release layout, and clear messages for broken files."""

from __future__ import annotations

import json

import pytest
import torch

from flashportrait.weights import (
    CheckpointError,
    InMemorySource,
    MergedSource,
    RenamedSource,
    SafetensorsFile,
    add_prefix,
    open_checkpoint,
    open_sharded_safetensors,
    open_torch_pickle,
    save_safetensors,
    strip_prefix,
)

TENSORS = {
    "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "a.bias": torch.tensor([1.5, -2.0]),
    "b.weight": torch.ones(4, dtype=torch.bfloat16),
    "steps": torch.tensor([3], dtype=torch.int64),
}


def assert_same(source, tensors=TENSORS):
    assert set(source) == set(tensors)
    for key, value in tensors.items():
        assert source.info(key).shape == tuple(value.shape)
        assert source.info(key).dtype == value.dtype
        assert torch.equal(source[key], value)


def write_shards(folder, groups, *, index=True, weight_map=None):
    folder.mkdir(parents=True, exist_ok=True)
    computed = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_safetensors({k: TENSORS[k] for k in keys}, folder / name)
        computed.update(dict.fromkeys(keys, name))
    if index:
        body = {
            "metadata": {"total_size": 0},
            "weight_map": weight_map if weight_map is not None else computed,
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(body))
    return folder


# ---------------------------------------------------------------- single files


def test_safetensors_file_is_lazy_and_typed(tmp_path):
    save_safetensors(TENSORS, tmp_path / "w.safetensors", metadata={"format": "pt"})
    source = open_checkpoint(tmp_path / "w.safetensors")
    assert isinstance(source, SafetensorsFile) and source.metadata == {"format": "pt"}
    assert_same(source)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "state_dict"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_pickle_with_or_without_state_dict(tmp_path, wrapped, legacy):
    path = tmp_path / "transformer.pt"
    obj = {"state_dict": TENSORS, "epoch": 3} if wrapped else TENSORS
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert_same(open_checkpoint(path))


def test_wrapper_kept_when_asked_is_a_clear_error(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": TENSORS, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"not tensors: state_dict, epoch"):
        open_torch_pickle(path, unwrap_state_dict=False)


def test_format_comes_from_the_content_not_the_name(tmp_path):
    save_safetensors(TENSORS, tmp_path / "really_safetensors.pt")
    torch.save(TENSORS, tmp_path / "really_pickle.safetensors")
    assert isinstance(open_checkpoint(tmp_path / "really_safetensors.pt"), SafetensorsFile)
    assert_same(open_checkpoint(tmp_path / "really_pickle.safetensors"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.pt", b"PK\x03\x04 truncated zip", "not a readable torch checkpoint"),
        ("bad.pth", b"\x80\x02 garbage pickle", "not a readable torch checkpoint"),
        ("bad.safetensors", b"\x04\x00\x00\x00\x00\x00\x00\x00{ba}  ", "not a readable safetensors file"),
        ("short.safetensors", b"\xff\x00\x00\x00\x00\x00\x00\x00{", "neither a safetensors file"),
        ("bad.bin", b"hello", "neither a safetensors file nor a torch checkpoint"),
        ("empty.pt", b"", "neither a safetensors file nor a torch checkpoint"),
    ],
)
def test_corrupt_file_message_names_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    save_safetensors(TENSORS, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 8])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        open_checkpoint(tmp_path / "cut.safetensors")


def test_pickle_of_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"weights": TENSORS["a.bias"], "callback": print}, path)
    with pytest.raises(CheckpointError, match=r"code\.pt"):
        open_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_torch_pickle(tmp_path / "nothing.pt")


# ---------------------------------------------------------------- shards


def test_sharded_with_index_folder_or_index_path(tmp_path):
    folder = write_shards(tmp_path / "m", [["a.weight", "steps"], ["a.bias", "b.weight"]])
    assert_same(open_checkpoint(folder))
    assert_same(open_checkpoint(folder / "model.safetensors.index.json"))


def test_folder_without_index_merges_every_shard(tmp_path):
    folder = write_shards(tmp_path / "m", [["a.weight", "steps"], ["a.bias", "b.weight"]], index=False)
    assert_same(open_checkpoint(folder))


def test_index_naming_a_missing_shard(tmp_path):
    folder = write_shards(tmp_path / "m", [["a.weight", "steps"], ["a.bias", "b.weight"]])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        open_checkpoint(folder)


def test_index_pointing_at_the_wrong_shard(tmp_path):
    wrong = {
        "a.weight": "model-00002-of-00002.safetensors",
        "steps": "model-00001-of-00002.safetensors",
        "a.bias": "model-00002-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
    }
    folder = write_shards(tmp_path / "m", [["a.weight", "steps"], ["a.bias", "b.weight"]], weight_map=wrong)
    with pytest.raises(CheckpointError, match=r"'a\.weight' in model-00002-of-00002\.safetensors"):
        open_checkpoint(folder)


def test_index_listing_a_key_no_shard_holds(tmp_path):
    groups = [["a.weight", "steps"], ["a.bias", "b.weight"]]
    weight_map = {k: f"model-0000{i + 1}-of-00002.safetensors" for i, g in enumerate(groups) for k in g}
    weight_map["ghost.weight"] = "model-00001-of-00002.safetensors"
    folder = write_shards(tmp_path / "m", groups, weight_map=weight_map)
    with pytest.raises(CheckpointError, match=r"ghost\.weight"):
        open_checkpoint(folder)


def test_shard_keys_missing_from_the_index(tmp_path):
    groups = [["a.weight", "steps"], ["a.bias", "b.weight"]]
    weight_map = {k: f"model-0000{i + 1}-of-00002.safetensors" for i, g in enumerate(groups) for k in g}
    del weight_map["steps"]
    folder = write_shards(tmp_path / "m", groups, weight_map=weight_map)
    with pytest.raises(CheckpointError, match=r"index does not list: steps"):
        open_checkpoint(folder)


def test_index_without_weight_map(tmp_path):
    folder = write_shards(tmp_path / "m", [["a.weight", "steps", "a.bias", "b.weight"]])
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        open_sharded_safetensors(folder)


def test_two_indexes_in_one_folder(tmp_path):
    folder = write_shards(tmp_path / "m", [["a.weight", "steps", "a.bias", "b.weight"]])
    (folder / "other.safetensors.index.json").write_text(
        (folder / "model.safetensors.index.json").read_text()
    )
    with pytest.raises(CheckpointError, match="several shard indexes"):
        open_checkpoint(folder)


def test_duplicate_key_across_shards_without_index(tmp_path):
    folder = tmp_path / "m"
    save_safetensors({"a.bias": TENSORS["a.bias"]}, folder / "one.safetensors")
    save_safetensors({"a.bias": TENSORS["a.bias"]}, folder / "two.safetensors")
    with pytest.raises(CheckpointError, match=r"'a\.bias' appears in both"):
        open_checkpoint(folder)


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no \\*\\.safetensors"):
        open_checkpoint(tmp_path)


# ---------------------------------------------------------------- views


def test_prefix_views_and_override_merge():
    base = InMemorySource(TENSORS, description="base")
    prefixed = add_prefix(base, "model.")
    assert set(prefixed) == {f"model.{k}" for k in TENSORS}
    assert_same(strip_prefix(prefixed, "model."))
    mixed = InMemorySource({"model.x": torch.zeros(1), "other.y": torch.ones(1)})
    assert set(strip_prefix(mixed, "model.")) == {"x"}
    assert set(strip_prefix(mixed, "model.", keep_others=True)) == {"x", "other.y"}
    top = InMemorySource({"a.bias": torch.tensor([9.0, 9.0])}, description="top")
    merged = MergedSource([base, top], override=True)
    assert torch.equal(merged["a.bias"], torch.tensor([9.0, 9.0])) and len(merged) == len(TENSORS)
    with pytest.raises(CheckpointError, match="appears in both"):
        MergedSource([base, top], override=False)
    with pytest.raises(CheckpointError, match="both map to"):
        RenamedSource(base, lambda k: "same")
    with pytest.raises(CheckpointError, match="not tensors"):
        InMemorySource({"a": 1})
