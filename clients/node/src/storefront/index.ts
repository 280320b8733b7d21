/**
 * Customer login for a storefront, framework-neutral: the same few calls over Node's
 * `IncomingMessage`/`ServerResponse` (Express, plain `node:http`) and the Fetch API's
 * `Request`/`Response` (Next.js route handlers, Nuxt/Nitro via `toWebRequest`).
 *
 *     const shop = new Storefront({ app: "shop" });
 *     const { setCookie } = await shop.login(request, { username, password, remember });
 *     const { fetch } = await shop.customer(request);   // the customer's Merchant API calls
 *     const cleared = await shop.logout(request);         // at the broker and at Geins
 *
 * The browser holds only the session's handle, in an HttpOnly cookie (`cookie.ts`); the
 * tokens stay in the broker, which refreshes them once per session however many requests
 * a page fans out. Login, register and logout check the request's Origin (`origin.ts`);
 * call `checkOrigin` in every other state-changing route. Every refusal is a
 * `StorefrontError` carrying the status and headers to answer with.
 */

import type { IncomingMessage, ServerResponse } from "node:http";

import { DEFAULT_SESSION_MIN_VALID } from "../cache.js";
import { BrokerClient, type SessionRef } from "../client.js";
import {
  BrokerNotRunning,
  InvalidCredentials,
  LoginRequired,
  RateLimited,
  Unavailable,
  UnknownSession,
} from "../errors.js";
import { type FetchLike, withBrokerAuth } from "../fetch.js";
import type { CustomerSession, SessionToken } from "../results.js";
import { type CookiePolicy, clearedCookie, cookiePolicy, handleFrom, sessionCookie } from "./cookie.js";
import { crossSiteRefusal, normalOrigin } from "./origin.js";

/** A request as either world hands it over. */
export type StorefrontRequest = Request | IncomingMessage;

/** Longest username and password passed on: bounds what a form can make the broker carry. */
const MAX_USERNAME = 320;
const MAX_PASSWORD = 1024;

export interface StorefrontOptions {
  /** The `[apps.NAME]` section of the broker's config this storefront uses. */
  app: string;
  client?: BrokerClient;
  /** The session cookie's name and switches (see `CookiePolicy`; default: `__Host-geins-session`, Secure, Lax). */
  cookie?: Partial<CookiePolicy>;
  /**
   * The storefront's origins (`https://shop.example`). Default: the request's own origin
   * (a Fetch request's URL, or `http(s)://` + Host for a Node request, https only on a TLS
   * socket). Behind a TLS-terminating proxy, list them.
   */
  origins?: readonly string[];
  /** Seconds a bearer handed to a request must still be valid (default 10). */
  minValid?: number;
  /** The fetch that customer fetches wrap (default: globalThis.fetch). */
  fetch?: FetchLike;
  /** Unix seconds now; injectable for tests. */
  clock?: () => number;
}

export interface Credentials {
  username: unknown;
  password: unknown;
  /** "Remember me": a long session and a persistent cookie; else both end soon / with the browser. */
  remember?: unknown;
}

/** A customer just logged in: send `setCookie` with the response. */
export interface SignedIn {
  readonly session: CustomerSession;
  readonly setCookie: string;
}

/** The customer a request belongs to. */
export interface Customer {
  readonly session: SessionRef;
  readonly token: SessionToken;
  /** fetch with this customer's bearer (one forced refresh and retry on a 401). */
  readonly fetch: FetchLike;
}

/** A request the storefront refuses: answer with `status` and `headers` (e.g. the cleared cookie). */
export class StorefrontError extends Error {
  override name = "StorefrontError";

  constructor(
    readonly status: number,
    message: string,
    readonly headers: readonly (readonly [string, string])[] = [],
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }

  /** As a Fetch API Response (JSON `{error}`). */
  toResponse(): Response {
    const headers = new Headers({ "Content-Type": "application/json" });
    for (const [name, value] of this.headers) headers.append(name, value);
    return new Response(JSON.stringify({ error: this.message }), { status: this.status, headers });
  }

