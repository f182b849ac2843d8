"""The user documentation (README.md, deploy/README.md) and the deployment files against the real CLI.

Every `uniql <command>` a document or a deployment file shows must use flags that command has (and the numeric
defaults the CLI synopsis shows must be the parser's); a documented `curl` to a server started with `--api-key`
must send that key; and a documented Prometheus run must not collide with the service Debian's package starts.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest
import yaml
from deploy_util import DEPLOY, REPO

DOCS = {"README.md": REPO / "README.md", "deploy/README.md": DEPLOY / "README.md"}
COMMAND = re.compile(r"\buniql(?:\.cli)? (compress|finetune|eval|info|generate|bench|serve)\b(.*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def parsers() -> dict[str, argparse.ArgumentParser]:
    from uniql.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return dict(parser._option_string_actions)


def fenced_blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


def logical_lines(block: str) -> list[str]:
    """Shell lines with `\\` continuations joined, and the CLI synopsis' indented `[...]` lines joined to theirs."""
    out: list[str] = []
    for line in block.splitlines():
        if out and (out[-1].endswith("\\") or re.match(r"\s+\[", line)):
            out[-1] = out[-1].rstrip("\\") + " " + line.strip()
        else:
            out.append(line)
    return [re.split(r"\s#\s", line)[0] for line in out]  # drop shell comments


def inline_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks (a span may wrap over a line end)."""
    return [m.group(1).replace("\n", " ") for m in re.finditer(r"`([^`]+)`", FENCE.sub("", text))]


def documented_commands(text: str) -> list[tuple[str, str]]:
    """(subcommand, the rest of its command line) for every `uniql <subcommand>` a document shows."""
    found = []
    for line in [ln for b in fenced_blocks(text) for ln in logical_lines(b)] + inline_spans(text):
        for m in COMMAND.finditer(line):
            found.append((m.group(1), re.split(r"\s&&\s|;\s|\s&(?:\s|$)", m.group(2))[0]))
    return found


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_documented_commands_use_real_flags(doc):
    subs = parsers()
    commands = documented_commands(DOCS[doc].read_text())
    assert commands, f"no `uniql` command found in {doc}"
    for sub, rest in commands:
        unknown = set(FLAG.findall(rest)) - set(options(subs[sub]))
        assert not unknown, f"{doc}: `uniql {sub}` has no {sorted(unknown)} (in {rest.strip()!r})"


def test_readme_synopsis_defaults_are_the_parsers():
    """`[--lora-rank 8]` in the CLI synopsis is the parser's default."""
    subs = parsers()
    checked = 0
    for sub, rest in documented_commands(DOCS["README.md"].read_text()):
        for flag, value in re.findall(r"\[(--[a-z][a-z0-9-]*) (-?\d+(?:\.\d+)?)[\]\s]", rest):
            default = options(subs[sub])[flag].default
            assert default is not None and float(default) == float(value), \
                f"README: `uniql {sub} [{flag} {value}]` but its default is {default!r}"
            checked += 1
    assert checked >= 4  # --lora-rank, --lora-alpha, --lora-dropout, --rung-decay


def test_readme_server_section_flags_and_defaults():
    """Each flag the Server section names is a `uniql serve` flag; "`--port` (8000)" is its default."""
    text = DOCS["README.md"].read_text()
    section = text[text.index("\n## Server"):text.index("\n## ", text.index("\n## Server") + 1)]
    serve = options(parsers()["serve"])
    named = {m.split()[0] for m in re.findall(r"`(--[a-z][a-z0-9-]*[^`]*)`", section)}
    assert {"--host", "--port", "--memory-reserve"} <= named
    assert named <= set(serve), f"not `uniql serve` flags: {sorted(named - set(serve))}"
    for flag, value in re.findall(r"`(--[a-z][a-z0-9-]*)` \(([^)\s]*\d[^)\s]*)\)", section):
        assert str(serve[flag].default) == value, f"README: {flag} ({value}) but the default is {serve[flag].default}"
    reserve = re.search(r"`--memory-reserve SIZE`[^`]*default (\w+)", section).group(1)
    assert reserve == serve["--memory-reserve"].default


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_curl_examples_send_the_servers_api_key(doc):
    """A block that starts `uniql serve --api-key K` must show requests that send K (else they get a 401)."""
    for block in fenced_blocks(DOCS[doc].read_text()):
        key = re.search(r"uniql serve\b[^\n]*--api-key (\S+)", block)
        if key is None:
            continue
        for line in logical_lines(block):
            if "curl" in line and "/v1/" in line:
                assert re.search(rf"(?i)(bearer|x-api-key:)\s*{re.escape(key.group(1))}\b", line), \
                    f"{doc}: the server needs --api-key {key.group(1)}, this request does not send it: {line}"


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_prometheus_runs_do_not_collide_with_the_packaged_service(doc):
    """Debian's `prometheus` package starts its service on :9090 at install; a second one on 9090 cannot bind."""
    for block in fenced_blocks(DOCS[doc].read_text()):
        installs = re.search(r"apt-get install[^\n]*\bprometheus\b", block)
        runs = re.search(r"^\s*prometheus\s+--", block, flags=re.M)
        if installs and runs:
            stop = re.search(r"systemctl (disable --now|stop) prometheus", block)
            assert stop and stop.start() < runs.start(), \
                f"{doc}: runs its own Prometheus after installing the package, whose service holds port 9090"


# ------------------------------------------------------------------------------------------ deployment files
def deployed_serve_commands() -> dict[str, list[str]]:
    """Every `uniql serve` argument list of the images, the compose file and the systemd unit."""
    out = {}
    images = {"Dockerfile.jetson": REPO / "Dockerfile.jetson", "deploy/Dockerfile": DEPLOY / "Dockerfile"}
    for name, path in images.items():
        text = path.read_text()
        assert 'ENTRYPOINT ["uniql", "serve"]' in text, name
        out[name] = json.loads(re.search(r"^CMD (\[.*\])$", text, flags=re.M).group(1))
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    out["docker-compose.yml"] = compose["services"]["uniql"]["command"]
    unit = (DEPLOY / "uniql.service").read_text()
    out["uniql.service"] = re.search(r"^ExecStart=\S+/uniql serve (.*)$", unit, flags=re.M).group(1).split()
    return out


def test_deployment_files_use_real_serve_flags():
    serve = options(parsers()["serve"])
    for name, args in deployed_serve_commands().items():
        flags = {a for a in args if a.startswith("--")}
        assert flags <= set(serve), f"{name}: `uniql serve` has no {sorted(flags - set(serve))}"
        assert args[args.index("--port") + 1] == "8000", name  # what prometheus.yml and the healthchecks use
