"""The help is generated from the code: a command added to cli.COMMANDS or a builder added to
data.builders.BUILDERS appears in it with nothing else to edit."""

from __future__ import annotations

import inspect
from pathlib import Path

from mmpretrain import cli
from mmpretrain.data import builders


def test_a_new_command_appears_in_mmpretrain_help(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "caption", (cli._train, "train", "caption images with a trained model"))
    lines = cli.usage().splitlines()
    assert "  caption        caption images with a trained model" in lines
    for name in [*cli.COMMANDS, *cli.PLAIN_COMMANDS]:
        assert any(line.startswith(f"  {name} ") for line in lines), name


def test_a_new_builder_appears_with_its_options_and_defaults(monkeypatch):
    def build_rain(out: str | Path, seed: int = 0, drops: int = 300) -> Path:
        """Write rain drops as shards."""
        return Path(out)

    monkeypatch.setitem(builders.BUILDERS, "rain", build_rain)
    monkeypatch.setitem(builders.OPTIONS, "rain", ("seed", "drops"))
    assert "rain" in cli.usage().splitlines()[-1]
    lines = cli.data_usage().splitlines()
    i = next(i for i, line in enumerate(lines) if line.split()[:1] == ["rain"])
    assert lines[i].split(None, 1)[1] == "Write rain drops as shards."  # its docstring, as no ABOUT line
    assert lines[i + 1].split() == ["seed=0", "drops=300"]  # conf/build_data.yaml's seed, the builder's drops


def test_every_builder_option_is_one_the_builder_takes():
    for name, fn in builders.BUILDERS.items():
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key in builders.OPTIONS.get(name, builders.DEFAULT_OPTIONS):
            assert takes_any or ("src" if key == "in" else key) in params, (name, key)
