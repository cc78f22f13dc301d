/**
 * End-to-end smoke test of the SDK against a running edge: `node dist/scripts/smoke.js <baseUrl>`.
 * Prints one JSON object with what it saw; exits 0 when every step behaved, 1 otherwise.
 * tests/clients/test_typescript_client.py runs it on a stack it starts.
 */
import { randomUUID } from "node:crypto";

import { Code, ConnectError, createFitTrackerClient } from "../src/index.js";

/** The gRPC code name as Connect spells it on the wire docs: Code.InvalidArgument -> "invalid_argument". */
function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

async function main(baseUrl: string): Promise<Record<string, unknown>> {
  let token: string | undefined;
  const api = createFitTrackerClient(baseUrl, () => token);
  const result: Record<string, unknown> = {};

  const email = `ts-${randomUUID().slice(0, 12)}@example.com`;
  const registered = await api.user.register({ email, password: "correct-horse-42", displayName: "Ada TS" });
  token = registered.tokens?.accessToken;
  if (!token || !registered.user) throw new Error("Register returned no tokens or user");
  result.registered = registered.user.name;

  const me = await api.user.getUser({ name: "users/me" });
  result.me = { name: me.name, email: me.email, displayName: me.displayName };

  const exercises = await api.workout.listExercises({ pageSize: 5 });
  result.exercises = exercises.exercises.map((e) => e.name);

  // Server streaming over gRPC-Web: read the first message (a heartbeat), then hang up.
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 10_000);
  try {
    for await (const message of api.notification.subscribe({ parent: "users/me" }, { signal: abort.signal })) {
      result.firstStreamMessage = message.event.case;
      if (message.event.case === "heartbeat") {
        result.latestCursor = message.event.value.latestCursor.toString();
      }
      break;
    }
  } finally {
    clearTimeout(timer);
    abort.abort();
  }

  try {
    await api.user.register({ email: "not-an-email", password: "correct-horse-42", displayName: "Bad" });
    result.invalidArgument = "no error";
  } catch (err) {
    const error = ConnectError.from(err);
    result.invalidArgument = {
      isConnectError: err instanceof ConnectError,
      code: codeName(error.code),
      message: error.rawMessage,
    };
  }
  return result;
}

const baseUrl = process.argv[2];
if (!baseUrl) {
  console.error("usage: node dist/scripts/smoke.js <edge base URL>");
  process.exit(2);
}
main(baseUrl).then(
  (result) => {
    console.log(JSON.stringify({ ok: true, ...result }));
  },
  (err: unknown) => {
    const error = ConnectError.from(err);
    console.log(JSON.stringify({ ok: false, code: codeName(error.code), error: error.message }));
    process.exitCode = 1;
  },
);
