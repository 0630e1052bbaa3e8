"""Generated protobuf and gRPC code for gradcheck_svc.v1 (from protos/; never edit by hand).

Regenerate with ``python scripts/gen_protos.py``. Reach these modules through
gradcheck_svc.codec, gradcheck_svc.server and gradcheck_svc.client.
"""
