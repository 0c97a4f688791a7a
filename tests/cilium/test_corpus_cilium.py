"""Parse layer, Cilium: every Cilium dump of the corpus parses (or gets the located error it
deserves), and what the parser reads agrees with what the file shows, counted independently with
plain regular expressions, JSON, or (for Cilium's own LB tests) the Kubernetes objects in the
txtar archive."""
from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from analyzer.parse.cilium import parse_cilium

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus")) / "cilium"
FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file()) if CORPUS.is_dir() else []
needs_corpus = pytest.mark.skipif(not FILES, reason=f"corpus not found at {CORPUS}")

# the only diagnostics the corpus deserves: redacted addresses and a line cut mid-protocol
EXPECTED_DIAGS = {
    "cilium-issue-35518__service-list-redacted.txt": {("PRS203", 2), ("PRS203", 3), ("PRS203", 4),
                                                      ("PRS203", 5), ("PRS203", 7)},
    "cilium-pr-29055__service-list-frontend-as-id.txt": {("PRS202", 16)},
}


def parse(path: Path):
    return parse_cilium(path.read_text(), str(path))


def all_services(res):
    return [s for lst in res.dump.listings for s in lst.services]


def fe_text(s) -> str:
    return str(s.frontend) + ("/i" if s.scope == "internal" else "")


@needs_corpus
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_corpus_file_parses(path):
    res = parse(path)
    assert res.dump.listings, "nothing read"
    got = {(d.code, d.span.line) for d in res.diagnostics}
    assert got == EXPECTED_DIAGS.get(path.name, set())
    for d in res.diagnostics:
        assert d.span.path == str(path) and d.source_line is not None


# ------------------------------------------------------------------- service list (text)
_ROW = re.compile(r"^\s*(?:(\d+)\s+)?((?:\[[0-9a-f:.]+\]|\d+\.\d+\.\d+\.\d+):\d+(?:[/:][A-Za-z]+)*)\s")
_BACKEND = re.compile(r"(\d+) => (\S+)(?: \((\w+)\))?")
SERVICE_LISTS = [p for p in FILES if p.parent.name == "service-list"]


@needs_corpus
@pytest.mark.parametrize("path", SERVICE_LISTS, ids=[p.name for p in SERVICE_LISTS])
def test_service_list_matches_the_text(path):
    text = path.read_text()
    expected_fe, expected_be = [], []
    for line in text.splitlines():
        if "x.x" in line:
            continue  # the redacted rows are skipped (PRS203)
        m = _ROW.match(line + " ")
        if m:
            if m.group(2).endswith(":T"):
                continue  # the line cut mid-protocol (PRS202)
            expected_fe.append(m.group(2).replace(":TCP", "/TCP"))
        for b in _BACKEND.finditer(line):
            state = b.group(3) if b.group(3) and not b.group(3).isdigit() else None
            expected_be.append((b.group(2), state))
    res = parse(path)
    services = all_services(res)
    if path.name == "cilium-issue-35518__service-list-redacted.txt":
        # rows 1 and 2 lose backends to redaction: the whole service is skipped
        expected_fe = [f for f in expected_fe if f not in ("10.96.0.1:443", "10.99.109.154:443")]
        expected_be = [b for b in expected_be if b[0] != "192.168.1.236:8081"]
    assert [fe_text(s) for s in services] == expected_fe
    assert [(str(b.endpoint), b.state) for s in services for b in s.backends] == expected_be


def test_service_list_layouts_without_type_column_and_with_source_ranges():
    res = parse_cilium("ID   Frontend        Backend\n"
                       "1    10.0.0.1:80     1 => 10.1.0.1:8080\n"
                       "                     2 => 10.1.0.2:8080\n", "old.txt")
    (s,) = all_services(res)
    assert s.type is None and [str(b.endpoint) for b in s.backends] == ["10.1.0.1:8080", "10.1.0.2:8080"]
    path = CORPUS / "service-list" / "cilium-issue-13303__service-list-source-ranges-prototype.txt"
    if path.exists():
        s1, s2 = all_services(parse(path))
        assert [str(r) for r in s1.source_ranges] == ["1.1.1.0/24", "2.1.1.0/24", "3.1.1.0/24"]


