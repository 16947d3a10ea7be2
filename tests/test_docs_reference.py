"""The reference pages cannot drift from the code: docs/cli.md names every command and option
of the ``asgd`` command line, docs/config.md every configuration key with its default, and
neither documents one that is gone.

    python -m pytest -q tests/test_docs_reference.py

Both sides are read from the code as it is (the click command tree of ``asgd.cli``, the
dataclasses of ``asgd.config``), so a key or option added on any branch is checked without a
list to keep here. Neither walk imports torch.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "cli.md"
CONFIG_MD = ROOT / "docs" / "config.md"


# ---------------------------------------------------------------------------------------------
# The command line


def commands(group: click.Command, path: tuple = ("asgd",)):
    """(path, command) for the group and every command below it, depth first."""
    yield path, group
    if isinstance(group, click.Group):
        ctx = click.Context(group)
        for name in group.list_commands(ctx):     # the server's and worker's load by name
            yield from commands(group.get_command(ctx, name), path + (name,))


def options(cmd: click.Command) -> list[str]:
    """The option names of a command (``--set``, ``-h`` aside: help is on every command)."""
    names = []
    for p in cmd.params:
        if isinstance(p, click.Option):
            names += [o for o in p.opts + p.secondary_opts if o.startswith("--")]
    return names


def cli_sections(text: str) -> dict[str, str]:
    """The text under each ``## asgd ...`` heading, keyed by every command it names: a heading
    ``## asgd export and asgd predict`` holds both."""
    out = {}
    parts = re.split(r"^## (.*)$", text, flags=re.M)
    for heading, body in zip(parts[1::2], parts[2::2]):
        for name in re.findall(r"asgd(?: [a-z][a-z-]*)?", heading):
            out[name] = out.get(name, "") + body
    return out


def test_every_command_and_option_is_in_docs_cli():
    import asgd.cli

    text = CLI_MD.read_text()
    sections = cli_sections(text)
    missing = []
    for path, cmd in commands(asgd.cli.cli):
        name = " ".join(path)
        if len(path) == 1:                      # the group's own options: anywhere on the page
            where = text
        elif len(path) == 2:
            if name not in sections:
                missing.append(f"command `{name}` has no `## {name}` section")
                continue
            where = sections[name]
        else:                                   # `asgd experiment staleness`: in its parent's
            where = sections.get(" ".join(path[:2]), "")
            if not re.search(rf"(?<![\w-]){re.escape(path[-1])}(?![\w-])", where):
                missing.append(f"command `{name}` is not named under `## {' '.join(path[:2])}`")
        for opt in options(cmd):
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", where):
                missing.append(f"option `{opt}` of `{name}` is not documented")
    assert not missing, "docs/cli.md is behind the code:\n  " + "\n  ".join(missing)


def test_docs_cli_documents_nothing_that_is_gone():
    import asgd.cli

    known = {" ".join(p): cmd for p, cmd in commands(asgd.cli.cli)}
    text = CLI_MD.read_text()
    stale = []
    for heading, body in zip(*[iter(re.split(r"^## (.*)$", text, flags=re.M)[1:])] * 2):
        names = re.findall(r"asgd(?: [a-z][a-z-]*)?", heading)
        if not names:
            continue
        gone = [n for n in names if n not in known]
        stale += [f"section for `{n}`, which is no command" for n in gone]
        # every option a table row of the section names (its first cell) must be taken by one
        # of the commands of its heading or their subcommands
        opts = {o for n in names if n in known
                for _, c in commands(known[n], tuple(n.split())) for o in options(c)}
        for row in re.findall(r"^\| `(--[a-z][\w-]*)", body, flags=re.M):
            if row not in opts and not gone:
                stale.append(f"`{heading}` documents `{row}`, which no command of it takes")
    assert not stale, "docs/cli.md documents what the code no longer has:\n  " + \
        "\n  ".join(stale)


# ---------------------------------------------------------------------------------------------
# The configuration


def config_keys(cls=None, prefix: str = "") -> dict[str, object]:
    """Every dotted key of the configuration with its default, nested sections flattened
    (``data.augment.shift``): a field whose default is a dataclass is a section."""
    from asgd.config import Config

    out = {}
    for f in dataclasses.fields(cls or Config):
        key = prefix + f.name
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:                                   # no default: documented with an empty cell
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(default):
            out.update(config_keys(type(default), key + "."))
        else:
            out[key] = default
    return out


def documented_keys() -> dict[str, str]:
    """``key -> default`` from the rows of docs/config.md's tables (`| `key` | `default` |`)."""
    rows = re.findall(r"^\| `([a-z_]+(?:\.[a-z_]+)+)` \| `([^`]*)` \|", CONFIG_MD.read_text(),
                      flags=re.M)
    out = {}
    for key, default in rows:
        assert key not in out, f"docs/config.md documents `{key}` twice"
        out[key] = default
    return out


def same_default(text: str, value) -> bool:
    """Whether the documented default (YAML, as a config file would spell it) is the code's."""
    if value is dataclasses.MISSING:
        return text == ""
    parsed = yaml.safe_load(text) if text != '""' else ""
    if isinstance(value, float) and isinstance(parsed, str):    # YAML 1.1 reads 1e-8 as text
        try:
            parsed = float(parsed)
        except ValueError:
            return False
    if isinstance(value, bool) or isinstance(parsed, bool):
        return parsed is value
    return parsed == value


def test_every_config_key_is_in_docs_config_with_its_default():
    keys = config_keys()
    docs = documented_keys()
    problems = [f"`{k}` (default {v!r}) is not documented" for k, v in keys.items()
                if k not in docs]
    problems += [f"`{k}` is documented with default `{docs[k]}`, the code has {v!r}"
                 for k, v in keys.items() if k in docs and not same_default(docs[k], v)]
    problems += [f"`{k}` is documented but is no configuration key" for k in docs
                 if k not in keys]
    assert not problems, "docs/config.md is out of step with asgd/config/:\n  " + \
        "\n  ".join(problems)


def test_the_checks_catch_drift():
    """The parsers above find what they must: a renamed key, a changed default, an option or a
    command that is gone (so a broken regular expression cannot pass everything)."""
    assert same_default("1e-8", 1e-8) and same_default("10", 10.0)
    assert same_default('""', "") and same_default("null", None)
    assert same_default("[0.9, 0.999]", [0.9, 0.999]) and same_default("{}", {})
    assert not same_default("true", 1) and not same_default("0.01", 0.02)
    assert not same_default("false", None)
    sections = cli_sections("## asgd export and asgd predict\n| `--out FILE` |\n"
                            "## The run directory\n")
    assert set(sections) == {"asgd export", "asgd predict"}
    keys = config_keys()
    assert "data.augment.shift" in keys and "run.workers" in keys
    assert "data.augment" not in keys        # a section, not a key
    assert "server.spin.us" in keys and "worker.exchange.overlap" in keys   # sub-sections
    assert "server.spin" not in keys and "worker.exchange" not in keys
