"""Bad model folders give typed errors that name the file, field or tensor."""
from __future__ import annotations

import json
import shutil

import pytest

import slmkit
from slmkit.errors import ConfigError, ModelFileError, UnsupportedModelError, WeightError


@pytest.fixture
def folder(phi3_folders, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(phi3_folders("gqa"), dst)
    return dst


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFileError, match="no-such"):
        slmkit.load(tmp_path / "no-such")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ModelFileError, match="config.json"):
        slmkit.load(folder)


def test_corrupt_config(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json.*JSON"):
        slmkit.load(folder)


def test_unknown_model_type(folder):
    edit_config(folder, model_type="mamba9")
    with pytest.raises(UnsupportedModelError, match="mamba9"):
        slmkit.load(folder)


def test_missing_required_field(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        slmkit.load(folder)
    assert e.value.field == "hidden_size"


def test_invalid_field(folder):
    edit_config(folder, num_key_value_heads=3)
    with pytest.raises(ConfigError) as e:
        slmkit.load(folder)
    assert e.value.field == "num_key_value_heads"


def test_bad_longrope_factor_length(folder):
    edit_config(folder, rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
                original_max_position_embeddings=32)
    with pytest.raises(ConfigError, match="short_factor"):
        slmkit.load(folder)


def test_shape_mismatch_names_tensor(folder):
    edit_config(folder, intermediate_size=128)
    with pytest.raises(WeightError) as e:
        slmkit.load(folder)
    assert "gate_up_proj" in e.value.tensor and "shape" in str(e.value)


def test_missing_tensor(folder):
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.norm.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(WeightError) as e:
        slmkit.load(folder)
    assert e.value.tensor == "model.norm.weight"


def test_truncated_safetensors(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        slmkit.load(folder)


def test_garbage_safetensors_header(folder):
    (folder / "model.safetensors").write_bytes(b"\xff" * 8 + b"garbage")
    with pytest.raises(ModelFileError, match="model.safetensors"):
        slmkit.load(folder)


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="safetensors"):
        slmkit.load(folder)


def test_sharded_index_with_missing_shard(folder):
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelFileError, match="00002"):
        slmkit.load(folder)


def test_index_path_traversal_rejected(folder):
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../../etc/passwd"}}))
    with pytest.raises(ModelFileError, match="plain file name"):
        slmkit.load(folder)


def test_sharded_folder_loads_like_single_file(folder, tmp_path):
    """A checkpoint split over two shards plus an index loads to the same logits."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "model.safetensors").unlink()
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / fname), metadata={"format": "pt"})
    wmap = {k: f for f, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    ids = [5, 6, 7, 8]
    a = slmkit.load(folder, dtype="float32").logits(ids)
    b = slmkit.load(sharded, dtype="float32").logits(ids)
    assert (a - b).abs().max().item() == 0
