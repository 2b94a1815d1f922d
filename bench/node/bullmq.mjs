// BullMQ: `preload` adds the backlog as jobs (addBulk); `consume` runs a
// Worker with the given concurrency whose processor parses the JSON body.
import { Queue, Worker } from "bullmq";
import IORedis from "ioredis";
import { env, progress } from "./common.mjs";

const connection = () => new IORedis(env.redis, { maxRetriesPerRequest: null });
const mode = process.argv[2];

if (mode === "preload") {
  const queue = new Queue(env.subject, { connection: connection() });
  for (let start = 0; start < env.messages; start += 1000) {
    const jobs = [];
    for (let i = start; i < Math.min(start + 1000, env.messages); i++) {
      jobs.push({ name: "bench", data: { body: env.body }, opts: { jobId: `m${i}`, removeOnComplete: true } });
    }
    await queue.addBulk(jobs);
  }
  await queue.close();
  process.exit(0);
} else {
  const handled = progress(env.messages);
  new Worker(
    env.subject,
    async (job) => {
      JSON.parse(job.data.body);
      handled();
    },
    { connection: connection(), concurrency: env.concurrency, removeOnComplete: { count: 0 } },
  );
}
