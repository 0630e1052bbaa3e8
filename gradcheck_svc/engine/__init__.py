"""The checking engine: pure torch (no grpc, no pytest)."""
