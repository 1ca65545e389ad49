"""Test hooks: read once from the environment, checked, announced, and the same objects for all."""

import argparse

import pytest

from lepton_hpc import cli, faults, testhooks
from lepton_hpc.testhooks import FailOnce, FaultHooks, HookError


@pytest.fixture(autouse=True)
def fresh_hooks(monkeypatch):
    """Each test reads the hooks itself; whatever it loads is dropped afterwards."""
    monkeypatch.setattr(testhooks, "_current", {})
    monkeypatch.delenv("LEPTON_FAULT", raising=False)
    monkeypatch.delenv("LEPTON_FAIL_ONCE", raising=False)


def test_nothing_set_means_no_hooks():
    hooks = testhooks.parse({})
    assert not hooks.active and hooks.announcement() == ""
    assert not hooks.faults and not hooks.fail_once
    assert hooks.faults.before_step(1, 5) == 5


def test_fault_spec_is_parsed():
    hooks = testhooks.parse({"LEPTON_FAULT": "delay=0.25, raise=1@30,skew=2@10"})
    f = hooks.faults
    assert (f.delay, f.raise_at, f.skew_at) == (0.25, (1, 30), (2, 10))
    assert f.before_step(2, 10) == 11 and f.before_step(2, 11) == 11
    f.delay = 0.0
    with pytest.raises(RuntimeError, match="injected fault"):
        f.before_step(1, 30)


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("delay=abc", "delay='abc' is not a number of seconds"),
        ("delay=-1", "delay='-1' is not a number of seconds"),
        ("raise=1", "raise='1' is not raise=RANK@STEP"),
        ("skew=a@3", "skew='a@3' is not skew=RANK@STEP"),
        ("slowly=1", "unknown fault 'slowly'"),
        ("slow=2", "slow='2' is not slow=F@RANK with a factor F >= 1"),
        ("slow=0.5@1", "slow='0.5@1' is not slow=F@RANK with a factor F >= 1"),
        ("slow=x@1", "slow='x@1' is not slow=F@RANK with a factor F >= 1"),
        ("slow=2@r", "slow='2@r' is not slow=F@RANK with a factor F >= 1"),
    ],
)
def test_a_malformed_fault_names_the_variable_and_the_value(value, detail):
    with pytest.raises(HookError) as err:
        testhooks.parse({"LEPTON_FAULT": value})
    message = str(err.value)
    assert message.startswith(f"LEPTON_FAULT={value!r}: ") and detail in message
    assert "\n" not in message and err.value.variable == "LEPTON_FAULT"


def test_fail_once_must_be_a_directory(tmp_path):
    (tmp_path / "file").touch()
    with pytest.raises(HookError, match=r"LEPTON_FAIL_ONCE=.*file.*not a directory"):
        testhooks.parse({"LEPTON_FAIL_ONCE": str(tmp_path / "file")})
    hooks = testhooks.parse({"LEPTON_FAIL_ONCE": str(tmp_path / "new")})  # created on first use
    assert hooks.fail_once.directory == tmp_path / "new" and hooks.active


def test_the_environment_is_read_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LEPTON_FAULT", "delay=0.5")
    monkeypatch.setenv("LEPTON_FAIL_ONCE", str(tmp_path))
    loaded = testhooks.load()
    monkeypatch.setenv("LEPTON_FAULT", "delay=9")  # too late: nothing reads it again
    assert testhooks.hooks() is loaded
    assert FaultHooks.from_env() is loaded.faults and faults.FaultHooks is FaultHooks
    assert FaultHooks.from_env().delay == 0.5
    assert FailOnce.from_env() is loaded.fail_once
    line = "test hooks active: LEPTON_FAULT=delay=0.5 LEPTON_FAIL_ONCE=" + str(tmp_path)
    assert loaded.announcement() == line


def run_cli_guarded(func):
    return cli.run_guarded(func, argparse.Namespace(needs_mpi=False))


def test_the_cli_announces_active_hooks_once_at_start(monkeypatch, capsys):
    monkeypatch.setenv("LEPTON_FAULT", "delay=0.25")
    seen = []
    assert run_cli_guarded(lambda args, comm, log: seen.append(FaultHooks.from_env().delay)) == 0
    assert seen == [0.25]
    err = capsys.readouterr().err
    assert err == "lepton: warning: test hooks active: LEPTON_FAULT=delay=0.25\n"


def test_the_cli_refuses_a_malformed_hook_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("LEPTON_FAULT", "delay=soon")
    ran = []
    assert run_cli_guarded(lambda args, comm, log: ran.append(1)) == 2
    assert not ran
    err = capsys.readouterr().err
    assert err == (
        "lepton: error: LEPTON_FAULT='delay=soon': delay='soon' is not a number of seconds >= 0\n"
    )


def test_no_hooks_no_line(capsys):
    assert run_cli_guarded(lambda args, comm, log: 0) == 0
    assert capsys.readouterr().err == ""


def test_raise_may_repeat_and_once_fires_each_fault_on_one_attempt_only(tmp_path):
    spec = f"raise=1@5,raise=0@9,once={tmp_path / 'marks'}"
    first = testhooks.parse({"LEPTON_FAULT": spec}).faults
    assert first.raises == ((1, 5), (0, 9)) and first.raise_at == (1, 5)
    assert first.before_step(0, 5) == 5  # another rank: nothing
    with pytest.raises(RuntimeError, match="rank 1 at step 5"):
        first.before_step(1, 5)
    again = testhooks.parse({"LEPTON_FAULT": spec}).faults  # the restarted job
    assert again.before_step(1, 5) == 5  # already fired once
    with pytest.raises(RuntimeError, match="rank 0 at step 9"):
        again.before_step(0, 9)
    assert sorted(p.name for p in (tmp_path / "marks").iterdir()) == ["raise-0@9", "raise-1@5"]
    assert testhooks.parse({"LEPTON_FAULT": "raise=1@5"}).faults.once is None


def test_once_needs_a_directory():
    with pytest.raises(HookError, match="once= needs a directory"):
        testhooks.parse({"LEPTON_FAULT": "raise=1@5,once="})
