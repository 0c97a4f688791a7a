"""synack: follow a flow through iptables/NAT (and Cilium) forward and back."""

__version__ = "0.1.0"
# where the project and its documentation live (SARIF informationUri and every rule's helpUri)
PROJECT_URL = "https://github.com/synack-project/synack"
DOCS_URL = f"{PROJECT_URL}/blob/main/"
