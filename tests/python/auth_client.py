"""A Python client generated from proto/ with grpcio-tools, run by tests/tests/outside_clients.rs.

Usage: auth_client.py <generated-code-dir> <host:port> <username>
Registers, logs in, calls WhoAmI, and checks a wrong password; prints one JSON object.
"""
import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from switchboard.auth.v1 import auth_pb2, auth_pb2_grpc  # noqa: E402


def main() -> None:
    target, username = sys.argv[2], sys.argv[3]
    with grpc.insecure_channel(target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        user = stub.Register(
            auth_pb2.RegisterRequest(username=username, password="python password", display_name="Py"),
            timeout=10,
        ).user
        tokens = stub.Login(
            auth_pb2.LoginRequest(username=username, password="python password"), timeout=10
        ).tokens
        me = stub.WhoAmI(
            auth_pb2.WhoAmIRequest(),
            metadata=[("authorization", "Bearer " + tokens.access_token)],
            timeout=10,
        )
        try:
            stub.Login(auth_pb2.LoginRequest(username=username, password="wrong password"), timeout=10)
            wrong = "OK"
        except grpc.RpcError as e:
            wrong = e.code().name
        print(
            json.dumps(
                {
                    "registered_id": user.id,
                    "whoami_id": me.user.id,
                    "username": me.user.username,
                    "role": auth_pb2.Role.Name(me.user.role),
                    "session_id": me.session_id,
                    "token_session_id": tokens.session_id,
                    "wrong_password": wrong,
                }
            )
        )


if __name__ == "__main__":
    main()
