"""A damaged router folder is always caught: checksums, strict types, shapes, files inside the folder."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from routehead_rag import RouteHeadReranker
from routehead_rag.engine.lora import LoraConfig
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


# -- second round: the LoRA's PEFT files, finite numbers everywhere ------------------------------

SHIPPED = artifact.SHIPPED_ROUTERS / "smollm2-135m"
SMOLLM2_LORA = LoraConfig(
    rank=8, alpha=16.0, scope="query", layers=tuple(range(23)),
    targets=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)
"""A LoRA of SmolLM2-135M's real projections: every projection of layers 0..22, rank 8 (the LoRA the router shipped
with before its refit). The shipped router may carry none, so the tests that need one build it
(:func:`with_smollm2_lora`); the layers and targets are checked against transformers' Llama there."""


def smollm2_config_json() -> dict:
    """The shipped ``config.json`` with :data:`SMOLLM2_LORA` as its ``lora`` (whether or not it ships one)."""
    raw = json.loads((SHIPPED / "config.json").read_text())
    raw["lora"] = SMOLLM2_LORA.model_dump(mode="json")
    return raw


def smollm2_model():
    """SmolLM2-135M with transformers' own Llama code on the meta device (shapes, no memory): hidden 576, MLP
    1536, 9 heads and 3 KV heads of 64, 30 layers (its published config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def smollm2_decoder():
    """SmolLM2-135M's decoder on the meta device (see :func:`smollm2_model`)."""
    return smollm2_model().model


def with_smollm2_lora(folder):
    """The shipped router (its weights, config and card) with a random non-zero :data:`SMOLLM2_LORA` added, written
    to ``folder`` by the package's own :func:`~routehead_rag.router.artifact.save_artifact` (PEFT's layout, the
    backbone fingerprint in the weights' metadata, every file recorded in config.json)."""
    from routehead_rag.engine.lora import Lora, decoder_path, lora_targets
    from routehead_rag.router.artifact import save_artifact

    model = smollm2_model()
    layers, targets = lora_targets(model.model, max(SMOLLM2_LORA.layers))
    assert (layers, targets) == (SMOLLM2_LORA.layers, SMOLLM2_LORA.targets)  # the real model's projections
    assert decoder_path(model, model.model) == SMOLLM2_LORA.decoder_path
    torch.manual_seed(5)
    lora = Lora.for_decoder(model.model, SMOLLM2_LORA)  # A [8, in], B [out, 8] of SmolLM2's projections
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.normal_(0.0, 0.02)  # a trained LoRA's stand-in: B = 0 would be the base model exactly
    router, config = load_artifact(SHIPPED)
    card = (SHIPPED / "README.md").read_text(encoding="utf-8")
    return save_artifact(folder, router, config.model_copy(update={"lora": SMOLLM2_LORA}), card, lora)


@pytest.fixture(scope="module")
def smollm2_lora_router(tmp_path_factory):
    """The shipped router with a LoRA of SmolLM2-135M's real shapes (:func:`with_smollm2_lora`), built once."""
    return with_smollm2_lora(tmp_path_factory.mktemp("smollm2") / "smollm2-135m")


def rerecord(folder, name):
    """Record ``name``'s current sha256 and size in ``config.json``, as anyone editing a router folder by hand would."""
    import hashlib

    data = (folder / name).read_bytes()
    edit_config(folder, lambda c: c["files"].update({name: {"sha256": hashlib.sha256(data).hexdigest(),
                                                             "bytes": len(data)}}))


@pytest.fixture(scope="module")
def lora_router(tmp_path_factory):
    """A tiny backbone and a router carrying a random non-zero LoRA (rank 4, every projection of both layers)."""
    from routehead_rag.engine.lora import Lora, LoraConfig, decoder_path, lora_targets
    from tests.tiny_models import tiny_backbone
    from tests.unit.test_hostile_inputs import handmade_router

    backbone = tiny_backbone("llama")
    layers, targets = lora_targets(backbone.decoder, backbone.num_layers - 1)
    config = LoraConfig(rank=4, alpha=8.0, layers=layers, targets=targets,
                        decoder_path=decoder_path(backbone.model, backbone.decoder))
    torch.manual_seed(3)
    lora = Lora.for_decoder(backbone.decoder, config)
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.normal_(0.0, 0.5)  # a trained LoRA's stand-in: B = 0 would be the base model exactly
    return backbone, handmade_router(backbone, tmp_path_factory.mktemp("lora") / "router", lora=lora)


