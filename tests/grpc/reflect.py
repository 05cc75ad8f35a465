"""A stock gRPC client (grpcio with grpcio-reflection, which speaks reflection v1alpha) against
the control plane: lists the services, resolves mesh.v1.Admin by reflection alone (no .proto
files), and calls Admin.Overview with messages built from the reflected descriptors.

    python reflect.py HOST:PORT CA_FILE TOKEN_FILE     (TOKEN_FILE "-": no token)
Prints {"services": [...], "overview": {...}}; exits non-zero with the gRPC status otherwise.
"""

import json
import sys

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.json_format import MessageToDict
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main():
    addr, ca, token_file = sys.argv[1:4]
    creds = grpc.ssl_channel_credentials(open(ca, "rb").read())
    if token_file != "-":
        token = open(token_file).read().strip()
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    with grpc.secure_channel(addr, creds) as channel:
        try:
            db = ProtoReflectionDescriptorDatabase(channel)
            services = sorted(db.get_services())
            method = DescriptorPool(db).FindServiceByName("mesh.v1.Admin").FindMethodByName("Overview")
            request = message_factory.GetMessageClass(method.input_type)
            response = message_factory.GetMessageClass(method.output_type)
            overview = channel.unary_unary(
                "/mesh.v1.Admin/Overview",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )(request(), timeout=10)
        except grpc.RpcError as e:
            print(json.dumps({"code": e.code().name, "details": e.details()}))
            sys.exit(1)
    print(json.dumps({"services": services, "overview": MessageToDict(overview)}))


if __name__ == "__main__":
    main()
