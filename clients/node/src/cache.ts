/**
 * TokenCache: the current token kept inside the process.
 *
 * A server that signs every request with a bearer should not pay a socket round trip per
 * request. The cache answers from memory while its token has at least `minValid` seconds
 * left, and only then asks the daemon, passing the same `minValid`, so the daemon hands back
 * a token that will last (refreshing first if it must). However many callers find the token
 * stale at once, one request goes to the daemon and they all wait on it.
 */

import { BrokerClient, type SessionRef } from "./client.js";
import { BadRequest } from "./errors.js";
import type { SessionToken, Token } from "./results.js";

export const DEFAULT_MIN_VALID = 60;
/**
 * What a customer's bearer must have left when handed to a request (seconds): enough for
 * the Merchant API call it signs, and well under any bearer's lifetime (the daemon refuses
 * a min_valid of a lifetime or more; the emulator's demos run 20-second bearers).
 */
export const DEFAULT_SESSION_MIN_VALID = 10;

export interface TokenCacheOptions {
  client?: BrokerClient;
  profile?: string;
  /** Seconds the token handed out must still be valid (default 60). */
  minValid?: number;
  /** Unix seconds now; injectable for tests. */
  clock?: () => number;
}

export interface GetOptions {
  /** Stops this caller's wait; the shared request goes on for the others. */
  signal?: AbortSignal;
}

export class TokenCache {
  readonly client: BrokerClient;
  readonly profile: string | undefined;
  readonly minValid: number;
  private readonly clock: () => number;
  private held: Token | null = null;
  private inFlight: Promise<Token> | null = null;
  private renewing: Promise<Token> | null = null;

  constructor(options: TokenCacheOptions = {}) {
    this.client = options.client ?? new BrokerClient();
    this.profile = options.profile;
    this.minValid = options.minValid ?? DEFAULT_MIN_VALID;
    this.clock = options.clock ?? (() => Date.now() / 1000);
  }

  /** The held token if it lasts `minValid` more seconds, else a fresh one from the daemon. */
  get(options: GetOptions = {}): Promise<Token> {
    const held = this.held;
    if (held !== null && held.expiresAt - this.clock() >= this.minValid) return Promise.resolve(held);
    const shared = this.inFlight ?? this.fetch();
    const { signal } = options;
    if (signal === undefined) return shared;
    if (signal.aborted) return Promise.reject(signal.reason);
    return new Promise((resolve, reject) => {
      const onAbort = (): void => reject(signal.reason);
      signal.addEventListener("abort", onAbort, { once: true });
      shared.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
    });
  }

  /** The token held now, if any, without asking the daemon (it may have less than minValid left). */
  peek(): Token | null {
    return this.held;
  }

  /** Forget the held token, e.g. after an API answered 401 to it. */
  invalidate(): void {
    this.held = null;
  }

  /**
   * A token other than `refused` (which an API just answered 401 to), if the daemon can
   * make one: asking for a token that must outlive the refused one makes the daemon refresh
   * (any reader may; the `refresh` op is for admins). When the refused token is so new that
   * no such wait is allowed (min_valid must stay under the lifetime), the held token is
   * handed back and the caller's retry gets the API's answer to it.
   */
  renew(refused: Token): Promise<Token> {
    const held = this.held;
    if (held !== null && held.token !== refused.token) return Promise.resolve(held);
    if (this.renewing !== null) return this.renewing;
    const outlive = outliving(refused, this.clock());
    const renewing = this.client
      .token({ profile: this.profile, minValid: outlive })
      .catch((error: unknown) => {
        if (error instanceof BadRequest) return this.client.token({ profile: this.profile, minValid: this.minValid });
        throw error;
      })
      .then((token) => {
        this.held = token;
        return token;
      })
      .finally(() => {
        this.renewing = null;
      });
    this.renewing = renewing;
    return renewing;
  }

  private fetch(): Promise<Token> {
    const request = this.client.token({ profile: this.profile, minValid: this.minValid }).then(
      (token) => {
        if (this.inFlight === request) {
          this.held = token;
          this.inFlight = null;
        }
        return token;
      },
      (error: unknown) => {
        if (this.inFlight === request) this.inFlight = null;
        throw error;
      },
    );
    this.inFlight = request;
    return request;
  }
}

/**
 * A customer's bearer, asked of the daemon on each use.
 *
 * No copy is kept in the process: the daemon answers `session_token` from memory, and a
 * copy here could outlive a logout made through another server or tab. `renew` forces one
 * refresh for any number of callers that saw the same token refused.
 */
export class SessionTokens {
  readonly client: BrokerClient;
  readonly session: SessionRef;
  readonly minValid: number;
  private readonly clock: () => number;
  private renewing: { refused: string; promise: Promise<SessionToken> } | null = null;

  constructor(session: SessionRef, options: { client?: BrokerClient; minValid?: number; clock?: () => number } = {}) {
    this.session = { app: session.app, handle: session.handle };
    this.client = options.client ?? new BrokerClient();
    this.minValid = options.minValid ?? DEFAULT_SESSION_MIN_VALID;
    this.clock = options.clock ?? (() => Date.now() / 1000);
  }

  get(options: GetOptions = {}): Promise<SessionToken> {
    return this.client.sessionToken({ ...this.session, minValid: this.minValid, signal: options.signal });
  }

  /** A token other than `refused` (one refresh, shared by every caller that saw it refused). */
  renew(refused: SessionToken): Promise<SessionToken> {
    if (this.renewing !== null && this.renewing.refused === refused.token) return this.renewing.promise;
    const ask = (minValid: number): Promise<SessionToken> => this.client.sessionToken({ ...this.session, minValid });
    const promise = ask(outliving(refused, this.clock()))
      .catch((error: unknown) => {
        if (error instanceof BadRequest) return ask(this.minValid);
        throw error;
      })
      .finally(() => {
        if (this.renewing?.promise === promise) this.renewing = null;
      });
    this.renewing = { refused: refused.token, promise };
    return promise;
  }
}

/**
 * The `min_valid` that makes the daemon replace `refused`: between what the refused token
 * has left and its whole lifetime, so more than it can meet and less than a new one will
 * (the daemon refuses a min_valid of a lifetime or more).
 */
function outliving(refused: { token: string; expiresAt: number }, now: number): number {
  const left = refused.expiresAt - now;
  const lifetime = jwtLifetime(refused.token);
  return lifetime !== null && lifetime > left ? (left + lifetime) / 2 : left + 1;
}

/** exp - iat from a JWT's claims (read, not verified: only to size a wait), or null. */
function jwtLifetime(jwt: string): number | null {
  try {
    const claims = JSON.parse(Buffer.from(jwt.split(".")[1] ?? "", "base64url").toString("utf8")) as unknown;
    if (typeof claims !== "object" || claims === null) return null;
    const { exp, iat } = claims as { exp?: unknown; iat?: unknown };
    return typeof exp === "number" && typeof iat === "number" ? exp - iat : null;
  } catch {
    return null;
  }
}
