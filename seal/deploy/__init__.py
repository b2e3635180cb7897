"""Deployment artifacts generated from code: the Helm chart's values and schema, the Grafana
dashboard and the Prometheus alerts. ``python -m seal.deploy`` writes them all into ``helm/seal``."""