# ------------------------------------------------------------------- bpf lb list
BPF_LISTS = [p for p in FILES if p.parent.name == "bpf-lb-list" and "revnat" not in p.name]
_LB_ENTRY = re.compile(r"((?:\[[0-9a-f:.]+\]|\d+\.\d+\.\d+\.\d+):\d+(?:/[A-Za-z]+)?) \((\d+)\)")


@needs_corpus
@pytest.mark.parametrize("path", BPF_LISTS, ids=[p.name for p in BPF_LISTS])
def test_bpf_lb_list_matches_the_text(path):
    text = path.read_text()
    start = text.find("SERVICE ADDRESS")
    lines = text[start:].splitlines()[1:]
    keys, backends = [], []
    lines = [x for x in lines if x.strip() and x.strip() != "..."]
    indent = min(len(x) - len(x.lstrip()) for x in lines)
    for line in lines:
        rest = line.split("[")[0]
        if len(line) - len(line.lstrip()) == indent:  # a row: the service address comes first
            key, rest = rest.split(None, 1)
            if key not in keys:
                keys.append(key)
            rest = re.sub(r"^\(\d+\)", "", rest.strip())  # 1.16: the key's slot
        backends += [a for a, _ in _LB_ENTRY.findall(rest) if a != "0.0.0.0:0"]
    res = parse(path)
    lst = [x for x in res.dump.listings if x.kind == "bpf-lb-list"][-1]
    assert [fe_text(s).replace("/TCP/i", "/TCP/i") for s in lst.services] == keys
    assert sorted(str(b.endpoint) for s in lst.services for b in s.backends) == sorted(backends)


def test_bpf_lb_list_revnat_and_flags():
    path = CORPUS / "bpf-lb-list" / "unknown-korean-study__bpf-lb-list.txt"
    if not path.exists():
        pytest.skip("corpus not found")
    services = {fe_text(s): s for s in all_services(parse(path))}
    np = services["0.0.0.0:32179/TCP/i"]
    assert np.scope == "internal" and np.type == "NodePort" and np.revnat_id == 31
    assert np.ext_policy == "Local" and "two-scopes" in np.flags
    rev = parse(CORPUS / "bpf-lb-list" / "unknown-korean-study__bpf-lb-list-revnat.txt")
    assert [(r.id, str(r.frontend)) for r in rev.dump.listings[0].revnat][:2] == [(35, "0.0.0.0:31181"),
                                                                                  (20, "10.200.0.1:443")]


# ------------------------------------------------------------------- JSON
JSONS = [p for p in FILES if p.suffix == ".json"]


@needs_corpus
@pytest.mark.parametrize("path", JSONS, ids=[p.name for p in JSONS])
def test_json_matches_json(path):
    text = path.read_text()
    doc = json.loads(text[min(i for i in (text.find("{"), text.find("[")) if i >= 0):])
    doc = doc if isinstance(doc, list) else [doc]
    services = all_services(parse(path))
    assert len(services) == len(doc)
    for s, d in zip(services, doc):
        spec = d["spec"]
        assert str(s.frontend.address) == spec["frontend-address"]["ip"]
        assert s.frontend.port == spec["frontend-address"]["port"]
        assert s.id == spec["id"] and s.type == spec["flags"]["type"]
        assert [(str(b.endpoint.address), b.endpoint.port, b.state, b.node) for b in s.backends] == [
            (b["ip"], b["port"], b.get("state"), b.get("nodeName")) for b in spec.get("backend-addresses", [])]
        assert s.int_policy == spec["flags"].get("intTrafficPolicy", "Cluster")


