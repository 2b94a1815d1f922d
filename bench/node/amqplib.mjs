// amqplib: consume the preloaded queue with a prefetch of CONCURRENCY,
// parse each message, ack each (the usual amqplib consumer).
import amqp from "amqplib";
import { env, progress } from "./common.mjs";

const conn = await amqp.connect(env.amqp);
const ch = await conn.createChannel();
await ch.prefetch(env.concurrency);
const handled = progress(env.messages);
await ch.consume(env.subject, (msg) => {
  JSON.parse(msg.content.toString());
  ch.ack(msg);
  handled();
});
