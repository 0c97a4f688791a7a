"""Parse layer: what kind of input a file is, before any parser reads it.

``identify(text)`` names the input (an iptables dump, nothing at all, binary data, a Cilium
service list, ``nft list ruleset``, an environment file ...) so that input of another kind gets a
message naming it instead of a cascade of parse errors or a silent "No findings.". A new input
format (Cilium, ip route) adds its recogniser to ``RECOGNISERS`` and its reader to the CLI.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, slots=True)
class InputKind:
    """``name`` is ``iptables`` for input the iptables parser reads; any other name is input
    synack cannot analyse as a dump, and ``message`` says what it is and what to give instead."""

    name: str
    message: str = ""

    @property
    def iptables(self) -> bool:
        return self.name == "iptables"


IPTABLES = InputKind("iptables")

# how much of the input the recognisers look at: the kind shows in the first lines
_HEAD = 16384

_CILIUM_SERVICE_HEADER = re.compile(r"(?m)^[\t ]*ID[\t ]+Frontend[\t ]+Service Type[\t ]+Backend")
_CILIUM_SERVICE_ROW = re.compile(
    r"(?m)^[\t ]*\d+[\t ]+\[?[0-9a-fA-F:.]+\]?:\d+(?:/\w+)?(?:/i)?[\t ]+"
    r"(?:ClusterIP|NodePort|ExternalIPs|LoadBalancer|HostPort|LocalRedirect)\b")
_CILIUM_BACKEND_ROW = re.compile(r"(?m)^[\t ]*\d+ => \[?[0-9a-fA-F:.]+\]?:\d+")
_BPF_LB_HEADER = re.compile(r"(?m)^[\t ]*(?:SERVICE ADDRESS|ID)[\t ]+BACKEND ADDRESS")
_CILIUM_JSON = re.compile(r'"(?:frontend-address|backend-addresses)"\s*:')
_NFT = re.compile(r"(?m)^[\t ]*table[\t ]+(?:ip|ip6|inet|arp|bridge|netdev)[\t ]+\S+[\t ]*\{")
_ENV_YAML = re.compile(r"(?m)^namespaces[\t ]*:[\t ]*(?:#.*)?$")
_CONTENT = re.compile(r"(?m)^[^\S\n]*[^\s#]")  # a line with something other than blanks or a comment
_IPTABLES_LINE = re.compile(r"(?m)^[\t ]*(?:\*[a-z]|:[^\s]+ |-[AINPXFDR] |COMMIT\b|(?:sudo[\t ]+)?ip6?tables)")


# control codes but blanks and line ends, and bytes that were not UTF-8 (surrogate-escaped)
_ODD = re.compile("[\x00-\x08\x0e-\x1f\udc80-\udcff]")


def _binary(head: str) -> bool:
    """NUL bytes, or more than 1 in 20 characters that are control codes or bytes that are not
    UTF-8 (surrogate-escaped): not text anyone wrote or a tool printed."""
    if "\x00" in head:
        return True
    return len(_ODD.findall(head)) * 20 > len(head)


def _save_lines_only(head: str) -> bool:
    """Every line of ``head`` is blank or an iptables-save line ('#', '*TABLE', ':CHAIN', '-A ...',
    COMMIT): no pattern of parse.cilium.detect_cilium can match such lines (its headers, rows and
    map entries start with a letter or a digit, its txtar markers with '-- '), so a dump need not
    import the Cilium parser to be told apart.

    >>> _save_lines_only("*nat\\n:X - [0:0]\\n-A X -j ACCEPT\\nCOMMIT\\n"), _save_lines_only("-- a --\\n")
    (True, False)
    """
    for raw in head.splitlines():
        s = raw.strip()
        if s and not (s[0] in "#*:" or (s[:3] == "-A " and s[-2:] != "=>") or s == "COMMIT"):
            return False
    return True


def _cilium(head: str) -> InputKind | None:
    """Any dump analyzer/parse/cilium.py reads (service list, bpf lb list, statedb tables, status,
    JSON, txtar): ``synack parse``/``lint`` read it on its own; explain does not walk it yet."""
    if _save_lines_only(head):
        found = False
    else:
        from analyzer.parse.cilium import detect_cilium
        found = detect_cilium(head) is not None
    if not found and not (_CILIUM_SERVICE_HEADER.search(head)
                          or _CILIUM_SERVICE_ROW.search(head) or _BPF_LB_HEADER.search(head)):
        return None
    if _BPF_LB_HEADER.search(head):
        name, what = "cilium-bpf-lb-list", "a Cilium BPF load-balancer map (`cilium bpf lb list`)"
    elif _CILIUM_JSON.search(head):
        name, what = "cilium-service-json", "Cilium service JSON (`cilium service list -o json`)"
    elif _CILIUM_SERVICE_HEADER.search(head) or _CILIUM_SERVICE_ROW.search(head) \
            or len(_CILIUM_BACKEND_ROW.findall(head)) >= 2:
        name, what = "cilium-service-list", "a Cilium service list (`cilium service list`)"
    else:
        name, what = "cilium", "a Cilium dump"
    return InputKind(name, f"this is {what}, not an iptables dump: `synack parse` and `synack lint` "
                     "read it on its own (not mixed with iptables dumps); explain does not walk "
                     "Cilium dumps yet (docs/cilium.md)")


def _nft(head: str) -> InputKind | None:
    if _NFT.search(head) and not _IPTABLES_LINE.search(head):
        return InputKind("nft", "this is `nft list ruleset` output, not an iptables dump: give synack "
                         "`iptables-save` (and `ip6tables-save`) output, which reads the same rules "
                         "when iptables-nft wrote them")
    return None


def _environment(head: str) -> InputKind | None:
    if _ENV_YAML.search(head):
        return InputKind("environment", "this is a synack environment file, not an iptables dump: "
                         "did you mean --env?")
    return None


# in order; the first that recognises the text names it
RECOGNISERS: list[Callable[[str], InputKind | None]] = [
    _cilium, _nft, _environment,
]


def identify(text: str) -> InputKind:
    """The kind of an input.

    >>> identify("").name, identify("# Generated by iptables-save\\n").name
    ('empty', 'empty')
    >>> identify("*filter\\n:INPUT ACCEPT [0:0]\\nCOMMIT\\n").name
    'iptables'
    >>> identify("table inet filter {\\n\\tchain input {\\n\\t}\\n}\\n").name
    'nft'
    >>> identify("\\x7fELF\\x02\\x01\\x01\\x00\\x00").name
    'binary'
    """
    if not text:
        return InputKind("empty", "the input is empty (0 bytes): nothing was read. A non-root "
                         "`iptables-save` prints nothing (run it with sudo); `--live` on a host "
                         "whose rules live in the other backend reads nothing (try --backend)")
    head = text[:_HEAD]
    if _binary(head):
        return InputKind("binary", "binary data, not a text dump (no bytes are shown): give synack "
                         "the text `iptables-save` prints")
    if _CONTENT.search(text) is None:
        what = "only blank lines" if not text.strip() else "only comments"
        return InputKind("empty", f"the input has {what}, no table and no rule: nothing was read. "
                         "A non-root `iptables-save` prints nothing (run it with sudo)")
    for recognise in RECOGNISERS:
        kind = recognise(head)
        if kind is not None:
            return kind
    return IPTABLES
