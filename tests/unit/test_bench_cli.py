"""`make bench` runs `python -m bench` with no arguments: every benchmark."""

from __future__ import annotations

import pytest

from bench.__main__ import parse_args


def test_no_arguments_means_every_benchmark():
    assert parse_args([]).which == ["observer", "reconciler", "prepuller"]


def test_one_benchmark_by_name():
    args = parse_args(["reconciler", "--rounds", "2"])
    assert args.which == ["reconciler"] and args.rounds == 2


def test_an_unknown_benchmark_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["observer", "observr"])
    assert exit_.value.code == 2
    assert "no benchmark named observr (choose from observer, reconciler, prepuller)" in \
        capsys.readouterr().err
