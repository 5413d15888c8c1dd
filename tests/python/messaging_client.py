"""A Python client generated from proto/ that runs a bidirectional Connect session.

Usage: messaging_client.py <generated-code-dir> <auth host:port> <messaging host:port>
Registers two users, creates a group, opens Connect for the second user, subscribes, sends a
message over the stream and reads its SendResult and the delivered Message; prints JSON.
"""
import json
import queue
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from switchboard.auth.v1 import auth_pb2, auth_pb2_grpc  # noqa: E402
from switchboard.messaging.v1 import messaging_pb2, messaging_pb2_grpc  # noqa: E402


def account(auth, name):
    auth.Register(auth_pb2.RegisterRequest(username=name, password="python password"), timeout=10)
    tokens = auth.Login(auth_pb2.LoginRequest(username=name, password="python password"), timeout=10).tokens
    me = auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=[("authorization", "Bearer " + tokens.access_token)], timeout=10)
    return me.user.id, tokens.access_token


def main() -> None:
    auth = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(sys.argv[2]))
    channel = grpc.insecure_channel(sys.argv[3])
    messaging = messaging_pb2_grpc.MessagingServiceStub(channel)
    owner_id, owner_token = account(auth, "pyowner")
    member_id, member_token = account(auth, "pymember")
    group = messaging.CreateConversation(
        messaging_pb2.CreateConversationRequest(
            kind=messaging_pb2.CONVERSATION_KIND_GROUP, title="python", member_ids=[member_id]
        ),
        metadata=[("authorization", "Bearer " + owner_token)],
        timeout=10,
    ).conversation

    outgoing = queue.Queue()

    def requests():
        while True:
            item = outgoing.get()
            if item is None:
                return
            yield item

    responses = messaging.Connect(requests(), metadata=[("authorization", "Bearer " + member_token)], timeout=30)
    outgoing.put(messaging_pb2.ConnectRequest(subscribe=messaging_pb2.Subscribe(conversation_id=group.id, since_seq=0)))
    seen = {"subscribed": False, "recovered": False, "send_result_seq": None, "message_seq": None, "body": None}
    for response in responses:
        kind = response.WhichOneof("frame")
        if kind == "subscribed":
            seen["subscribed"] = True
        elif kind == "recovered":
            seen["recovered"] = True
            outgoing.put(
                messaging_pb2.ConnectRequest(
                    send=messaging_pb2.Send(conversation_id=group.id, client_msg_id="py-1", body="hello from python")
                )
            )
        elif kind == "send_result":
            seen["send_result_seq"] = response.send_result.message.seq
        elif kind == "message":
            seen["message_seq"] = response.message.seq
            seen["body"] = response.message.body
        if seen["send_result_seq"] is not None and seen["message_seq"] is not None:
            break
    outgoing.put(None)
    responses.cancel()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