# ------------------------------------------------------------------- status
def test_status_reports():
    def st(name):
        return parse(CORPUS / "status" / name).dump.status

    if not FILES:
        pytest.skip("corpus not found")
    s = st("wcni-kind__cilium-1.15.0-rc.1__KPR-native-routing__cilium-status.verbose")
    assert (s.version, s.kpr, s.socket_lb, s.socket_lb_hostns_only, s.lb_mode, s.host_routing) == (
        "1.15.0-rc.1", "True", True, False, "SNAT", "Legacy")
    s = st("cilium-pr-11927__status-kpr-wrapped-2020.txt")
    assert (s.kpr, s.socket_lb, s.lb_mode) == ("Strict", True, "SNAT")  # HostReachableServices, wrapped
    s = st("cilium-issue-24160__status-verbose-kpr-disabled-2023.txt")
    assert (s.kpr, s.socket_lb) == ("Disabled", False)
    s = st("blog-zhaojizhuang__cilium-1.10.3__status.txt")
    assert (s.version, s.kpr, s.socket_lb, s.host_routing) == ("1.10.3", "Strict", None, "Legacy")


# ------------------------------------------------------------------- lb-testdata (txtar)
# Which k8s objects make up the state each expected table/map dump was taken in (the script
# adds and updates them in this order), and which node the test agent runs as.
TXTAR_STATE = {
    "nodeport.txtar": (["service.yaml", "service2.yaml", "endpointslice.yaml", "endpointslice2.yaml"],
                       ["frontends.table", "lbmaps.expected"]),
    "dualstack.txtar": (["service.yaml", "endpointslice-ipv4.yaml", "endpointslice-ipv6.yaml"],
                        ["frontends.table", "lbmaps.expected"]),
    "loadbalancer.txtar": (["service.yaml", "endpointslice.yaml"], ["frontends.table", "lbmaps.expected"]),
    "external-ips.txtar": (["service.yaml", "endpointslice.yaml"], ["frontends.table", "lbmaps.expected"]),
    "trafficpolicy.txtar": (["service_tp_local.yaml", "endpointslice.yaml"],
                            ["frontends.table", "lbmaps.expected"]),
    "hostport.txtar": (["pod.yaml"], ["frontends.table", "lbmaps.expected"]),
}
NODE = "testnode"  # the node name Cilium's LB test hive runs as


def txtar_sections(text: str) -> dict:
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^-- (.+) --$", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return {k: "\n".join(v) + "\n" for k, v in out.items()}


def ep(ip: str, port: int, proto: str) -> str:
    a = ipaddress.ip_address(ip)
    return (f"[{a}]" if a.version == 6 else str(a)) + f":{port}/{proto}"


