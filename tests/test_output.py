"""Output people can act on: findings that explain reports, grouping, SARIF, colour, help text."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import jsonschema
import pytest

from _golden import ROOT, run
from analyzer import DOCS_URL
from analyzer.checks import load_all
from analyzer.cli import build_parser, main
from analyzer.codes import all_codes

README_FIRST = ["explain", "samples/seed1-hairpin-host.rules", "--flow", "tcp 10.4.26.45:35582 -> 10.4.26.234:80",
                "--from-iface", "eth0", "--addr", "10.4.26.1/24@eth0"]


def test_explain_reports_the_finding_it_shows_and_exits_1():
    rc, out, err = run(README_FIRST)
    assert rc == 1, err
    assert "NOT what it dialled" in out and "NAT001 [error]" in out
    assert "seed1-hairpin-host.rules:11:" in out  # points at the DNAT rule
    rc, out, _ = run(README_FIRST + ["-o", "json"])
    assert rc == 1
    assert [d["code"] for d in json.loads(out)["diagnostics"]] == ["NAT001"]


def test_explain_clean_flow_exits_0():
    rc, out, _ = run(["explain", "samples/explain/dnat-masquerade.rules", "--flow", "tcp 10.0.1.2:41000 -> 10.0.1.1:80",
                      "--from-iface", "sk1b", "--addr", "10.0.1.1/24@sk1b", "--addr", "10.0.2.1/24@sk2b"])
    assert rc == 0 and "NAT00" not in out


# ------------------------------------------------------------------------ grouping
OLD_NEGATION = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n" + \
    "".join(f"-A POSTROUTING -s 192.168.{i}.0/24 -d ! 192.168.{i}.0/24 -j MASQUERADE\n" for i in range(12)) + "COMMIT\n"


@pytest.fixture
def old_negation(tmp_path):
    p = tmp_path / "old.rules"
    p.write_text(OLD_NEGATION)
    return str(p)


def test_repeated_diagnostics_are_one_finding_with_a_count(old_negation):
    rc, out, _ = run(["lint", old_negation])
    assert rc == 1
    assert out.count("PRS019") == 1 and "(12 times)" in out
    assert "note: 11 more like this in" in out and "lines 7, 8, 9, 10, 11 and 6 more" in out
    assert out.rstrip().endswith("Found 1 error (12 occurrences).")
    rc, out, _ = run(["lint", old_negation, "--no-group"])
    assert out.count("PRS019 [error]") == 12
    rc, out, _ = run(["lint", old_negation, "-o", "json"])
    [d] = json.loads(out)["diagnostics"]
    assert d["count"] == 12 and [s["line"] for s in d["also"]] == [7, 8, 9, 10, 11]
    rc, out, _ = run(["lint", old_negation, "-o", "sarif"])
    [r] = json.loads(out)["runs"][0]["results"]
    assert r["properties"]["count"] == 12 and len(r["relatedLocations"]) == 5
    rc, out, _ = run(["parse", old_negation])
    assert out.count("PRS019") == 1 and "12 error(s)" in out


CORPUS = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus"))
UGENT = CORPUS / "iptables" / "net-network" / "configs_ugent__iptables-save"


@pytest.mark.skipif(not UGENT.exists(), reason="corpus not present")
def test_174_old_negations_on_one_firewall_are_one_finding():
    rc, out, _ = run(["lint", str(UGENT), "-o", "json"])
    prs = [d for d in json.loads(out)["diagnostics"] if d["code"] == "PRS019"]
    assert [d["count"] for d in prs] == [174]


# ------------------------------------------------------------------------ SARIF
SCHEMA = json.loads((ROOT / "tests" / "data" / "sarif-schema-2.1.0.json").read_text())


def sarif_of(argv):
    rc, out, err = run(argv + ["-o", "sarif"])
    assert rc in (0, 1), err
    doc = json.loads(out)
    jsonschema.Draft4Validator(SCHEMA).validate(doc)
    return doc


@pytest.mark.parametrize("argv", [
    ["lint", "samples/seed1-hairpin-host.rules"],
    ["lint", "--env", "samples/env/seed1-broken.yaml"],      # related locations, NAT findings
    ["lint", "samples/checks/CHN005/bad.rules"],
], ids=["dump", "env", "chn005"])
def test_sarif_validates_against_the_2_1_0_schema(argv):
    doc = sarif_of(argv)
    driver = doc["runs"][0]["tool"]["driver"]
    assert driver["informationUri"].startswith("https://") and "example" not in driver["informationUri"]
    for rule in driver["rules"]:
        assert rule["helpUri"].startswith("https://"), rule


def test_grouped_sarif_validates(old_negation):
    sarif_of(["lint", old_negation])


def test_every_code_has_a_docs_page():
    for code, info in all_codes().items():
        assert info.help_uri.startswith(DOCS_URL)
        page, _, anchor = info.doc.partition("#")
        path = ROOT / page
        assert path.exists(), f"{code}: {page} missing"
        if anchor:
            assert f'id="{anchor}"' in path.read_text(), f"{code}: no anchor #{anchor} in {page}"


# ------------------------------------------------------------------------ checks and help
def test_check_summaries_are_whole_sentences():
    for code, info in load_all().items():
        assert info.summary.endswith((".", "?", "!", ")")), f"{code}: summary cut: {info.summary!r}"
    rc, out, _ = run(["checks"])
    flat = " ".join(out.split())
    for info in all_codes().values():
        assert " ".join(info.summary.split()) in flat, info.code


def _walk(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))
        elif not isinstance(action, (argparse._HelpAction,)):
            yield path, action


def test_every_option_has_help_text():
    missing = [f"{' '.join(p) or 'synack'} {a.option_strings or a.dest}" for p, a in _walk(build_parser())
               if not (a.help and a.help.strip())]
    assert missing == []


def test_malformed_dnat_of_two_iptables_versions_gets_version_advice(tmp_path):
    # kubernetes#114537: the host's iptables-save printing kube-proxy's newer DNAT revision
    p = tmp_path / "sep.rules"
    p.write_text("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
                 "-A PREROUTING -p tcp -m tcp -j DNAT --to-destination :0 --persistent --to-destination :0 "
                 "--persistent --to-destination 0.0.0.0:0\nCOMMIT\n")
    rc, out, _ = run(["lint", str(p), "-o", "json"])
    hints = {d["hint"] for d in json.loads(out)["diagnostics"] if d["code"] == "PRS022"}
    assert hints and all("same iptables version" in h and "bad merge" not in h for h in hints)


# ------------------------------------------------------------------------ explain text
def test_explain_opens_with_one_line_per_outcome():
    _, out, _ = run(README_FIRST)
    head = out.split("\n\n")[1].splitlines()
    assert head == ["1 outcome:", "  1. p=1.000 forwarded as tcp 10.4.26.45:35582 -> 10.4.26.11:80; client sees "
                    "tcp 10.4.26.11:80 -> 10.4.26.45:35582 (NOT what it dialled: RST)"]


def test_unknown_masquerade_address_is_said_not_zero():
    rc, out, _ = run(["explain", "samples/explain/dnat-masquerade.rules", "--flow", "tcp 10.0.1.2:41000 -> 10.0.1.1:80",
                      "--from-iface", "sk1b"])
    assert "0.0.0.0" not in out
    assert "MASQUERADE to <unknown: give --addr>" in out and "tcp <unknown: give --addr>:41000 -> 10.0.2.2:8080" in out


def test_approximate_lines_are_not_repeated():
    rc, out, _ = run(["explain", "samples/explain/dnat-masquerade.rules", "--flow", "tcp 10.0.1.2:41000 -> 10.0.1.1:80",
                      "--from-iface", "sk1b"])
    assert out.count("routing unknown: give --addr/--route or --iproute") == 1
    assert "approximate (every outcome): routing unknown" in out
    for block in out.split("\n\n"):
        lines = [l for l in block.splitlines() if "approximate" in l]
        assert len(lines) == len(set(lines))


def test_one_statement_about_conntrack_per_outcome():
    argv = (ROOT / "samples" / "explain" / "notrack-skips-nat.args").read_text()
    import shlex
    _, out, _ = run(["explain", *shlex.split(argv)])
    forward = out.split("  reply:")[0]
    assert forward.count("conntrack:UNTRACKED") == 1 and "conntrack: none" not in forward


# ------------------------------------------------------------------------ terminal
class _Tty(io.StringIO):
    def isatty(self):
        return True


def _run_tty(argv, monkeypatch, stdout_tty=True, stderr_tty=False):
    out, err = (_Tty() if stdout_tty else io.StringIO()), (_Tty() if stderr_tty else io.StringIO())
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_colour_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    rc, out, _ = _run_tty(["lint", "samples/checks/CHN005/bad.rules"], monkeypatch)
    assert rc == 1 and "\x1b[" in out and "[warning]" in out
    rc, out, _ = _run_tty(README_FIRST, monkeypatch)
    assert "\x1b[" in out
    rc, out, _ = _run_tty(["lint", "samples/checks/CHN005/bad.rules"], monkeypatch, stdout_tty=False)
    assert "\x1b[" not in out  # piped
    monkeypatch.setenv("NO_COLOR", "1")
    rc, out, _ = _run_tty(["lint", "samples/checks/CHN005/bad.rules"], monkeypatch)
    assert "\x1b[" not in out
    monkeypatch.delenv("NO_COLOR")
    rc, out, _ = _run_tty(["lint", "samples/checks/CHN005/bad.rules", "-o", "sarif"], monkeypatch)
    assert "\x1b[" not in out and json.loads(out)  # never in JSON/SARIF


def test_progress_bar_goes_to_a_terminal_stderr_only(monkeypatch):
    from analyzer.report.terminal import progress
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    err = _Tty()
    with progress(3, "checking", stream=err, stdout=_Tty(), delay=0) as tick:
        for code in ("CHN001", "CHN002", "CHN003"):
            tick.now(code)
            tick()
    assert "checking CHN003" in err.getvalue()
    for err, out in ((io.StringIO(), _Tty()), (_Tty(), io.StringIO())):  # stderr or stdout piped
        with progress(3, "checking", stream=err, stdout=out, delay=0) as tick:
            tick("CHN001")
        assert err.getvalue() == "" and out.getvalue() == ""
    monkeypatch.setenv("NO_COLOR", "1")
    err = _Tty()
    with progress(3, "checking", stream=err, stdout=_Tty(), delay=0) as tick:
        tick("CHN001")
    assert err.getvalue() == ""


def test_a_quick_run_never_shows_the_bar():
    from analyzer.report.terminal import progress
    err = _Tty()
    with progress(3, "checking", stream=err, stdout=_Tty(), delay=30) as tick:
        tick("CHN001")
    assert err.getvalue() == ""


@pytest.mark.parametrize("extra", [[], ["-q"], ["--quiet"], ["-o", "json"], ["-o", "sarif"]],
                         ids=["text", "q", "quiet", "json", "sarif"])
def test_lint_progress_bar_only_for_text_without_quiet(extra, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("SYNACK_PROGRESS_DELAY", "0")  # show it at once: the sample is quick
    rc, out, err = _run_tty(["lint", "samples/checks/KUB001/bad.rules", *extra], monkeypatch,
                            stdout_tty=True, stderr_tty=True)
    assert rc == 1 and "KUB001" in out
    if extra:
        assert err == ""
    else:
        assert "lint parsing bad.rules" in err and "lint checking KUB001" in err and "100%" in err
        assert "━" not in out  # the bar is on stderr only


def _lint_on_a_pty(argv, env):
    """Run synack as a person at a terminal does: stdout and stderr on one pseudo-terminal; what
    the terminal received."""
    import pty
    import select
    import subprocess
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "analyzer", *argv], stdin=slave, stdout=slave,
                            stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    got, deadline = b"", time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal (Linux: EIO)
                    break
                if not chunk:
                    break
                got += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, got.decode("utf-8", "replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminals as on Linux")
def test_lint_on_a_terminal_shows_a_progress_bar_then_erases_it():
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm-256color", SYNACK_PROGRESS_DELAY="0", PYTHONPATH=str(ROOT))
    rc, screen = _lint_on_a_pty(["lint", "samples/checks/KUB001/bad.rules"], env)
    assert rc == 1
    assert "lint parsing bad.rules" in screen and "lint checking KUB001" in screen and "100%" in screen
    bar_end = screen.rindex("100%")
    assert "KUB001" in screen[bar_end:]  # the findings come after the bar, which is erased
    rc, screen = _lint_on_a_pty(["lint", "--env", "samples/env/seed1-broken.yaml"], env)
    assert rc == 1 and "lint reading" in screen and "following services" in screen
    assert "NAT001" in screen[screen.rindex("100%"):]


def test_lint_piped_shows_no_progress_bar():
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm-256color", SYNACK_PROGRESS_DELAY="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "analyzer", "lint", "samples/checks/KUB001/bad.rules"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "KUB001" in proc.stdout
    assert proc.stderr == "" and "\x1b[" not in proc.stdout


def test_parse_command_leaves_its_model_at_exit_and_prints_all_it_says():
    """`synack parse` ends the process without freeing its model (cli.run): its output through a
    block-buffered pipe, and its exit code, are those of main() in process."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(ROOT)
    for argv in (["parse", "samples/checks/CHN001/bad.rules"], ["parse", "samples/checks/CHN001/good.rules"],
                 ["parse", "samples/checks/CHN001/bad.rules", "-o", "json"]):
        proc = subprocess.run([sys.executable, "-m", "analyzer", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        rc, out, err = run(argv)
        assert (proc.returncode, proc.stdout, proc.stderr) == (rc, out, err)
    assert rc == 1 and "CHN001" in out


def test_lint_json_is_clean_with_a_terminal_stderr(monkeypatch):
    rc, out, err = _run_tty(["lint", "--env", "samples/env/seed1-broken.yaml", "-o", "json"], monkeypatch,
                            stdout_tty=True, stderr_tty=True)
    assert "\x1b[" not in out and json.loads(out)["diagnostics"]


def test_explain_of_an_open_flow_reports_the_findings_of_its_groups():
    argv = ["explain", "samples/seed1-hairpin-host.rules", "--flow", "10.4.26.45 -> 10.4.26.234",
            "--from-iface", "eth0", "--addr", "10.4.26.1/24@eth0"]
    rc, out, _ = run(argv)
    assert rc == 1 and "NAT001 [error]" in out
    rc, out, _ = run(argv + ["-o", "json"])
    codes = [d["code"] for g in json.loads(out)["groups"] for d in g["diagnostics"]]
    assert rc == 1 and codes == ["NAT001"]


@pytest.mark.parametrize("by", ["fate", "path"])
def test_open_flow_progress_bar_counts_classes_either_grouping(by, monkeypatch):
    """The bar on a terminal's stderr counts the classes explored, grouped by fate (PREROUTING
    walked over sets, the rest explored from there) as by the rules crossed; stdout has none."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("SYNACK_PROGRESS_DELAY", "0")
    argv = ["explain", "samples/env/kubeproxy-node.rules", "--flow", "10.0.0.0/8 -> 10.96.0.0/12", "--from-iface",
            "eth0", "--addr", "10.244.0.1/24@cni0", "--group-by", by]
    rc, out, err = _run_tty(argv, monkeypatch, stderr_tty=True)
    assert rc == 1 and f"group(s) by {'fate' if by == 'fate' else 'rules crossed'} over" in out
    assert "explain: classes" in err and "explain: classes" not in out