  /** Written to a Node ServerResponse (JSON `{error}`). */
  send(response: ServerResponse): void {
    for (const [name, value] of this.headers) response.appendHeader(name, value);
    response.statusCode = this.status;
    response.setHeader("Content-Type", "application/json");
    response.end(JSON.stringify({ error: this.message }));
  }
}

export class Storefront {
  readonly app: string;
  readonly client: BrokerClient;
  readonly cookie: CookiePolicy;
  private readonly origins: readonly string[] | null;
  private readonly minValid: number;
  private readonly fetchImpl: FetchLike;
  private readonly clock: () => number;

  constructor(options: StorefrontOptions) {
    this.app = options.app;
    this.client = options.client ?? new BrokerClient();
    this.cookie = cookiePolicy(options.cookie);
    this.origins = options.origins ? options.origins.map(originOrThrow) : null;
    this.minValid = options.minValid ?? DEFAULT_SESSION_MIN_VALID;
    this.fetchImpl = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    this.clock = options.clock ?? (() => Date.now() / 1000);
  }

  /** Refuse (403) a state-changing request from another origin; for every such route. */
  checkOrigin(request: StorefrontRequest): void {
    const allowed = this.origins ?? ownOrigin(request);
    const reason = crossSiteRefusal(
      { method: request.method ?? "GET", origin: header(request, "origin"), fetchSite: header(request, "sec-fetch-site") },
      allowed,
    );
    if (reason !== null) throw new StorefrontError(403, `refused: ${reason}`);
  }

  /** The session handle in the request's cookie, or null. */
  handle(request: StorefrontRequest): string | null {
    return handleFrom(this.cookie, header(request, "cookie"));
  }

  /** Log a customer in; a session the request's cookie named before is ended first. */
  login(request: StorefrontRequest, credentials: Credentials): Promise<SignedIn> {
    return this.signIn(request, credentials, false, undefined);
  }

  /** Register a new customer at Geins and log them in (`user`: Geins' UserInputType). */
  register(
    request: StorefrontRequest,
    credentials: Credentials & { user?: Readonly<Record<string, unknown>> },
  ): Promise<SignedIn> {
    return this.signIn(request, credentials, true, credentials.user);
  }

  /**
   * The request's customer and their bearer; a StorefrontError 401 when there is none (no
   * cookie, or the session ended: then its headers clear the cookie).
   */
  async customer(request: StorefrontRequest): Promise<Customer> {
    const handle = this.handle(request);
    if (handle === null) throw new StorefrontError(401, "not logged in");
    const session = { app: this.app, handle };
    try {
      const token = await this.client.sessionToken({ ...session, minValid: this.minValid });
      const fetch = withBrokerAuth(this.fetchImpl, { session, client: this.client, minValid: this.minValid });
      return { session, token, fetch };
    } catch (error) {
      throw this.refusal(error, "login");
    }
  }

  /**
   * End the request's session at the broker and at Geins; resolves to the `Set-Cookie`
   * that clears the cookie. A session already gone is fine (logging out twice is a no-op).
   */
  async logout(request: StorefrontRequest): Promise<string> {
    this.checkOrigin(request);
    const handle = this.handle(request);
    if (handle !== null) {
      try {
        await this.client.sessionLogout({ app: this.app, handle });
      } catch (error) {
        if (!(error instanceof UnknownSession || error instanceof LoginRequired)) throw this.refusal(error, "logout");
      }
    }
    return clearedCookie(this.cookie);
  }

  /** The refusal to answer for a session that ended: 401 and the cookie cleared. */
  loggedOut(message = "not logged in"): StorefrontError {
    return new StorefrontError(401, message, [["Set-Cookie", clearedCookie(this.cookie)]]);
  }

