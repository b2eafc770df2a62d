"""A backend service pushing through Switchboard's Push API (gRPC), in Python with grpcio:
publish to a channel, send to a user, ask who is online and who follows a channel.

Usage: python3 examples/push/push.py <host:port> [channel] [user]
(a standalone gateway's --grpc-addr, or a broker-bridge's --listen in a cluster).
Needs `pip install grpcio grpcio-tools`; the stubs are generated from proto/ at start.
Prints one JSON line with what each call answered.
"""

import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def stubs():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "proto")
    out = tempfile.mkdtemp(prefix="switchboard-push-")
    proto = "switchboard/push/v1/push.proto"
    if protoc.main(["protoc", f"-I{root}", f"--python_out={out}", f"--grpc_python_out={out}", proto]) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    from switchboard.push.v1 import push_pb2, push_pb2_grpc  # noqa: E402

    return push_pb2, push_pb2_grpc


def main():
    if len(sys.argv) < 2:
        print("usage: push.py <host:port> [channel] [user]", file=sys.stderr)
        sys.exit(64)
    addr = sys.argv[1]
    channel = sys.argv[2] if len(sys.argv) > 2 else "room:1"
    user = sys.argv[3] if len(sys.argv) > 3 else "alice"
    pb, rpc = stubs()
    metadata = []
    # An internal credential, when the services require one (--internal-token).
    if os.environ.get("SWITCHBOARD_INTERNAL_TOKEN"):
        metadata.append(("authorization", "Bearer " + os.environ["SWITCHBOARD_INTERNAL_TOKEN"]))
    with grpc.insecure_channel(addr) as ch:
        push = rpc.PushStub(ch)
        try:
            # The same idempotency key on a retry stores the message once.
            published = push.Publish(publish_request(pb, channel), metadata=metadata, timeout=10)
            sent = push.SendToUser(send_request(pb, user), metadata=metadata, timeout=10)
            online = push.IsOnline(pb.IsOnlineRequest(users=[user, "nobody"]), metadata=metadata, timeout=10)
            members = push.ChannelMembers(pb.ChannelMembersRequest(channel=channel, limit=100), metadata=metadata, timeout=10)
        except grpc.RpcError as e:
            print(f"push failed: {e.code().name} {e.details()}", file=sys.stderr)
            sys.exit(1)
    print(
        json.dumps(
            {
                "published": {"id": published.id, "seq": published.seq},
                "sent": {"id": sent.id},
                "online": {u.user: u.online for u in online.users},
                "members": list(members.users),
            }
        )
    )


def publish_request(pb, channel):
    # `from` is a Python keyword: set it through the constructor's mapping.
    return pb.PublishRequest(
        **{
            "channel": channel,
            "data_json": json.dumps({"text": "from python"}),
            "from": "python-backend",
            "idempotency_key": f"python-{os.getpid()}-1",
        }
    )


def send_request(pb, user):
    return pb.SendToUserRequest(**{"user": user, "data_json": json.dumps({"notice": "from python"}), "from": "python-backend"})


if __name__ == "__main__":
    main()
