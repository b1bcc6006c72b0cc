"""Configuration (hm4sr_core.config): the released-code switches grouped under
``ModelConfig.released``, old flat configs and checkpoints still loading, ``--set`` by the
flat and the dotted names, one micro_batches rule, and --help defaults taken from the configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hm4sr_core.cli import build_parser, parse_overrides
from hm4sr_core.config import RELEASED_FIELDS, ModelConfig, PreprocessConfig, ReleasedCode, TrainConfig
from hm4sr_core.data.synthetic import make_synthetic_world
from hm4sr_core.runs import load_checkpoint, model_from_checkpoint

FLAT = json.loads((Path(__file__).parent / "fixtures" / "flat_model_configs.json").read_text())


def test_the_released_switches_are_one_block_and_everything_else_is_not():
    assert set(RELEASED_FIELDS) == {"train_temporal_experts", "normalise_time", "mask_same_target", "reference_init",
                                    "category_columns", "feature_width", "gap_buckets", "interactive_gate_bias",
                                    "timestamps", "padding_row"}
    saved = ModelConfig().to_dict()
    assert set(saved["released"]) == set(RELEASED_FIELDS) and not set(RELEASED_FIELDS) & set(saved)
    # 41 settings as before: 31 at the top level, 10 in the block.
    assert len(ModelConfig.setting_names()) == 41 == len(saved) - 1 + len(saved["released"])
    assert ModelConfig.reference().released == ReleasedCode(train_temporal_experts=False, normalise_time=False,
                                                             mask_same_target=False, reference_init=True)
    assert ModelConfig().released == ReleasedCode()  # this project's fixes by default


@pytest.mark.parametrize("case", ["results_json", "reference"])
def test_an_old_flat_config_loads_as_the_nested_one(case):
    flat = FLAT[case]
    config = ModelConfig.from_dict(flat)
    for name in RELEASED_FIELDS:
        assert getattr(config.released, name) == flat[name], name
    for name, value in flat.items():
        if name not in RELEASED_FIELDS:
            got = getattr(config, name)
            assert (list(got) if isinstance(got, tuple) else got) == value, name
    nested = config.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(nested))) == config  # the new layout round-trips
    mixed = {k: v for k, v in flat.items() if k != "timestamps"} | {"released": {"timestamps": flat["timestamps"]}}
    assert ModelConfig.from_dict(mixed) == config
    with pytest.raises(ValueError, match="both at the top level and under 'released'"):
        ModelConfig.from_dict(flat | {"released": {"timestamps": flat["timestamps"]}})
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict(flat | {"from_the_future": 1})


def test_an_old_checkpoint_with_a_flat_config_loads_and_scores_the_same(tiny_ds, tiny_run, tmp_path):
    """A checkpoint written before the block: its model_config has the switches at the top
    level. It loads (weights_only) into the same model and gives the same scores."""
    result, out = tiny_run
    payload = load_checkpoint(out / "best.pt")
    nested = payload["model_config"]
    flat = {k: v for k, v in nested.items() if k != "released"} | nested["released"]
    old = tmp_path / "old.pt"
    torch.save(dict(payload, model_config=flat), old)
    again = load_checkpoint(old)
    assert "released" not in again["model_config"]
    model = model_from_checkpoint(again, tiny_ds).eval()
    assert model.config == result.model.config
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_replace_and_the_presets_take_the_flat_names():
    config = ModelConfig().replace(normalise_time=False, timestamps="minmax", hidden_size=32)
    assert config.released.timestamps == "minmax" and not config.released.normalise_time and config.hidden_size == 32
    assert ModelConfig.reference(timestamps="float32").released.timestamps == "float32"
    assert ModelConfig.hm4sr(padding_row="trained").released.padding_row == "trained"
    assert ModelConfig.sasrec(feature_width=8).released.feature_width == 8
    with pytest.raises(ValueError, match="needs normalise_time=false"):
        ModelConfig().replace(timestamps="minmax")  # checked inside the block
    with pytest.raises(ValueError, match="padding_row='trained'"):
        ModelConfig().replace(padding_row="trained", rec_loss="sampled")  # checked across it
    with pytest.raises(ValueError, match="gap_buckets"):
        ModelConfig().replace(gap_buckets="shared")


def test_set_takes_the_flat_and_the_dotted_names_alike():
    flat, _ = parse_overrides(["normalise_time=false", "timestamps=minmax", "hidden_size=32"])
    dotted, _ = parse_overrides(["released.normalise_time=false", "model.released.timestamps=minmax",
                                 "model.hidden_size=32"])
    assert flat == dotted == {"normalise_time": False, "timestamps": "minmax", "hidden_size": 32}
    config = ModelConfig.hm4sr(**flat)
    assert config.released.timestamps == "minmax" and config.hidden_size == 32
    for bad in ("released.hidden_size=32", "released=x", "train.released.normalise_time=false",
                "released.nonsense=1"):
        with pytest.raises(ValueError, match="--set"):
            parse_overrides([bad])
    with pytest.raises(ValueError, match="gap_buckets"):
        ModelConfig.hm4sr(**parse_overrides(["gap_buckets=shared"])[0])


def test_micro_batches_across_processes_is_refused_by_one_rule():
    parts = TrainConfig(mode="prefix", micro_batches=2)
    with pytest.raises(ValueError, match="micro_batches > 1 is for one process: with 4 ranks"):
        parts.check_distributed(4)
    TrainConfig(mode="prefix").check_distributed(4)  # one part per rank: fine
    with pytest.raises(ValueError, match="needs mode 'prefix'"):
        TrainConfig(micro_batches=2)


def test_help_defaults_are_the_configs_defaults():
    parser = build_parser()
    prep = parser.parse_args(["prepare", "synthetic"])
    want = PreprocessConfig()
    assert (prep.dedup, prep.user_core, prep.item_core, prep.max_length) == \
        (want.dedup, want.user_core, want.item_core, want.max_length)
    import inspect
    assert prep.seed == inspect.signature(make_synthetic_world).parameters["seed"].default
    train = parser.parse_args(["train", "--data", "d", "--out", "o"])
    assert train.seed is None and train.epochs is None and train.mode is None  # None = the config's own
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    helps = {a.dest: a.help for a in sub._actions}
    assert f"default {TrainConfig().epochs}" in helps["epochs"] and f"default {TrainConfig().seed}" in helps["seed"]
    from dataclasses import fields

    from hm4sr_core.tune import DEFAULT_EPOCHS, TuneSettings
    tuned = parser.parse_args(["tune", "--data", "d", "--out", "o", "--trials", "3"])
    settings = {f.name: f.default for f in fields(TuneSettings)}
    assert (tuned.epochs, tuned.warmup_epochs, tuned.startup_trials, tuned.pruner, tuned.seed, tuned.jobs) == \
        (DEFAULT_EPOCHS, settings["warmup"], settings["startup"], settings["pruner"], settings["seed"], settings["jobs"])
    assert tuple(int(s) for s in tuned.final_seeds.split(",")) == settings["final_seeds"]


def test_a_search_space_may_name_a_released_switch():
    from hm4sr_core.tune import apply_params, validate_space
    space = validate_space({"feature_width": {"choices": [0, 8]}, "hidden_dropout": {"low": 0.1, "high": 0.5}})
    assert space["feature_width"] == {"choices": [0, 8]}
    with pytest.raises(ValueError, match="gap_buckets"):
        validate_space({"gap_buckets": {"choices": ["separate", "shared"]}})
    model, train = apply_params(ModelConfig(), TrainConfig(), {"feature_width": 8, "lr": 0.01})
    assert model.released.feature_width == 8 and train.lr == 0.01


def test_a_study_created_with_a_flat_config_resumes(tmp_path):
    """`hm4sr tune` resumes a study only with the same identity; one created before the block
    saved its model_config flat, and is the same study."""
    pytest.importorskip("optuna", reason="optuna (tune extra) is not installed")
    from hm4sr_core.tune import TuneSettings, open_study
    settings = TuneSettings(data="d", model="hm4sr", trials=1, out=tmp_path, space={}, train=TrainConfig())
    study = open_study(settings, "hash")
    saved = study.user_attrs["identity"]
    nested = saved["model_config"]
    flat = {k: v for k, v in nested.items() if k != "released"} | nested["released"]
    study.set_user_attr("identity", dict(saved, model_config=flat))
    open_study(settings, "hash")  # the same study
    study.set_user_attr("identity", dict(saved, model_config=flat | {"normalise_time": False}))
    with pytest.raises(ValueError, match="created with other model_config"):
        open_study(settings, "hash")
