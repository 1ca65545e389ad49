"""Config: TOML plus dotted overrides; unknown keys, wrong types, impossible values name the key."""

import pytest

from lepton_hpc.config import load_config
from lepton_hpc.errors import ConfigError, LeptonError


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_file_values(tmp_path):
    cfg = load_config(
        write(tmp_path, '[optim]\nname = "sgd"\nlr = 1\n[model]\nkind = "mlp"\nhidden = [8, 4]\n')
    )
    assert cfg.optim.name == "sgd"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.hidden == [8, 4]
    assert cfg.train.epochs == 10


def test_overrides_keep_types(tmp_path):
    cfg = load_config(
        write(tmp_path, ""),
        [
            "optim.lr=0.05",
            "train.epochs=3",
            "optim.name=momentum",
            "output.dir=runs/x",
            "comm.reproducible=true",
        ],
    )
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 3 and cfg.optim.name == "momentum"
    assert cfg.output.dir == "runs/x" and cfg.comm.reproducible is True


@pytest.mark.parametrize(
    ("text", "overrides", "key"),
    [
        ("[optim]\nlearning_rate = 0.1\n", [], "optim.learning_rate"),
        ("[optimizer]\nlr = 0.1\n", [], "optimizer"),
        ('[optim]\nlr = "fast"\n', [], "optim.lr"),
        ("", ["optim.lr=-0.1"], "optim.lr"),
        ("", ["train.epochs=0"], "train.epochs"),
        ("", ["train.epochs=2.5"], "train.epochs"),
        ("", ["comm.reproducible=1"], "comm.reproducible"),
        ("", ["model.kind=forest"], "model.kind"),
        ("", ["data.validation_fraction=1.5"], "data.validation_fraction"),
        ("", ["model.hidden=[8, 0]"], "model.hidden"),
        ("", ["model.hidden=[8]"], "model.hidden"),  # only an mlp has hidden layers
        ("", ["train.nope=1"], "train.nope"),
        ("", ["lr=1"], "lr"),
        ("", ["optim.lr=inf"], "optim.lr"),  # non-finite numbers are never a setting
        ("", ["optim.lr=nan"], "optim.lr"),
        ("", ["model.l2=inf"], "model.l2"),
        ("", ["checkpoint.watchdog_s=-inf"], "checkpoint.watchdog_s"),
        ("[optim]\nbeta2 = nan\n", [], "optim.beta2"),
        ("", ["train.seed=99999999999999999999999"], "train.seed"),  # beyond 64 bits
        ("", ["model.max_classes=1"], "model.max_classes"),
        ("", ['train.products="float16"'], "train.products"),
        (
            '[model]\nkind = "logistic"\n[optim]\nname = "lbfgs"\n[train]\nbatch_size = 32\n',
            [],
            "optim.name",
        ),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    assert f"'{key}'" in str(info.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(LeptonError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(LeptonError, match="not valid TOML"):
        load_config(write(tmp_path, "[optim\n"))


def test_huge_seeds_within_64_bits_work():
    """A seed near 2^63 keys every random stream without overflowing (it used to raise)."""
    import numpy as np

    from lepton_hpc.data.batches import EpochBatches, uniform

    seed = 2**63 - 1
    u = uniform(np.arange(10, dtype=np.int64), seed, 1)
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 10
    batches = EpochBatches(np.arange(100, dtype=np.int64), 100, 7, seed)(3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))
    assert uniform(np.arange(4), 2**62, 1).tolist() != uniform(np.arange(4), 2**62 + 1, 1).tolist()


def test_overrides_may_follow_the_options(monkeypatch):
    """``lepton train c.toml --resume auto optim.lr=0.1`` keeps the override (argparse alone
    rejected it); a stray word that is not an override is still an error."""
    import argparse

    from lepton_hpc import cli

    seen = {}

    def capture(_func, args):
        seen.update(vars(args))
        return 0

    parser = cli.build_parser()
    args, extra = parser.parse_known_args(["train", "c.toml", "--resume", "auto", "optim.lr=0.1"])
    assert isinstance(args, argparse.Namespace) and extra == ["optim.lr=0.1"]
    monkeypatch.setattr(cli, "run_guarded", capture)
    assert cli.main(["train", "c.toml", "a.b=1", "--overwrite", "optim.lr=0.1"]) == 0
    assert seen["overrides"] == ["a.b=1", "optim.lr=0.1"] and seen["overwrite"]
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "c.toml", "--overwrite", "stray"])
    assert info.value.code == 2


def test_watchdog_is_auto_by_default_and_takes_seconds_or_auto(tmp_path):
    assert load_config(write(tmp_path, "")).checkpoint.watchdog_s == "auto"
    cfg = load_config(write(tmp_path, "[checkpoint]\nwatchdog_s = 30\n"))
    assert cfg.checkpoint.watchdog_s == 30.0 and isinstance(cfg.checkpoint.watchdog_s, float)
    assert load_config(write(tmp_path, ""), ["checkpoint.watchdog_s=0"]).checkpoint.watchdog_s == 0
    over = load_config(
        write(tmp_path, "[checkpoint]\nwatchdog_s = 5\n"), ["checkpoint.watchdog_s=auto"]
    )
    assert over.checkpoint.watchdog_s == "auto"


@pytest.mark.parametrize("value", ['"soon"', "-1", "true", "nan", '"AUTO"'])
def test_watchdog_errors_name_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match=r"'checkpoint\.watchdog_s'.*auto"):
        load_config(write(tmp_path, f"[checkpoint]\nwatchdog_s = {value}\n"))
