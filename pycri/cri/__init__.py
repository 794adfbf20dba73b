"""The optional CRI v1 gRPC layer (needs the ``cri`` extra: grpcio, protobuf).

``pycri.cri._gen`` holds the stubs generated from ``proto/api.proto``; nothing is
imported here so that ``import pycri.cri`` stays cheap and free of grpc.
"""
