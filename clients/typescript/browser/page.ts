/**
 * The SDK in a real browser page: `window.fitTrackerSmoke(edgeUrl)` registers, reads the caller
 * (unary) and reads the first message of the notification Subscribe stream (server streaming),
 * all over gRPC-Web from this page's origin; it resolves to what it saw, or to the error.
 *
 * Bundled with esbuild for tests/clients/test_typescript_client.py, which serves it from an allowed and
 * from a disallowed origin and drives Chromium with scripts/browser-smoke.ts.
 */
import { ConnectError, createFitTrackerClient } from "../src/index.js";

/** What one run saw: the calls' results, or the first failure. */
export interface SmokeResult {
  ok: boolean;
  origin: string;
  registered?: string;
  me?: string;
  firstStreamMessage?: string;
  error?: { name: string; code: string; message: string };
}

async function smoke(edgeUrl: string): Promise<SmokeResult> {
  let token: string | undefined;
  const api = createFitTrackerClient(edgeUrl, () => token);
  const result: SmokeResult = { ok: false, origin: window.location.origin };
  try {
    const email = `browser-${crypto.randomUUID().slice(0, 12)}@example.com`;
    const registered = await api.user.register({ email, password: "correct-horse-42", displayName: "Ada Web" });
    token = registered.tokens?.accessToken;
    result.registered = registered.user?.name;

    result.me = (await api.user.getUser({ name: "users/me" })).name;

    // The deadline ends the stream if no message comes; the first one is a heartbeat.
    for await (const message of api.notification.subscribe({ parent: "users/me" }, { timeoutMs: 10_000 })) {
      result.firstStreamMessage = message.event.case;
      break;
    }
    result.ok = true;
  } catch (err) {
    const error = ConnectError.from(err);
    const cause = error.cause instanceof Error ? error.cause : undefined;
    result.error = { name: cause?.name ?? error.name, code: String(error.code), message: error.rawMessage };
  }
  return result;
}

declare global {
  interface Window {
    fitTrackerSmoke: typeof smoke;
  }
}
window.fitTrackerSmoke = smoke;