@pytest.fixture(params=["tiny", "smollm2-shapes"])
def lora_copy(request, lora_router, smollm2_lora_router, tmp_path):
    """A copy of a router with a LoRA: the tiny one (ranked through), or the shipped one with a LoRA of SmolLM2-135M's
    real shapes (loaded, no model)."""
    source = lora_router[1] if request.param == "tiny" else smollm2_lora_router
    shutil.copytree(source, tmp_path / "router")
    return request.param, tmp_path / "router"


def resolve(kind, folder, lora_router):
    """What loading does: for the tiny router, a re-ranker that warms up (and would rank); for the shipped one
    with SmolLM2's LoRA, the artifact's own loaders (its backbone is not loaded in unit tests)."""
    if kind == "tiny":
        backbone = lora_router[0]
        reranker = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=folder)
        reranker.warm_up()
        return reranker.rank("tides", ["the moon pulls the sea", "stock prices fell"])
    config = read_artifact_config(folder)
    return artifact.load_lora(folder, config)


def edit_peft(change):
    def edit(folder):
        path = folder / "adapter_config.json"
        raw = json.loads(path.read_text())
        change(raw)
        path.write_text(json.dumps(raw))

    return edit


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,'), "not valid JSON"),
        (lambda f: (f / "adapter_config.json").write_text("[1, 2]"), "holds a JSON list"),
        (edit_peft(lambda c: c.update(peft_type="PREFIX_TUNING")), "peft_type is 'PREFIX_TUNING'"),
        (edit_peft(lambda c: c.update(r=c["r"] // 2)), r"r is \d, but config.json's lora.rank is \d"),
        (edit_peft(lambda c: c.update(r="8")), "r: Input should be a valid integer"),
        (edit_peft(lambda c: c.update(lora_alpha=1e6)), r"lora_alpha is 1000000.0, but config.json's lora.alpha is"),
        (edit_peft(lambda c: c.update(lora_alpha=float("inf"))), "lora_alpha: Input should be a finite number"),
        (edit_peft(lambda c: c.update(lora_alpha=float("nan"))), "lora_alpha: Input should be a finite number"),
        (edit_peft(lambda c: c["target_modules"].append("model.layers.0.self_attn.no_such_proj")),
         r"target_modules .* extra \['model.layers.0.self_attn.no_such_proj'\]"),
        (edit_peft(lambda c: c["target_modules"].pop()), r"target_modules .* missing \['model.layers"),
        (edit_peft(lambda c: c.update(target_modules=".*proj")), "target_modules is the pattern '.*proj'"),
        (edit_peft(lambda c: c.update(use_rslora=True)), "use_rslora: Input should be False"),
        (edit_peft(lambda c: c.update(use_dora=True)), "use_dora: Input should be False"),
        (edit_peft(lambda c: c.update(rank_pattern={"model.layers.0.mlp.up_proj": 2})), "rank_pattern"),
        (edit_peft(lambda c: c.update(bias="all")), "bias: Input should be 'none'"),
        (edit_peft(lambda c: c.update(layers_to_transform=[0])), "layers_to_transform"),
        (edit_peft(lambda c: c.update(surprise=1)), "surprise: Extra inputs are not permitted"),
    ],
)
def test_the_peft_settings_are_read_back_and_must_agree_with_config_json(lora_copy, lora_router, damage, message):
    kind, folder = lora_copy
    damage(folder)
    rerecord(folder, "adapter_config.json")
    with pytest.raises(RouterArtifactError, match=f"adapter_config.json: .*{message}.*restore the router folder"):
        resolve(kind, folder, lora_router)


def test_intact_lora_routers_load_and_peft_reads_the_same_settings(lora_copy, lora_router):
    kind, folder = lora_copy
    resolve(kind, folder, lora_router)
    peft = pytest.importorskip("peft")
    config = read_artifact_config(folder).lora
    read = peft.LoraConfig.from_pretrained(str(folder))  # PEFT's own schema: the LoRA PEFT would load
    assert (read.peft_type.value, read.r, read.lora_alpha) == ("LORA", config.rank, config.alpha)
    assert set(read.target_modules) == {config.module_name(layer, t) for layer in config.layers for t in config.targets}
    assert (read.use_rslora, read.use_dora, read.fan_in_fan_out, read.bias) == (False, False, False, "none")


def misshape(folder, wrong):
    """Rewrite the LoRA's weights with the tensors whose module ends with a key of ``wrong`` replaced by random
    tensors of the shape it gives (the fingerprint metadata kept), and re-record the checksum."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata, state = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    for key in state:
        for suffix, shape in wrong.items():
            if key.endswith(suffix):
                state[key] = torch.randn(*shape)
    save_file(state, str(path), metadata=metadata)
    rerecord(folder, "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [  # tiny llama: down_proj takes 128 (the MLP width), k_proj gives 32 (2 KV heads x 16)
        ({"mlp.down_proj.lora_A.weight": (4, 64)}, r"down_proj.lora_A.weight has shape \[4, 64\].* must be \[4, 128\]"),
        ({"self_attn.k_proj.lora_B.weight": (64, 4)}, r"k_proj.lora_B.weight has shape \[64, 4\].* must be \[32, 4\]"),
    ],
)
def test_lora_weights_of_the_wrong_shape_are_an_error_at_load_not_at_rank(lora_router, tmp_path, wrong, message):
    backbone, source = lora_router
    folder = tmp_path / "router"
    shutil.copytree(source, folder)
    misshape(folder, wrong)
    reranker = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=folder)
    with pytest.raises(RouterArtifactError, match=f"does not fit this backbone: adapter_model.safetensors: .*{message}"):
        reranker.warm_up()


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        ({"mlp.down_proj.lora_A.weight": (8, 576)}, r"down_proj.lora_A.weight has shape \[8, 576\].* must be \[8, 1536\]"),
        ({"self_attn.k_proj.lora_B.weight": (576, 8)}, r"k_proj.lora_B.weight has shape \[576, 8\].* must be \[192, 8\]"),
    ],
)
def test_a_smollm2_lora_is_checked_against_the_backbones_projections(smollm2_lora_router, tmp_path, wrong,
                                                                    message):
    """A LoRA on the shipped router, of SmolLM2-135M's real shapes, read back and checked against its projections."""
    from routehead_rag.engine.lora import check_fits

    decoder = smollm2_decoder()
    source = smollm2_lora_router
    check_fits(decoder, artifact.load_lora(source, read_artifact_config(source)))  # the intact one fits
    folder = tmp_path / "router"
    shutil.copytree(source, folder)
    misshape(folder, wrong)
    lora = artifact.load_lora(folder, read_artifact_config(folder))
    with pytest.raises(ValueError, match=message):
        check_fits(decoder, lora)


def test_removing_lora_from_config_json_is_an_error_not_a_silent_drop(lora_copy, lora_router):
    kind, folder = lora_copy
    edit_config(folder, lambda c: c.pop("lora"))
    with pytest.raises(RouterArtifactError, match="files records the LoRA's adapter_config.json and "
                                                  "adapter_model.safetensors but there is no 'lora'.*restore"):
        resolve(kind, folder, lora_router)
    edit_config(folder, lambda c: [c["files"].pop(name) for name in ("adapter_config.json", "adapter_model.safetensors")])
    with pytest.raises(RouterArtifactError, match="holds the LoRA's adapter_config.json and adapter_model.safetensors "
                                                  "but config.json has no 'lora'.*delete those files"):
        resolve(kind, folder, lora_router)
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_model.safetensors").unlink()
    assert resolve(kind, folder, lora_router) is not None if kind == "tiny" else resolve(kind, folder, lora_router) is None


def float_leaves(value, path=()):
    """Every float in a JSON value, as (path, value)."""
    if isinstance(value, float):
        yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from float_leaves(item, (*path, key))


SHIPPED_FLOATS = [path for path, _ in float_leaves(smollm2_config_json())]
BAD_NUMBERS = [float("nan"), float("inf"), float("-inf"), "1e400"]


@pytest.mark.parametrize("path", SHIPPED_FLOATS, ids=[".".join(map(str, p)) for p in SHIPPED_FLOATS])
def test_every_number_in_config_json_must_be_finite(tmp_path, path):
    """NaN, Infinity and 1e400 in any float of the shipped config.json (calibration.slope and .intercept,
    fusion.weight, selection.*, dev_metrics, search, training, ...; with SmolLM2's LoRA as its lora, so lora.alpha
    too, whether or not the router ships one) are refused, naming the field."""
    assert ("lora", "alpha") in SHIPPED_FLOATS
    text = json.dumps(smollm2_config_json())
    for number, bad in enumerate(BAD_NUMBERS):
        raw = json.loads(text)
        holder = raw
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = "@BAD@"
        folder = tmp_path / str(number)
        folder.mkdir()
        written = json.dumps(raw).replace('"@BAD@"', bad if isinstance(bad, str) else json.dumps(bad))
        (folder / "config.json").write_text(written)
        top, inner = str(path[0]), ".".join(map(str, path[1:]))
        with pytest.raises(RouterArtifactError, match="not a valid router config") as caught:
            read_artifact_config(folder)
        assert top in str(caught.value) and inner in str(caught.value) and "finite" in str(caught.value), caught.value


def test_every_float_field_of_every_config_model_refuses_nan_and_infinity():
    """A float field added to any model config.json is read into gets the same treatment the day it lands."""
    import typing

    from pydantic import BaseModel

    from routehead_rag.engine.peft_layout import PeftLoraFile
    from routehead_rag.router.artifact import RouterArtifactConfig

    def models(annotation, seen):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.add(annotation)
                for field in annotation.model_fields.values():
                    models(field.annotation, seen)
        for argument in typing.get_args(annotation):
            models(argument, seen)
        return seen

    found = {}
    for model in models(RouterArtifactConfig, set()) | {PeftLoraFile}:
        for name, field in model.model_fields.items():
            if float in (field.annotation, *typing.get_args(field.annotation)):
                found[f"{model.__name__}.{name}"] = any(getattr(m, "allow_inf_nan", None) is False for m in field.metadata)
    assert found and {name for name, finite in found.items() if not finite} == set()
    assert {"CalibrationConfig.slope", "FusionConfig.weight", "LoraConfig.alpha", "SelectionConfig.threshold"} <= set(found)


@pytest.mark.parametrize("change", [
    lambda c: c["calibration"].update(slope=float("inf")),
    lambda c: c["calibration"].update(intercept=float("nan")),
    lambda c: c["fusion"].update(weight=float("inf")),
    lambda c: c["lora"].update(alpha=float("inf")),
], ids=["slope-inf", "intercept-nan", "fusion-weight-inf", "lora-alpha-inf"])
def test_a_shipped_router_with_a_non_finite_number_is_an_error_under_heads_auto(lora_router, smollm2_lora_router,
                                                                                tmp_path, monkeypatch, change):
    """The shipped router found by heads="auto" with calibration.intercept NaN used to rank everything blank. (The
    shipped router with SmolLM2's LoRA added, so that its lora.alpha can be damaged too.)"""
    from routehead_rag.router.artifact import shipped_router_for

    backbone, _ = lora_router
    shutil.copytree(smollm2_lora_router, tmp_path / "routers" / "smollm2-135m")
    monkeypatch.setattr(artifact, "SHIPPED_ROUTERS", tmp_path / "routers")
    shipped_router_for(backbone.fingerprint())  # intact: no error (and no router for the tiny backbone)
    edit_config(tmp_path / "routers" / "smollm2-135m", change)
    with pytest.raises(RouterArtifactError, match="shipped in the package.*finite number.*repair the installation"):
        shipped_router_for(backbone.fingerprint())
    reranker = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer)  # heads="auto"
    with pytest.raises(RouterArtifactError, match="repair the installation"):
        reranker.rank("tides", ["the moon pulls the sea"])


def test_a_format_2_config_with_an_infinite_query_adapter_alpha_is_refused(tmp_path):
    """The issue's `query_adapter.alpha: Infinity` (format 2's name for the LoRA) changed the scores."""
    raw = smollm2_config_json()  # the shipped config.json with SmolLM2's LoRA
    adapter = raw.pop("lora")
    del adapter["scope"]
    raw.update(format=2, query_adapter={**adapter, "alpha": float("inf")})
    raw["scoring"]["calibrate"] = raw["scoring"].pop("subtract_content_free")
    raw["scoring"]["prompt"]["calibration_query"] = raw["scoring"]["prompt"].pop("content_free_query")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(RouterArtifactError, match=r"lora.alpha: Input should be a finite number.*'query_adapter' is "
                                                  r"'lora'\): correct what is named"):
        read_artifact_config(tmp_path)
    raw["query_adapter"]["alpha"] = 16.0
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_artifact_config(tmp_path).lora == SMOLLM2_LORA
