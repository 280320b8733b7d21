/**
 * What the daemon answers, as small frozen values, and how each answer is read.
 *
 * A bearer token is a credential: `Token` leaves it out of `console.log`/`util.inspect` and
 * `JSON.stringify`, so a token that ends up in a log line shows its profile and expiry,
 * never its value. Read `.token` or `.authorization` to use it.
 */

import { inspect } from "node:util";

import { ProtocolError } from "./errors.js";
import type { Message } from "./protocol.js";

/** A bearer token and when it stops working (Unix seconds, wall clock). */
export class Token {
  constructor(
    readonly profile: string,
    readonly token: string,
    readonly expiresAt: number,
  ) {
    Object.freeze(this);
  }

  /** Seconds left at `now` (Unix seconds; default: the wall clock). */
  expiresIn(now: number = Date.now() / 1000): number {
    return this.expiresAt - now;
  }

  /** The value of an HTTP `Authorization` header. */
  get authorization(): string {
    return `Bearer ${this.token}`;
  }

  toJSON(): { profile: string; expiresAt: number } {
    return { profile: this.profile, expiresAt: this.expiresAt };
  }

  [inspect.custom](): string {
    return `Token { profile: ${inspect(this.profile)}, expiresAt: ${this.expiresAt} }`;
  }
}

/** Who the profile's session belongs to, from the bearer token's claims. */
export interface User {
  readonly profile: string;
  readonly userId: string;
  readonly username: string;
  readonly customerType: string;
  readonly memberType: string;
  readonly memberId: string;
  readonly memberDiscount: string;
  readonly expiresAt: number;
}

/** The outcome of login, register, refresh and changePassword. */
export interface Session {
  readonly profile: string;
  readonly username: string | null;
  readonly expiresAt: number;
}

export interface Hello {
  readonly version: number;
  readonly server: string;
  readonly ops: readonly string[];
}

export interface ProfileStatus {
  readonly profile: string;
  /** logged_out, active, degraded or login_required. */
  readonly state: string;
  readonly username: string | null;
  readonly expiresAt: number | null;
  readonly nextRefreshAt: number | null;
  readonly lastRefreshAt: number | null;
  readonly refreshes: number;
  readonly failures: number;
  readonly lastError: string | null;
}

export interface Status {
  readonly server: string;
  readonly uptime: number;
  readonly profiles: readonly ProfileStatus[];
}

/** One frame of a watch stream: a new token, or the session ending (token null). */
export interface WatchEvent {
  /** "token", "logged_out" or "login_required" (a newer daemon may add more). */
  readonly event: string;
  readonly token: Token | null;
}

type Kind = "string" | "number" | "integer" | "array" | "boolean";

function isKind(value: unknown, kind: Kind): boolean {
  switch (kind) {
    case "integer":
      return Number.isInteger(value);
    case "array":
      return Array.isArray(value);
    default:
      return typeof value === kind;
  }
}

function field<T>(message: Message, name: string, kind: Kind): T {
  const value = message[name];
  if (!isKind(value, kind)) {
    throw new ProtocolError(`response field '${name}' is missing or has the wrong type`);
  }
  return value as T;
}

function optional<T>(message: Message, name: string, kind: Kind): T | null {
  const value = message[name];
  return value === undefined || value === null ? null : field<T>(message, name, kind);
}

export function parseToken(message: Message): Token {
  return new Token(
    field(message, "profile", "string"),
    field(message, "token", "string"),
    field(message, "expires_at", "number"),
  );
}

export function parseSession(message: Message): Session {
  return Object.freeze({
    profile: field<string>(message, "profile", "string"),
    username: optional<string>(message, "username", "string"),
    expiresAt: field<number>(message, "expires_at", "number"),
  });
}

export function parseUser(message: Message): User {
  return Object.freeze({
    profile: field<string>(message, "profile", "string"),
    userId: field<string>(message, "user_id", "string"),
    username: field<string>(message, "username", "string"),
    customerType: field<string>(message, "customer_type", "string"),
    memberType: field<string>(message, "member_type", "string"),
    memberId: field<string>(message, "member_id", "string"),
    memberDiscount: field<string>(message, "member_discount", "string"),
    expiresAt: field<number>(message, "expires_at", "number"),
  });
}

function parseProfileStatus(entry: unknown): ProfileStatus {
  if (typeof entry !== "object" || entry === null || Array.isArray(entry)) {
    throw new ProtocolError("status entry is not a map");
  }
  const m = entry as Message;
  return Object.freeze({
    profile: field<string>(m, "profile", "string"),
    state: field<string>(m, "state", "string"),
    username: optional<string>(m, "username", "string"),
    expiresAt: optional<number>(m, "expires_at", "number"),
    nextRefreshAt: optional<number>(m, "next_refresh_at", "number"),
    lastRefreshAt: optional<number>(m, "last_refresh_at", "number"),
    refreshes: field<number>(m, "refreshes", "integer"),
    failures: field<number>(m, "failures", "integer"),
    lastError: optional<string>(m, "last_error", "string"),
  });
}

