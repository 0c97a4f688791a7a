"""Report layer: policy check results as JUnit XML, one test case per assertion (what CI
systems show as a test report)."""
from __future__ import annotations

from xml.etree import ElementTree as ET


def render_junit(results, policy_path: str, target: str) -> str:
    """
    >>> print(render_junit([], "p.yaml", "d.rules").splitlines()[1])
    <testsuites name="synack check" tests="0" failures="0" errors="0">
    """
    fails = sum(1 for r in results if r.status == "fail")
    errs = sum(1 for r in results if r.status == "error")
    root = ET.Element("testsuites", name="synack check", tests=str(len(results)), failures=str(fails),
                      errors=str(errs))
    suite = ET.SubElement(root, "testsuite", name=f"{policy_path} @ {target}", tests=str(len(results)),
                          failures=str(fails), errors=str(errs), skipped="0")
    for r in results:
        a = r.assertion
        case = ET.SubElement(suite, "testcase", name=a.name, classname=f"synack.policy.{a.kind}",
                             file=a.span.path, line=str(a.span.line))
        if r.status == "pass":
            continue
        body = [r.message]
        for w in r.witnesses:
            if w.code:
                body.append(w.trace)
                continue
            body.append(f"witness: {w.flow}  (class: {w.packets})")
            body.append(f"fate: {w.fate}" + (f"  [rule at {w.span.path}:{w.span.line}]" if w.span else ""))
            if w.baseline is not None:
                body.append(f"baseline: {w.baseline}")
            body.append(w.trace.rstrip())
        el = ET.SubElement(case, "failure" if r.status == "fail" else "error",
                           message=r.message, type=f"{a.kind}/{a.severity.label}")
        el.text = "\n".join(body) + "\n"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")
