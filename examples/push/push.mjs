// A backend service pushing through Switchboard's Push API (gRPC), in Node with
// @grpc/grpc-js: publish to a channel, send to a user, ask who is online and who follows
// a channel. Usage: node examples/push/push.mjs <host:port> [channel] [user]
// (a standalone gateway's --grpc-addr, or a broker-bridge's --listen in a cluster).
// Prints one JSON line with what each call answered.
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [addr, channel = "room:1", user = "alice"] = process.argv.slice(2);
if (!addr) {
  console.error("usage: node push.mjs <host:port> [channel] [user]");
  process.exit(64);
}
const root = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "proto", "proto");
const def = protoLoader.loadSync("switchboard/push/v1/push.proto", { includeDirs: [root], keepCase: true, longs: Number, defaults: true });
const { Push } = grpc.loadPackageDefinition(def).switchboard.push.v1;
const client = new Push(addr, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
// An internal credential, when the services require one (--internal-token).
if (process.env.SWITCHBOARD_INTERNAL_TOKEN) metadata.set("authorization", `Bearer ${process.env.SWITCHBOARD_INTERNAL_TOKEN}`);
const call = (method, req) =>
  new Promise((resolve, reject) =>
    client[method](req, metadata, { deadline: Date.now() + 10_000 }, (err, res) => (err ? reject(err) : resolve(res))),
  );

try {
  // The same idempotency key on a retry stores the message once.
  const published = await call("Publish", {
    channel,
    data_json: JSON.stringify({ text: "from node" }),
    from: "node-backend",
    idempotency_key: `node-${process.pid}-1`,
  });
  const sent = await call("SendToUser", { user, data_json: JSON.stringify({ notice: "from node" }), from: "node-backend" });
  const online = await call("IsOnline", { users: [user, "nobody"] });
  const members = await call("ChannelMembers", { channel, limit: 100 });
  console.log(JSON.stringify({
    published: { id: published.id, seq: published.seq },
    sent: { id: sent.id },
    online: Object.fromEntries(online.users.map((u) => [u.user, u.online])),
    members: members.users,
  }));
} catch (err) {
  console.error(`push failed: ${err.code} ${err.details ?? err.message}`);
  process.exit(1);
} finally {
  client.close();
}
