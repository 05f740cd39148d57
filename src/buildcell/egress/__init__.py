"""Egress: the allowlist, the proxy and DNS responder that serve a cell's network namespace."""
