"""Benchmark kit for synack (not part of the ``analyzer`` package).

The directory is importable as a plain package from the repository root
(``import benchmarks.gen_kubeproxy``) or, for scripts run from elsewhere, by
putting this directory on ``sys.path`` and importing ``gen_kubeproxy`` /
``_common`` directly.
"""
