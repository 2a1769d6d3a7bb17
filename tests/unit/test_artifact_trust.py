"""A damaged router folder is always caught: checksums, strict types, shapes, files inside the folder."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from routehead_rag import RouteHeadReranker
from routehead_rag.router import artifact
from routehead_rag.router.artifact import (
    RouterArtifactError,
    RouterArtifactWarning,
    load_artifact,
    read_artifact_config,
)
from routehead_rag.strategy import AutoHeads, RoutedHeads
from tests.unit.test_hostile_inputs import tiny_router  # noqa: F401  (the fixture)


@pytest.fixture
def copy(tiny_router, tmp_path):  # noqa: F811
    backbone, folder = tiny_router
    target = tmp_path / "router"
    shutil.copytree(folder, target)
    return backbone, target


def edit_config(folder, change):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_an_intact_copy_loads(copy):
    backbone, folder = copy
    load_artifact(folder, backbone.fingerprint())


def test_flipped_bytes_of_the_same_size_are_caught(copy):
    _, folder = copy
    weights = folder / "router.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor: the file still parses
    weights.write_bytes(bytes(data))
    load_file(str(weights))  # proof that it parses
    with pytest.raises(RouterArtifactError, match="is not the file config.json records"):
        load_artifact(folder)


@pytest.mark.parametrize("fill", [float("nan"), 0.0])
def test_nan_or_zero_weights_are_refused_even_with_a_matching_checksum(copy, fill):
    _, folder = copy
    weights = folder / "router.safetensors"
    state = {k: torch.full_like(v, fill) for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    data = weights.read_bytes()

    def record(config):
        import hashlib

        config["files"]["router.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    edit_config(folder, record)
    with pytest.raises(RouterArtifactError, match="not finite|every weight is zero"):
        load_artifact(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["selection"].update(k=True), "selection.k"),
        (lambda c: c["selection"].update(k="8"), "selection.k"),
        (lambda c: c["router"].update(num_layers="2"), "router.num_layers"),
        (lambda c: c["scoring"].update(subtract_content_free="no"), "scoring.subtract_content_free"),
        (lambda c: c.update(format=1.0), "no integer 'format'"),
        (lambda c: c.update(format=True), "no integer 'format'"),
        (lambda c: c.pop("format"), "no integer 'format'"),
        (lambda c: c.update(format=1), "format 1.*fit the router again"),
        (lambda c: c.update(format=99), "format 99.*upgrade routehead-rag"),
        (lambda c: c["router"].update(num_layers=1, num_heads=8), "router is 1 x 8 .* fingerprint says 2 x 4"),
        (lambda c: c["backbone_fingerprint"].update(num_layers=1, num_heads=8), "router is 2 x 4 .* fingerprint says 1 x 8"),
        (lambda c: c.update(static_heads=["L7.H0"]), "L7.H0 does not exist"),
        (lambda c: c.update(unknown_field=1), "unknown_field"),
        (lambda c: c["files"].clear(), "records no checksum"),
    ],
)
def test_strict_types_and_a_self_consistent_config(copy, change, message):
    _, folder = copy
    edit_config(folder, change)
    with pytest.raises(RouterArtifactError, match=message):
        load_artifact(folder)


def test_a_router_of_another_grid_is_refused_before_any_model_loads(copy):
    """The same number of heads in another layout (8 x 1 instead of 2 x 4) would remap every head."""
    backbone, folder = copy

    def relabel(config):
        config["router"].update(num_layers=8, num_heads=1)
        config["backbone_fingerprint"].update(num_layers=8, num_heads=1)
        config["static_heads"] = []

    edit_config(folder, relabel)
    with pytest.raises(RouterArtifactError, match="fitted on a 8 x 1 .* has 2 x 4"):
        RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=folder)


@pytest.mark.parametrize("name", ["router.safetensors", "config.json"])
def test_a_file_symlinked_out_of_the_folder_is_refused(copy, tmp_path, name):
    _, folder = copy
    outside = tmp_path / f"elsewhere-{name}"
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)
    with pytest.raises(RouterArtifactError, match="symbolic link"):
        load_artifact(folder)


def test_a_missing_model_card_is_only_a_warning(copy):
    _, folder = copy
    (folder / "README.md").unlink()
    with pytest.warns(RouterArtifactWarning, match="no README.md"):
        load_artifact(folder)
    (folder / "config.json").unlink()
    with pytest.raises(RouterArtifactError, match="no config.json"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_artifact(folder)


def test_a_damaged_shipped_router_is_an_error_that_says_how_to_repair(copy, tmp_path, monkeypatch):
    backbone, folder = copy
    shipped = tmp_path / "routers"
    shutil.copytree(folder, shipped / "tiny")
    monkeypatch.setattr(artifact, "SHIPPED_ROUTERS", shipped)
    assert isinstance(AutoHeads().resolve(backbone), RoutedHeads)
    (shipped / "tiny" / "config.json").unlink()  # a broken installation
    with pytest.raises(RouterArtifactError, match="shipped in the package.*damaged.*force-reinstall"):
        AutoHeads().resolve(backbone)
    reranker = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer)  # heads="auto"
    with pytest.raises(RouterArtifactError, match="repair the installation"):
        reranker.rank("sea", ["a passage"])


def test_a_shipped_router_with_flipped_weights_is_an_error_too(copy, tmp_path, monkeypatch):
    backbone, folder = copy
    shipped = tmp_path / "routers"
    shutil.copytree(folder, shipped / "tiny")
    monkeypatch.setattr(artifact, "SHIPPED_ROUTERS", shipped)
    weights = shipped / "tiny" / "router.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RouterArtifactError, match="repair the installation"):
        AutoHeads().resolve(backbone)


def test_the_shipped_router_is_intact():
    folder = artifact.SHIPPED_ROUTERS / "smollm2-135m"
    config = read_artifact_config(folder)
    load_artifact(folder, config.backbone_fingerprint.model_dump())
