import glob
import os

import pytest
import yaml

from sslscale.checkpoint.run_folder import dump_config
from sslscale.config import Config, ConfigError, apply_override, load_config
from tests.conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert config.validate() == []
    assert config.run.name  # each recipe names its run folder


def test_the_seeds_imagenet_recipes_are_all_there():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    expected = {"dissl_resnet50_dNone_e100_m2", "dissl_resnet50_d8192_e100_m2", "dissl_resnet50_d8192_e100_m6",
                "dissl_resnet50_dNone_e400_m2", "dissl_resnet50_dNone_e400_m6", "dissl_resnet50_d8192_e400_m6",
                "dissl_resnet50_d8192_e800_m8", "cissl_resnet50_e100_m2", "quickstart"}
    assert expected <= names


def problems_of(*overrides):
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return "\n".join(info.value.problems)


def test_unknown_key_is_named_with_a_suggestion():
    message = problems_of("optim.base_lrr=0.1")
    assert "unknown key optim.base_lrr" in message and "did you mean optim.base_lr" in message


def test_unknown_section_is_named():
    assert "unknown key optimizer" in problems_of("optimizer.lr=1")


def test_wrong_type_names_key_and_value():
    message = problems_of("data.batch_size=lots")
    assert "data.batch_size" in message and "'lots'" in message and "int" in message


@pytest.mark.parametrize("override, needle", [
    ("objective.name=byol", "objective.name: 'byol' is not valid; choose one of dissl, cissl, simclr, dino"),
    ("model.backbone=vgg11", "model.backbone: 'vgg11' is not valid"),
    ("objective.dissl.n_classes=1", "objective.dissl.n_classes: 1; C must be >= 2"),
    ("data.crops=[{size: 0, count: 2}]", "data.crops[0].size: 0 is impossible"),
    ("data.crops=[{size: 32, count: 2, scale: [0.0, 1.0]}]", "data.crops[0].scale: [0.0, 1.0]"),
    ("data.crops=[{size: 32, count: 2, scale: [0.5, 1.5]}]", "data.crops[0].scale: [0.5, 1.5]"),
    ("data.crops=[{size: 96, count: 2}, {size: 224, count: 2}]", "must be ordered large first"),
    ("data.crops=[{size: 6, count: 2}]", "blur window of 13 px"),
    ("data.batch_size=0", "data.batch_size: 0"),
    ("data.source=imagenet", "data.source: 'imagenet'"),
    ("data.source=folder", "data.path: required for source 'folder'"),
    ("optim.warmup_epochs=500", "optim.warmup_epochs: 500.0; must be between 0 and train.epochs"),
    ("train.precision=fp8", "train.precision: 'fp8' is not valid"),
])
def test_impossible_values_are_rejected_with_the_reason(override, needle):
    assert needle in problems_of(override)


def test_contrastive_objectives_need_exactly_two_views():
    message = problems_of("objective.name=cissl", "data.crops=[{size: 224, count: 2}, {size: 96, count: 6}]")
    assert "cissl uses exactly two views" in message


def test_all_problems_are_reported_at_once():
    message = problems_of("model.backbone=x", "objective.name=y", "train.epochs=-1")
    assert "model.backbone" in message and "objective.name" in message and "train.epochs" in message


def test_dissl_warns_when_lambda_is_below_beta_plus_one():
    with pytest.warns(UserWarning, match="lam >= beta \\+ 1"):
        load_config(None, ["objective.dissl.lam=1.0", "objective.dissl.beta=0.6"])


def test_overrides_parse_yaml_values_including_bare_exponents():
    config = load_config(None, ["optim.base_lr=1e-3", "model.dim=null", "eval.labels_per_class=[1, 5]",
                                "data.crops=[{size: 64, count: 2}]", "data.crops.0.count=4"])
    assert config.optim.base_lr == 1e-3
    assert config.model.dim is None
    assert config.eval.labels_per_class == [1, 5]
    assert config.data.crops[0].count == 4 and config.data.crops[0].size == 64


def test_malformed_override_is_an_error():
    assert apply_override({}, "optim.base_lr") == [
        "override 'optim.base_lr': expected key=value, e.g. optim.base_lr=0.5"]
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["run.name=x", "run.name.deeper=1"])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_resolved_config_round_trips(tmp_path):
    config = load_config(CONFIGS[0], ["run.seed=7"])
    path = tmp_path / "config.yaml"
    dump_config(config, str(path))
    assert load_config(str(path)) == config
    assert yaml.safe_load(path.read_text())["run"]["seed"] == 7


def test_shape_signature_tracks_shape_keys_only():
    base = Config()
    wider = load_config(None, ["model.dim=8192"])
    longer = load_config(None, ["train.epochs=800"])
    assert base.shape_signature() != wider.shape_signature()
    assert base.shape_signature() == longer.shape_signature()


def test_an_override_whose_value_is_not_yaml_is_named():
    with pytest.raises(ConfigError, match=r"override 'data.crops=\[\{size:'.*not valid YAML"):
        load_config(None, ["data.crops=[{size:"])


def test_a_recipe_builds_on_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text("run: {name: base, seed: 3}\noptim: {base_lr: 0.5, name: sgd}\n"
                                        "data: {crops: [{size: 32, count: 2}], batch_size: 64}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrun: {name: child}\ndata: {crops: [{size: 16, count: 2}]}\n")
    config = load_config(str(tmp_path / "child.yaml"))
    assert (config.run.name, config.run.seed) == ("child", 3)  # sections merge key by key
    assert (config.optim.name, config.optim.base_lr, config.data.batch_size) == ("sgd", 0.5, 64)
    assert [(g.size, g.count) for g in config.data.crops] == [(16, 2)]  # lists are replaced whole
    dump_config(config, str(tmp_path / "resolved.yaml"))
    assert "base" not in yaml.safe_load((tmp_path / "resolved.yaml").read_text())  # a run folder keeps it all


def test_a_base_that_is_missing_or_leads_back_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    (tmp_path / "d.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match=r"nowhere.yaml does not exist \(the base of .*c.yaml\)"):
        load_config(str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="expected the path of another config"):
        load_config(str(tmp_path / "d.yaml"))


def test_the_table1_rows_each_add_one_change_to_the_row_before():
    def at(name):
        return load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
    for objective, batch in (("dissl", 256), ("dino", 256), ("cissl", 512), ("simclr", 512)):
        base, dim, epochs, aug = (at(f"{objective}_resnet18_tinyimagenet_{row}")
                                  for row in ("baseline", "d2048", "d2048_e1000", "d2048_e1000_aug"))
        assert (base.model.dim, base.train.epochs, base.data.batch_size) == (None, 300, batch)
        assert (dim.model.dim, dim.train.epochs) == (2048, 300)
        assert (epochs.model.dim, epochs.train.epochs) == (2048, 1000)
        assert (aug.model.dim, aug.train.epochs, aug.data.crops[0].scale, aug.data.augment.blur_p) == \
            (2048, 1000, (0.1, 1.0), 0.5)
        assert base.data.augment.blur_p == 0.0 and base.data.crops[0].scale == (0.2, 1.0)
        assert len({c.run.name for c in (base, dim, epochs, aug)}) == 4
        assert {c.objective.name for c in (base, dim, epochs, aug)} == {objective}
