"""The generated gRPC code of `maos.v1` (`tasks_pb2`, `agents_pb2`, `kv_pb2`, `cluster_pb2` and
their `*_pb2_grpc`), made from `client/proto` when the package is built; not in git."""