def expected_from_yaml(sections: dict, objects: list[str], with_node_addrs: bool) -> dict:
    """{frontend: (type, sorted backends)} as Kubernetes semantics give it, from the YAML alone."""
    docs = [d for name in objects for d in yaml.safe_load_all(sections[name]) if d]
    node_addrs = [yaml.safe_load(sections[n])["addr"] for n in ("addrv4.yaml", "addrv6.yaml") if n in sections]
    out = {}

    def add(addr, port, proto, typ, bes, wildcard_expand):
        out[ep(addr, port, proto)] = (typ, sorted(bes))
        if wildcard_expand and with_node_addrs:
            fam = ipaddress.ip_address(addr).version
            for na in node_addrs:
                if ipaddress.ip_address(na).version == fam:
                    out[ep(na, port, proto)] = (typ, sorted(bes))

    slices = [d for d in docs if d["kind"] == "EndpointSlice"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        spec = svc["spec"]
        name = svc["metadata"]["name"]
        etp = spec.get("externalTrafficPolicy", "Cluster")
        itp = spec.get("internalTrafficPolicy", "Cluster")
        cips = spec.get("clusterIPs") or [spec["clusterIP"]]
        fams = {ipaddress.ip_address(c).version for c in cips}
        for p in spec["ports"]:
            proto = p.get("protocol", "TCP")

            def backends(fam, local):
                bes = []
                for s in slices:
                    if s["metadata"]["labels"].get("kubernetes.io/service-name") != name:
                        continue
                    if (s["addressType"] == "IPv6") != (fam == 6):
                        continue
                    for sp in s["ports"]:
                        if sp.get("name") == p.get("name"):
                            for e in s["endpoints"]:
                                if local and e.get("nodeName") != NODE:
                                    continue
                                bes += [ep(a, sp["port"], sp.get("protocol", "TCP")) for a in e["addresses"]]
                return bes

            for c in cips:
                fam = ipaddress.ip_address(c).version
                add(c, p["port"], proto, "ClusterIP", backends(fam, itp == "Local"), False)
            if spec["type"] in ("NodePort", "LoadBalancer") and p.get("nodePort"):
                for fam in sorted(fams):
                    add("::" if fam == 6 else "0.0.0.0", p["nodePort"], proto, "NodePort",
                        backends(fam, etp == "Local"), True)
            for ing in (svc.get("status", {}).get("loadBalancer") or {}).get("ingress") or ():
                if ing.get("ipMode", "VIP") == "VIP":
                    fam = ipaddress.ip_address(ing["ip"]).version
                    add(ing["ip"], p["port"], proto, "LoadBalancer", backends(fam, etp == "Local"), False)
            for x in spec.get("externalIPs") or ():
                fam = ipaddress.ip_address(x).version
                add(x, p["port"], proto, "ExternalIPs", backends(fam, etp == "Local"), False)
    for pod in (d for d in docs if d["kind"] == "Pod" and d["status"]["phase"] == "Running"):
        for c in pod["spec"]["containers"]:
            for p in c.get("ports", ()):
                if p.get("hostPort"):
                    proto = p.get("protocol", "TCP")
                    add("0.0.0.0", p["hostPort"], proto, "HostPort",
                        [ep(pod["status"]["podIP"], p["containerPort"], proto)], True)
    return out


TXTARS = [p for p in FILES if p.suffix == ".txtar"]


@needs_corpus
@pytest.mark.parametrize("path", TXTARS, ids=[p.name for p in TXTARS])
def test_lb_testdata_tables_and_maps_match_the_yaml(path):
    sections = txtar_sections(path.read_text())
    objects, checked = TXTAR_STATE[path.name]
    res = parse(path)
    for section in checked:
        (lst,) = [x for x in res.dump.listings if x.section == section]
        want = expected_from_yaml(sections, objects, with_node_addrs=lst.kind == "lbmaps")
        got = {str(s.frontend) + ("/i" if s.scope == "internal" else ""):
               (s.type, sorted(str(b.endpoint) for b in s.backends)) for s in lst.services}
        assert got == want, section
        if lst.kind == "lbmaps":
            assert all(b.state == "active" for s in lst.services for b in s.backends)
            assert {r.id for r in lst.revnat} == {s.revnat_id for s in lst.services}
    if path.name == "external-ips.txtar":
        lb = [x for x in res.dump.listings if x.section == "lbmaps.expected"][0]
        ranges = {s.type: [str(r) for r in s.source_ranges] for s in lb.services}
        assert ranges == {"ClusterIP": [], "LoadBalancer": ["10.0.0.0/8"], "ExternalIPs": ["10.0.0.0/8"]}
    if path.name == "trafficpolicy.txtar":
        lb = [x for x in res.dump.listings if x.section == "lbmaps_tp_mixed.expected"][0]
        by = {fe_text(s): s for s in lb.services}
        assert [str(b.endpoint) for b in by["1.1.1.1:80/TCP/i"].backends] == ["10.244.1.1:80/TCP"]
        assert len(by["1.1.1.1:80/TCP"].backends) == 2 and "two-scopes" in by["1.1.1.1:80/TCP"].flags


def test_statedb_join_gives_policies_ranges_and_nodes():
    path = CORPUS / "lb-testdata" / "external-ips.txtar"
    if not path.exists():
        pytest.skip("corpus not found")
    from analyzer.parse.cilium import join_statedb
    res = parse(path)
    by = {x.section: x for x in res.dump.listings}
    joined = join_statedb(by["frontends.table"], by["services.table"], by["backends.table"])
    assert {s.type: ([str(r) for r in s.source_ranges], s.backends[0].node) for s in joined} == {
        "ClusterIP": (["10.0.0.0/8"], "nodeport-worker"), "LoadBalancer": (["10.0.0.0/8"], "nodeport-worker"),
        "ExternalIPs": (["10.0.0.0/8"], "nodeport-worker")}
