"""Packaged YAML configs (mmdistill.configs)."""
