"""The experiment schema: YAML + key=value overrides, and errors that name key, value and what is allowed."""
from pathlib import Path

import pytest

from scan import configfile
from scan.config import ExperimentConfig, load_experiment
from scan.configfile import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_reference_recipe():
    cfg = load_experiment()
    assert cfg.xattn.direction == "t2i" and cfg.xattn.lambda_softmax == 9.0
    assert cfg.loss.margin == 0.2 and cfg.loss.max_violation
    assert cfg.optim.grad_clip == 2.0 and cfg.data.batch_size == 128


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 5e-4\n  lr_update: [10]\nxattn:\n  agg: lse\n")
    cfg = load_experiment(path, ["optim.lr=1e-3", "xattn.lambda_lse=20", "optim.lr_update=12"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.xattn.agg == "lse" and cfg.xattn.lambda_lse == 20.0
    assert cfg.optim.lr_update == [12]


@pytest.mark.parametrize("override, words", [
    ("xattn.direction=sideways", ["xattn.direction", "sideways", "'t2i'", "'i2t'"]),
    ("train.precision=fp8", ["train.precision", "fp8", "'bf16'"]),
    ("optim.lr=fast", ["optim.lr", "fast", "float"]),
    ("data.batch_size=0", ["data.batch_size", "0"]),
    ("optim.learning_rate=1", ["optim.learning_rate", "allowed keys", "lr"]),
    ("nonsense", ["key=value"]),
])
def test_bad_values_are_named(override, words):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [override])
    for word in words:
        assert word in str(err.value)


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("xattn:\n  agg: median\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*xattn\.agg.*median"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_experiment(None, ["model.embed_size=256", "loss.mask_same_image=false"])
    configfile.save(cfg, tmp_path / "config.yaml")
    again = load_experiment(tmp_path / "config.yaml")
    assert again == cfg


def test_every_shipped_config_loads():
    from cluster.extract_config import ExtractionConfig, load_extraction

    paths = sorted(CONFIGS.glob("*.yaml"))
    assert CONFIGS / "extract.yaml" in paths
    for path in paths:
        if path.name == "extract.yaml":  # the extraction job's schema, not an experiment's
            assert isinstance(load_extraction(path, ["source.synthetic=1", "dest=x"]), ExtractionConfig)
        else:
            assert isinstance(load_experiment(path), ExperimentConfig), path


def test_validation_follows_every_n_epochs_and_always_the_last():
    from scan.config import ExperimentConfig, TrainConfig
    from trainer.train import _validates_after

    def after(every: int, epochs: int) -> list[int]:
        cfg = ExperimentConfig(train=TrainConfig(epochs=epochs, eval_every_epochs=every))
        return [e for e in range(1, epochs + 1) if _validates_after(cfg, e)]

    assert after(1, 3) == [1, 2, 3]
    assert after(2, 5) == [2, 4, 5]
    assert after(0, 3) == [3]


def test_a_bad_override_is_named_as_the_command_lines_not_the_files(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 5e-4\n")
    for override, key in (("xattn.agg=median", "xattn.agg"), ("optim.learning_rate=1", "optim.learning_rate"),
                          ("optim.lr_update=[1", "optim.lr_update")):
        with pytest.raises(ConfigError) as err:
            load_experiment(good, [override])
        message = str(err.value)
        assert message.startswith(f"command-line override {override!r}"), message
        assert key in message and "good.yaml" not in message
    bad = tmp_path / "bad.yaml"  # a bad value in the file stays the file's, overrides or not
    bad.write_text("xattn:\n  agg: median\n")
    with pytest.raises(ConfigError, match=r"^\S*bad\.yaml: config key 'xattn\.agg'"):
        load_experiment(bad, ["optim.lr=1e-3"])


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: 5e-4\n  lr_update: [10\nxattn:\n  agg: lse\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    message = str(err.value)
    assert str(path) in message and "line " in message and "<unicode string>" not in message
