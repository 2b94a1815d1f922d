// nats.js (@nats-io/jetstream): a durable pull consumer with explicit acks,
// `consume()` with up to CONCURRENCY messages buffered; parse, ack each.
import { connect } from "@nats-io/transport-node";
import { AckPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { env, progress } from "./common.mjs";

const nc = await connect({ servers: env.nats.replace("nats://", "") });
const jsm = await jetstreamManager(nc);
await jsm.consumers.add(env.stream, { durable_name: "peer", ack_policy: AckPolicy.Explicit });
const consumer = await jetstream(nc).consumers.get(env.stream, "peer");
const handled = progress(env.messages);
const messages = await consumer.consume({ max_messages: env.concurrency });
for await (const m of messages) {
  JSON.parse(m.string());
  m.ack();
  handled();
}
