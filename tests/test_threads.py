"""The thread policy: what it chooses, how it is overridden, and that it says so."""

import pytest
import torch

from vlafast import _threads
from vlafast.cli import main


def test_choice_order_and_validation(monkeypatch):
    monkeypatch.delenv(_threads.ENV, raising=False)
    monkeypatch.setattr(_threads, "available_cores", lambda: 2)
    assert _threads.choose(None) == (1, "default for 2 cores")  # a 2-core machine: one thread
    monkeypatch.setattr(_threads, "available_cores", lambda: 64)
    assert _threads.choose(None)[0] == 8  # at most 8 by default
    monkeypatch.setenv(_threads.ENV, "3")
    assert _threads.choose(None) == (3, _threads.ENV)
    assert _threads.choose(5) == (5, "--threads")  # the option wins over the environment
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(_threads.ENV, bad)
        with pytest.raises(ValueError, match=f"VLAFAST_THREADS must be an integer >= 1, got '{bad}'"):
            _threads.choose(None)
    with pytest.raises(ValueError, match="--threads must be an integer >= 1, got 0"):
        _threads.choose(0)


def test_configure_sets_torch_and_the_cli_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(_threads.ENV, raising=False)
    before = torch.get_num_threads()
    try:
        line = _threads.configure(2)
        assert torch.get_num_threads() == 2 and "torch uses 2 CPU threads (--threads" in line
        assert main(["-v", "--threads", "1", "eval", "--policy", str(tmp_path / "none")]) == 2
        captured = capsys.readouterr().err
        assert "torch uses 1 CPU thread (--threads" in captured and torch.get_num_threads() == 1
        assert main(["--threads", "0", "eval", "--policy", str(tmp_path)]) == 2
        assert "--threads must be an integer >= 1, got 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
