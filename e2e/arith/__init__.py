"""The example Arith app (proto/arith.proto): a grpcio server, a Python client, a Node.js client.

Plain gRPC application code: must know nothing about kuberpc, so it shows what a meshed app looks like.
"""
