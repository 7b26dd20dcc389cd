"""Generated protobuf and gRPC modules of the control-plane APIs, shared by sidecar and webhook.

The one module both packages may import; nothing here is written by hand (`make proto` regenerates).
"""
