/**
 * geins-broker's Node client: fresh Geins bearer tokens from the local broker daemon.
 *
 *     import { BrokerClient, TokenCache, withBrokerAuth } from "geins-broker-client";
 *     const broker = new BrokerClient();
 *     const { token } = await broker.token({ minValid: 60 });
 */

export { BrokerClient, DEFAULT_TIMEOUT_MS, type CallOptions, type ClientOptions, type ProfileOptions } from "./client.js";
export { TokenCache, DEFAULT_MIN_VALID, type GetOptions, type TokenCacheOptions } from "./cache.js";
export { brokerFetch, withBrokerAuth, type BrokerAuthOptions, type FetchLike } from "./fetch.js";
export {
  BadFrame,
  BadRequest,
  BrokerError,
  BrokerNotRunning,
  Busy,
  ERROR_CLASSES,
  Forbidden,
  InternalError,
  InvalidCredentials,
  LoginRequired,
  NotLoggedIn,
  ProtocolError,
  Timeout,
  Unavailable,
  UnknownOp,
  UnknownProfile,
  UntrustedSocket,
  UpstreamError,
  UpstreamUnavailable,
} from "./errors.js";
export { candidateSockets, checkTrusted, locateSocket, type StatInfo } from "./paths.js";
export { Token, type Hello, type ProfileStatus, type Session, type Status, type User, type WatchEvent } from "./results.js";
