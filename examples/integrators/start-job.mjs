// Start a herder job from Node.js with a durable request (see docs/integrators.md).
//
//   npm install nats
//   herder token create erp --role integrator > erp.token
//   HERDER_URL=nats://127.0.0.1:4333 HERDER_TOKEN="$(cat erp.token)" node start-job.mjs
//
// It publishes a job request into herder's request stream (JetStream keeps it, even while no jobs
// service runs), waits for the answer on its own inbox, and prints the job's id and state.
import { createHash, randomBytes } from "node:crypto";

import { connect, headers, JSONCodec } from "nats";

const token = process.env.HERDER_TOKEN;
if (!token) {
  console.error("start-job: set HERDER_TOKEN to an integrator's token ('herder token create NAME --role integrator')");
  process.exit(2);
}
const url = process.env.HERDER_URL ?? "nats://127.0.0.1:4333";
const tenant = process.env.HERDER_TENANT ?? "default";

// The one inbox herder's fence lets this token listen on: _INBOX_ and 32 hex digits of a hash of it.
const inbox = "_INBOX_" + createHash("sha256").update(`herder-inbox:${token}`).digest("hex").slice(0, 32);
const nc = await connect({ servers: url, token, inboxPrefix: inbox, name: "start-job.mjs" });
const json = JSONCodec();

// A random id per request; publish again under the same id (after a crash, a timeout) and herder
// still makes one job.
const requestId = randomBytes(16).toString("hex");
const replyTo = `${inbox}.jobs.${requestId}`;
// A jobs service that is down answers once it is back: wait as long as the caller can.
const answers = nc.subscribe(replyTo, { max: 1, timeout: 60_000 });

const h = headers();
h.set("Content-Type", "application/json");
h.set("Authorization", `Bearer ${token}`);
h.set("Hd-Reply-To", replyTo);
const body = { process: "hello", robot: "invoices-1", input: { name: "Ada" } };
const ack = await nc.jetstream().publish(`hd.${tenant}.req.jobs`, json.encode(body), { msgID: requestId, headers: h });
console.error(`request ${requestId}: stored as #${ack.seq} in ${ack.stream}${ack.duplicate ? " (a repeat)" : ""}`);

try {
  for await (const answer of answers) {
    const reply = json.decode(answer.data);
    if (answer.headers?.get("Nats-Service-Error-Code")) {
      console.error(`start-job: refused (${reply.code}): ${reply.message}`);
      process.exitCode = 1;
    } else {
      console.log(reply.id, reply.state);
    }
  }
} finally {
  await nc.close();
}