  /**
   * A broker error as the refusal to send (a StorefrontError passes through); anything
   * else is the storefront's bug and is thrown on as it is.
   */
  refusal(error: unknown, action: "login" | "register" | "logout"): unknown {
    if (error instanceof StorefrontError) return error;
    // UnknownSession: the session ended (or never was). LoginRequired: it ended at Geins
    // while this request waited on its refresh (a logout in another tab, a revocation).
    if (error instanceof UnknownSession || error instanceof LoginRequired) {
      return this.loggedOut("the session ended: log in again");
    }
    if (error instanceof InvalidCredentials) {
      return action === "register"
        ? new StorefrontError(409, "that e-mail address cannot be registered", [], { cause: error })
        : new StorefrontError(401, "wrong e-mail address or password", [], { cause: error });
    }
    if (error instanceof RateLimited) {
      const wait = Math.max(1, Math.ceil(error.retryAfter ?? 60));
      return new StorefrontError(429, "too many attempts: try again later", [["Retry-After", String(wait)]], {
        cause: error,
      });
    }
    if (error instanceof Unavailable || error instanceof BrokerNotRunning) {
      return new StorefrontError(503, "the shop cannot log you in just now: try again shortly", [["Retry-After", "5"]], {
        cause: error,
      });
    }
    return error;
  }

  private async signIn(
    request: StorefrontRequest,
    credentials: Credentials,
    register: boolean,
    user: Readonly<Record<string, unknown>> | undefined,
  ): Promise<SignedIn> {
    this.checkOrigin(request);
    const { username, password } = credentials;
    const remember = credentials.remember === true || credentials.remember === "on" || credentials.remember === "true";
    if (typeof username !== "string" || username.length === 0 || username.length > MAX_USERNAME) {
      throw new StorefrontError(400, "an e-mail address is required");
    }
    if (typeof password !== "string" || password.length === 0 || password.length > MAX_PASSWORD) {
      throw new StorefrontError(400, "a password is required");
    }
    const previous = this.handle(request);
    let session: CustomerSession;
    try {
      const options = { app: this.app, username, password, remember };
      session = register
        ? await this.client.sessionRegister({ ...options, user })
        : await this.client.sessionLogin(options);
    } catch (error) {
      throw this.refusal(error, register ? "register" : "login");
    }
    if (previous !== null && previous !== session.handle) {
      // The browser's cookie is about to name the new session: the old one would only idle.
      await this.client.sessionLogout({ app: this.app, handle: previous }).catch(() => undefined);
    }
    const maxAge = remember && session.sessionEndsAt !== null ? session.sessionEndsAt - this.clock() : null;
    return { session, setCookie: sessionCookie(this.cookie, session.handle, maxAge) };
  }
}

function isFetchRequest(request: StorefrontRequest): request is Request {
  return typeof (request as Request).headers.get === "function";
}

function header(request: StorefrontRequest, name: string): string | null {
  if (isFetchRequest(request)) return request.headers.get(name);
  const value = request.headers[name];
  return Array.isArray(value) ? value.join(", ") : (value ?? null);
}

/** The origin the request was sent to, as the browser names it; [] when unknown. */
function ownOrigin(request: StorefrontRequest): string[] {
  if (isFetchRequest(request)) {
    const origin = normalOrigin(request.url);
    if (origin !== null) return [origin];
  }
  const host = header(request, "host");
  if (host === null || host.includes(",")) return [];
  const encrypted = !isFetchRequest(request) && (request.socket as { encrypted?: boolean }).encrypted === true;
  const origin = normalOrigin(`${encrypted ? "https" : "http"}://${host}`);
  return origin === null ? [] : [origin];
}

function originOrThrow(text: string): string {
  const origin = normalOrigin(text);
  if (origin === null) throw new TypeError(`not an http(s) origin: ${JSON.stringify(text)}`);
  return origin;
}

export { DEFAULT_COOKIE, clearedCookie, cookieName, cookiePolicy, handleFrom, sessionCookie } from "./cookie.js";
export type { CookiePolicy, SameSite } from "./cookie.js";
export { crossSiteRefusal, normalOrigin } from "./origin.js";
