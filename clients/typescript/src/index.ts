/** Entry point of the FitTracker TypeScript client. */
export { bearerAuth, createFitTrackerClient, type FitTrackerClient, type TokenSource } from "./client.js";
export { Code, ConnectError } from "@connectrpc/connect";