export function parseStatus(message: Message): Status {
  return Object.freeze({
    server: field<string>(message, "server", "string"),
    uptime: field<number>(message, "uptime", "number"),
    profiles: Object.freeze(field<unknown[]>(message, "profiles", "array").map(parseProfileStatus)),
  });
}

export function parseHello(message: Message): Hello {
  const ops = field<unknown[]>(message, "ops", "array");
  if (!ops.every((op) => typeof op === "string")) {
    throw new ProtocolError("response field 'ops' is missing or has the wrong type");
  }
  return Object.freeze({
    version: field<number>(message, "v", "integer"),
    server: field<string>(message, "server", "string"),
    ops: Object.freeze(ops as string[]),
  });
}

export function parseWatchEvent(message: Message): WatchEvent {
  const event = field<string>(message, "event", "string");
  return Object.freeze({ event, token: event === "token" ? parseToken(message) : null });
}

export function parseNothing(): undefined {
  return undefined;
}

// -- customer sessions -------------------------------------------------------------------

/**
 * A customer's session as login or register made it. The handle is the session's only
 * key (the daemon keeps none in clear): put it in the customer's cookie and nowhere else.
 * `console.log`/`util.inspect` and `JSON.stringify` leave it out; read `.handle` to use it.
 */
export class CustomerSession {
  readonly #handle: string;

  constructor(
    readonly app: string,
    handle: string,
    readonly username: string,
    /** When the bearer the daemon holds now expires (Unix seconds). */
    readonly expiresAt: number,
    /** When the session ends at the latest (Unix seconds), or null if the daemon set no end. */
    readonly sessionEndsAt: number | null,
    readonly remember: boolean,
  ) {
    this.#handle = handle;
    Object.freeze(this);
  }

  get handle(): string {
    return this.#handle;
  }

  toJSON(): Omit<SessionInfo, "customerType"> & { app: string } {
    const { app, username, expiresAt, sessionEndsAt, remember } = this;
    return { app, username, expiresAt, sessionEndsAt, remember };
  }

  [inspect.custom](): string {
    return `CustomerSession ${inspect(this.toJSON())}`;
  }
}

/** A customer's bearer token; like `Token`, it never shows its value in logs or JSON. */
export class SessionToken {
  constructor(
    readonly app: string,
    readonly token: string,
    readonly expiresAt: number,
  ) {
    Object.freeze(this);
  }

  expiresIn(now: number = Date.now() / 1000): number {
    return this.expiresAt - now;
  }

  get authorization(): string {
    return `Bearer ${this.token}`;
  }

  toJSON(): { app: string; expiresAt: number } {
    return { app: this.app, expiresAt: this.expiresAt };
  }

  [inspect.custom](): string {
    return `SessionToken { app: ${inspect(this.app)}, expiresAt: ${this.expiresAt} }`;
  }
}

/** What `sessionInfo` says of a session (the SDK's `authorized()`). */
export interface SessionInfo {
  readonly username: string;
  readonly customerType: string;
  readonly expiresAt: number;
  readonly sessionEndsAt: number | null;
  readonly remember: boolean;
}

/** One session in an admin's listing: named by 8 hex digits of its keyed id, never its handle. */
export interface SessionListing {
  readonly session: string;
  /** null when the daemon cannot open the sealed username (e.g. its key is gone). */
  readonly username: string | null;
  readonly createdAt: number;
  readonly lastUsedAt: number;
  readonly endsAt: number | null;
}

export function parseCustomerSession(message: Message): CustomerSession {
  return new CustomerSession(
    field<string>(message, "app", "string"),
    field<string>(message, "handle", "string"),
    field<string>(message, "username", "string"),
    field<number>(message, "expires_at", "number"),
    optional<number>(message, "session_ends_at", "number"),
    field<boolean>(message, "remember", "boolean"),
  );
}

export function sessionTokenParser(app: string): (message: Message) => SessionToken {
  return (message) =>
    new SessionToken(app, field<string>(message, "token", "string"), field<number>(message, "expires_at", "number"));
}

export function parseSessionInfo(message: Message): SessionInfo {
  return Object.freeze({
    username: field<string>(message, "username", "string"),
    customerType: field<string>(message, "customer_type", "string"),
    expiresAt: field<number>(message, "expires_at", "number"),
    sessionEndsAt: optional<number>(message, "session_ends_at", "number"),
    remember: field<boolean>(message, "remember", "boolean"),
  });
}

export function parseExpiresAt(message: Message): number {
  return field<number>(message, "expires_at", "number");
}

export function parseSessionListings(message: Message): readonly SessionListing[] {
  const entries = field<unknown[]>(message, "sessions", "array").map((entry): SessionListing => {
    if (typeof entry !== "object" || entry === null || Array.isArray(entry)) {
      throw new ProtocolError("sessions entry is not a map");
    }
    const m = entry as Message;
    return Object.freeze({
      session: field<string>(m, "session", "string"),
      username: optional<string>(m, "username", "string"),
      createdAt: field<number>(m, "created_at", "number"),
      lastUsedAt: field<number>(m, "last_used_at", "number"),
      endsAt: optional<number>(m, "ends_at", "number"),
    });
  });
  return Object.freeze(entries);
}

export function parseEnded(message: Message): number {
  return field<number>(message, "ended", "integer");
}
