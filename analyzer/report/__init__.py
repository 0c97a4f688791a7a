"""Report layer: render results (diagnostics, traces) as text, JSON or SARIF; nothing else."""
SCHEMA_VERSION = "1.0"
