// Progress lines the harness reads (see bench/src/measure.rs): `ready` once
// consuming, `first` at the first handled message, `done` at the last.
export function progress(total) {
  let seen = 0;
  console.log("ready");
  return (k = 1) => {
    if (seen === 0 && k > 0) console.log("first");
    seen += k;
    if (seen === total) console.log("done");
  };
}

export const env = {
  subject: process.env.SUBJECT,
  stream: process.env.STREAM,
  messages: Number(process.env.MESSAGES),
  concurrency: Number(process.env.CONCURRENCY || 100),
  quorum: process.env.QUORUM === "1",
  redis: process.env.REDIS_URL || "redis://127.0.0.1:6379",
  amqp: process.env.AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2f",
  nats: process.env.NATS_URL || "nats://127.0.0.1:4222",
  body: process.env.BODY || "{}",
};
