"""A Python client generated from proto/ with grpcio-tools, run by tests/tests/outside_clients.rs.

Usage: auth_client.py <generated-code-dir> <host:port> <username>
Registers, logs in, calls WhoAmI, and checks a wrong password and a malformed id through
the status details (google.rpc ErrorInfo and BadRequest, read with grpcio-status); prints
one JSON object.
"""
import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402
from switchboard.auth.v1 import auth_pb2, auth_pb2_grpc  # noqa: E402
from switchboard.errors.v1 import errors_pb2  # noqa: E402


def details(error: grpc.RpcError, kind):
    """The detail of type `kind` in a refused call's status, or None."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    return None


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
        wrong, reason, is_constant = "OK", "", False
        try:
            stub.Login(auth_pb2.LoginRequest(username=username, password="wrong password"), timeout=10)
        except grpc.RpcError as e:
            wrong = e.code().name
            info = details(e, error_details_pb2.ErrorInfo)
            reason = info.reason if info else ""
            constant = errors_pb2.ErrorReason.Name(errors_pb2.ERROR_REASON_BAD_CREDENTIALS)
            is_constant = constant == "ERROR_REASON_" + reason
        field = ""
        try:
            stub.GetUsers(
                auth_pb2.GetUsersRequest(user_ids=["not-an-id"]),
                metadata=[("authorization", "Bearer " + tokens.access_token)],
                timeout=10,
            )
        except grpc.RpcError as e:
            bad = details(e, error_details_pb2.BadRequest)
            field = bad.field_violations[0].field if bad and bad.field_violations else ""
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
                    "wrong_password_reason": reason,
                    "reason_is_the_constant": is_constant,
                    "bad_request_field": field,
                }
            )
        )


if __name__ == "__main__":
    main()
