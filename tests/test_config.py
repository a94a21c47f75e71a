"""Config strictness, types, dotted overrides and combination checks."""

import dataclasses
from pathlib import Path

import pytest

from sgdd.config import config_from_dict, config_to_dict, load_config, save_config
from sgdd.registry import ConfigError, Registry

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.max_length > cfg.data.min_tokens


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("training:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "training.max_stepz" in msg and str(p) in msg and "max_steps" in msg


def test_unknown_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        load_config(p)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.lr=fast", "training.lr"),
        ("training.max_steps=1.5", "training.max_steps"),
        ("training.final_eval=maybe", "training.final_eval"),
        ("data.max_length=[1]", "data.max_length"),
    ],
)
def test_wrong_types_fail(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])


def test_overrides_apply_and_parse_yaml_scalars():
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["training.max_steps=200", "model.num_layers=4",
                                                         "training.lr=1e-3", "tracking.tags=[a,b]"])
    assert cfg.training.max_steps == 200 and cfg.model.num_layers == 4
    assert cfg.training.lr == pytest.approx(1e-3) and cfg.tracking.tags == ["a", "b"]


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["training.lr=1"])
    assert isinstance(cfg.training.lr, float)


@pytest.mark.parametrize("bad", ["training.max_steps", "=3", "nosuch.key=1", "training.lr.x=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_sampler_must_fit_process():
    with pytest.raises(ConfigError, match="valid samplers: maskgit"):
        load_config(None, ["sampling.sampler=euler"])
    with pytest.raises(ConfigError, match="euler, analytic"):
        load_config(None, ["diffusion.process=score_entropy", "diffusion.graph=uniform", "sampling.sampler=maskgit"])
    cfg = load_config(None, ["diffusion.process=score_entropy", "sampling.sampler=analytic"])
    assert cfg.sampling.sampler == "analytic"


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError, match="cosine, loglinear"):
        load_config(None, ["diffusion.schedule=linear"])


def test_yaml_boolean_for_a_string_says_to_quote_it(tmp_path):
    # `mode: off` is a boolean in YAML 1.1; the error must say so, how to quote it, and the valid choices
    with pytest.raises(ConfigError, match=r"got False \(YAML reads unquoted .*tracking.mode=\"'off'\".*one of: auto"):
        load_config(ROOT / "configs/quickstart.yaml", ["tracking.mode=off"])
    bad = tmp_path / "c.yaml"
    bad.write_text("training:\n  run_name: yes\n")
    with pytest.raises(ConfigError, match=r"'training.run_name' must be a string, got True \(YAML reads unquoted"):
        load_config(str(bad))
    assert load_config(ROOT / "configs/quickstart.yaml", ["training.run_name='off'"]).training.run_name == "off"


def test_roundtrip_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/fiction_minilm.yaml", ["model.prefix_tokens=2"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_optional_int_takes_null_or_an_integer(tmp_path):
    cfg = load_config(None, ["sampling.pad_tail=null"])
    assert cfg.sampling.pad_tail is None
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").sampling.pad_tail is None  # null survives a checkpoint's config.yaml
    assert load_config(None, ["sampling.pad_tail=8"]).sampling.pad_tail == 8
    with pytest.raises(ConfigError, match=r"sampling\.pad_tail"):
        load_config(None, ["sampling.pad_tail=many"])
    with pytest.raises(ConfigError, match=r"sampling\.pad_tail must be >= 0"):
        load_config(None, ["sampling.pad_tail=-1"])


def test_missing_file_message():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_registry_lists_valid_names():
    reg = Registry("thing")
    reg.register("a")(1)
    reg.register("b")(2)
    assert reg.get("b") == 2
    with pytest.raises(ConfigError, match="valid choices: a, b"):
        reg.get("c")
    with pytest.raises(KeyError):
        reg.register("a")(3)


def test_config_sections_are_dataclasses():
    cfg = load_config(None)
    for f in dataclasses.fields(cfg):
        assert dataclasses.is_dataclass(getattr(cfg, f.name))


def test_override_into_an_empty_yaml_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\ntraining:\n  max_steps: 5\n", encoding="utf-8")
    cfg = load_config(p, ["model.num_layers=2"])
    assert cfg.model.num_layers == 2 and cfg.training.max_steps == 5
    p.write_text("model: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="model"):
        load_config(p, ["model.num_layers=2"])


def test_betas_must_be_two_numbers():
    with pytest.raises(ConfigError, match="betas"):
        load_config(None, ["training.betas=[0.9]"])


def test_heap_trim_every_must_not_be_negative():
    assert load_config(None, ["training.heap_trim_every=1"]).training.heap_trim_every == 1
    with pytest.raises(ConfigError, match=r"training\.heap_trim_every must be >= 0"):
        load_config(None, ["training.heap_trim_every=-1"])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["diffusion.softmax_sample=-1"], "softmax_sample must be >= 0"),
        (["diffusion.softmax_sample=64", "diffusion.process=score_entropy", "diffusion.graph=uniform",
          "sampling.sampler=euler"], "set it to 0 for diffusion.graph = uniform"),
    ],
)
def test_softmax_sample_is_validated(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["diffusion.substitute=1.0"], r"diffusion\.substitute must be in \[0, 1\)"),
        (["diffusion.substitute=0.1", "diffusion.process=score_entropy", "sampling.sampler=euler"],
         "masked only"),
        (["diffusion.substitute_weight=-1"], "substitute_weight must be >= 0"),
        (["diffusion.corrector=1.0"], r"diffusion\.corrector must be in \[0, 1\)"),
        (["diffusion.corrector=0.2", "diffusion.process=score_entropy", "sampling.sampler=euler"], "masked only"),
        (["diffusion.corrector_weight=-0.5"], "corrector_weight must be >= 0"),
        (["sampling.correct=-1"], r"sampling\.correct must be >= 0"),
        (["sampling.correct_frac=0"], r"correct_frac must be in \(0, 1\)"),
        (["sampling.correct=2", "diffusion.process=score_entropy", "sampling.sampler=euler"],
         "sampling.correct is a MaskGIT step"),
    ],
)
def test_substitution_and_correction_settings_are_validated(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_shortlist_settings_are_validated():
    from sgdd.config import Config, validate_config

    cfg = Config()
    cfg.sampling.shortlist = -1
    with pytest.raises(ConfigError, match="sampling.shortlist"):
        validate_config(cfg)
    cfg = Config()
    cfg.sampling.shortlist, cfg.model.bow_head = 256, False
    with pytest.raises(ConfigError, match="bag-of-words head"):
        validate_config(cfg)


def test_kv_refresh_settings_are_validated():
    from sgdd.config import Config, validate_config

    cfg = Config()
    cfg.sampling.kv_refresh = -1
    with pytest.raises(ConfigError, match="sampling.kv_refresh must be >= 0"):
        validate_config(cfg)
    cfg = Config()
    cfg.sampling.kv_refresh, cfg.model.z_positions = 4, True
    validate_config(cfg)  # a one-line model swap stays valid: such decoders decode without reuse (a warning)


def test_self_condition_settings_are_validated():
    from sgdd.config import Config, validate_config

    cfg = Config()
    cfg.model.self_condition_prob = 1.5
    with pytest.raises(ConfigError, match="self_condition_prob"):
        validate_config(cfg)
    cfg = Config()
    cfg.model.self_condition, cfg.diffusion.process = True, "score_entropy"
    cfg.sampling.sampler = "euler"
    with pytest.raises(ConfigError, match="masked only"):
        validate_config(cfg)
