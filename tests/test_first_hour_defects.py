"""The first hour's defects (issue 23), each on what a new user runs: misspelt keys, data
sets the built-in loop cannot train, CUDA asked for where there is none, a worker that cannot
train, the live display, the help texts, the experiments' summary, the export's file names
and a server's spent budget."""
from __future__ import annotations

import pytest

from asgd.config import ConfigError, load_config


# ----------------------------------------------------------------------------------------------
# a misspelt key

@pytest.mark.parametrize("override, hint", [
    ("optimizr.lr=1", "did you mean optimizer.lr?"),
    ("optimizer.lrr=1", "did you mean optimizer.lr?"),
    ("run.max_update=10", "did you mean run.max_updates?"),
    ("data.augmnt.shift=1", "did you mean data.augment.shift?"),
])
def test_a_misspelt_override_gets_a_did_you_mean(override, hint):
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(None, [override])
    assert hint in str(e.value)


def test_a_misspelt_yaml_key_gets_a_did_you_mean(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean optimizer.lr[?]"):
        load_config(path)
    path.write_text("optimizr:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean optimizer[?]"):
        load_config(path)
    path.write_text("optimizer:\n  zzzzzz: 0.1\n")
    with pytest.raises(ConfigError) as e:     # nothing close: no guess
        load_config(path)
    assert "did you mean" not in str(e.value)
