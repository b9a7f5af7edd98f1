"""etc/sudoers.d/nvmeof_mp: it lets oslo.privsep start our context, and nothing else."""

import os
import re
import shutil
import subprocess

import pytest

RULE = os.path.join(os.path.dirname(__file__), "..", "etc", "sudoers.d", "nvmeof_mp")


def rule_regex():
    with open(RULE) as f:
        alias = next(line for line in f if line.startswith("Cmnd_Alias"))
    command, args = alias.split("=", 1)[1].strip().split(" ", 1)
    return command, re.compile(args)


def privsep_argv(monkeypatch, helper):
    """The command oslo.privsep really builds for our context with helper_command set."""
    from nvmeof_mp import privileged
    monkeypatch.setattr(privileged.default.conf, "helper_command", "sudo -n " + helper,
                        raising=False)
    return privileged.default.helper_command("/tmp/tmpab12cd34/privsep.sock")


def test_the_rule_allows_the_command_oslo_privsep_builds(monkeypatch):
    command, args = rule_regex()
    argv = privsep_argv(monkeypatch, command)
    assert argv[:3] == ["sudo", "-n", command]
    assert args.fullmatch(" ".join(argv[3:]))


@pytest.mark.parametrize("args", [
    "--privsep_context os_brick.privileged.default --privsep_sock_path /tmp/x/privsep.sock",
    "--privsep_context nvmeof_mp.privileged.default --privsep_sock_path /tmp/x/privsep.sock "
    "--privsep_context os_brick.privileged.default",
    "--privsep_context nvmeof_mpXprivileged.default --privsep_sock_path /tmp/x/privsep.sock",
    "--config-file /home/evil.conf --privsep_context nvmeof_mp.privileged.default "
    "--privsep_sock_path /tmp/x/privsep.sock",
    "--privsep_context nvmeof_mp.privileged.default --privsep_sock_path /tmp/x/privsep.sock "
    "--config-file /home/evil.conf",
])
def test_the_rule_refuses_any_other_context_or_extra_argument(args):
    _, regex = rule_regex()
    assert not regex.fullmatch(args)


@pytest.mark.skipif(not shutil.which("visudo"), reason="sudo is not installed")
def test_the_rule_is_valid_sudoers():
    out = subprocess.run(["visudo", "-cf", RULE], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
