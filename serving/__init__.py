"""Triton model repository, server launcher, gRPC client library and CLI (planned)."""
