/**
 * The FitTracker SDK: typed gRPC-Web clients for every service, through the Envoy edge.
 *
 * Works in browsers and in Node 20+ (both have fetch). Messages and service descriptors come
 * from ./gen/, generated from proto/ by `make gen`; nothing here is generated.
 */
import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { AiService } from "./gen/fittracker/ai/v1/ai_service_pb.js";
import { AnalyticsService } from "./gen/fittracker/analytics/v1/analytics_service_pb.js";
import { NotificationService } from "./gen/fittracker/notification/v1/notification_service_pb.js";
import { UserService } from "./gen/fittracker/user/v1/user_service_pb.js";
import { WorkoutService } from "./gen/fittracker/workout/v1/workout_service_pb.js";

/** The current access token, or nothing for anonymous calls (Register, Login, GetJwks, ...). */
export type TokenSource = () => string | null | undefined | Promise<string | null | undefined>;

/** One typed client per service, all sharing one gRPC-Web transport. */
export interface FitTrackerClient {
  readonly user: Client<typeof UserService>;
  readonly workout: Client<typeof WorkoutService>;
  readonly ai: Client<typeof AiService>;
  readonly notification: Client<typeof NotificationService>;
  readonly analytics: Client<typeof AnalyticsService>;
  /** The transport underneath, to build more clients on (createClient(Service, transport)). */
  readonly transport: Transport;
}

/** Adds `authorization: Bearer <token>` to every call when getToken returns a token. */
export function bearerAuth(getToken: TokenSource): Interceptor {
  return (next) => async (req) => {
    const token = await getToken();
    if (token && !req.header.has("authorization")) {
      req.header.set("authorization", `Bearer ${token}`);
    }
    return next(req);
  };
}

/**
 * Clients for the edge at baseUrl (e.g. "https://api.fittracker.app" or "http://localhost:8080").
 * getToken is asked before each call, so a refreshed token is picked up without a new client.
 */
export function createFitTrackerClient(
  baseUrl: string,
  getToken: TokenSource = () => undefined,
  options: { interceptors?: Interceptor[]; fetch?: typeof globalThis.fetch } = {},
): FitTrackerClient {
  const transport = createGrpcWebTransport({
    baseUrl,
    useBinaryFormat: true,
    interceptors: [bearerAuth(getToken), ...(options.interceptors ?? [])],
    ...(options.fetch ? { fetch: options.fetch } : {}),
  });
  return {
    user: createClient(UserService, transport),
    workout: createClient(WorkoutService, transport),
    ai: createClient(AiService, transport),
    notification: createClient(NotificationService, transport),
    analytics: createClient(AnalyticsService, transport),
    transport,
  };
}
