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
