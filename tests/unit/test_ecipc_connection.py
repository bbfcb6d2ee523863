"""The ecipc connection's own setting: how long a caller polls for its answer before it
sleeps (``IPCBUS_ECIPC_SPIN_US``), read without a connection."""
from __future__ import annotations

import logging

import pytest

from ipcbus.ecipc._connection import _spin_setting


def test_the_spin_defaults_to_200_microseconds_on_several_cpus() -> None:
    assert _spin_setting({}, cpus=2) == pytest.approx(200e-6)


def test_the_spin_is_set_in_microseconds_and_zero_turns_it_off() -> None:
    assert _spin_setting({"IPCBUS_ECIPC_SPIN_US": "50"}, cpus=4) == pytest.approx(50e-6)
    assert _spin_setting({"IPCBUS_ECIPC_SPIN_US": "0"}, cpus=4) == 0.0
    assert _spin_setting({"IPCBUS_ECIPC_SPIN_US": "-3"}, cpus=4) == 0.0


def test_the_spin_is_off_on_one_cpu() -> None:
    assert _spin_setting({"IPCBUS_ECIPC_SPIN_US": "500"}, cpus=1) == 0.0


def test_a_bad_spin_value_is_told_and_the_default_used(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    with caplog.at_level(logging.WARNING, logger="ipcbus"):
        assert _spin_setting({"IPCBUS_ECIPC_SPIN_US": "fast"}, cpus=2) == pytest.approx(200e-6)
    assert "IPCBUS_ECIPC_SPIN_US='fast'" in caplog.text
