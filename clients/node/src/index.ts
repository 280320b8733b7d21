/**
 * geins-broker's Node client: fresh Geins bearer tokens from the local broker daemon.
 *
 *     import { BrokerClient, TokenCache, withBrokerAuth } from "geins-broker-client";
 *     const broker = new BrokerClient();
 *     const { token } = await broker.token({ minValid: 60 });
 */

export {
  BrokerClient,
  DEFAULT_TIMEOUT_MS,
  type AppOptions,
  type CallOptions,
  type ClientOptions,
  type CustomerLoginOptions,
  type ProfileOptions,
  type SessionRef,
} from "./client.js";
export { SessionTokens, TokenCache, DEFAULT_MIN_VALID, DEFAULT_SESSION_MIN_VALID, type GetOptions, type TokenCacheOptions } from "./cache.js";
export { brokerFetch, withBrokerAuth, type BrokerAuthOptions, type FetchLike, type SessionAuthOptions } from "./fetch.js";
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
  RateLimited,
  Timeout,
  Unavailable,
  UnknownOp,
  UnknownApp,
  UnknownProfile,
  UnknownSession,
  UntrustedSocket,
  UpstreamError,
  UpstreamUnavailable,
} from "./errors.js";
export { candidateSockets, checkTrusted, locateSocket, type StatInfo } from "./paths.js";
export {
  CustomerSession,
  SessionToken,
  Token,
  type Hello,
  type ProfileStatus,
  type Session,
  type SessionInfo,
  type SessionListing,
  type Status,
  type User,
  type WatchEvent,
} from "./results.js";
export {
  Storefront,
  StorefrontError,
  clearedCookie,
  cookieName,
  cookiePolicy,
  crossSiteRefusal,
  handleFrom,
  sessionCookie,
  type CookiePolicy,
  type Credentials,
  type Customer,
  type SignedIn,
  type StorefrontOptions,
  type StorefrontRequest,
} from "./storefront/index.js";
