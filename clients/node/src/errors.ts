/**
 * Typed errors: one class per wire error code, grouped in the Python client's families.
 *
 * Catch the family you can act on (`LoginRequired`: ask a person to log in;
 * `Unavailable`: try again later) and still find the exact `code` and the daemon's
 * `message` on the error. Messages never hold a token or a password: the daemon never puts
 * one there, and this client adds none.
 */

import { Code } from "./protocol.js";

/** Any failure of a call to the broker. */
export class BrokerError extends Error {
  readonly code: string;

  constructor(message: string, code?: string) {
    super(message);
    this.code = code ?? (new.target as unknown as { defaultCode: string }).defaultCode;
    this.name = new.target.name;
  }

  static readonly defaultCode: string = Code.INTERNAL;
}

/** No daemon answers at the socket (missing, refused, or it closed the connection). */
export class BrokerNotRunning extends BrokerError {
  static override readonly defaultCode: string = "not_running";
}

/**
 * The socket, or the directory holding it, could be controlled by another user: nothing
 * was sent to it. Raised for a path given explicitly (or in $GEINS_BROKER_SOCKET), and by
 * the default search when candidates exist but none passes the rule.
 */
export class UntrustedSocket extends BrokerError {
  static override readonly defaultCode: string = "untrusted_socket";
}

/** The two sides do not understand each other: bad_frame, bad_request, unknown_op. */
export class ProtocolError extends BrokerError {
  static override readonly defaultCode: string = Code.BAD_REQUEST;
}
export class BadFrame extends ProtocolError {
  static override readonly defaultCode: string = Code.BAD_FRAME;
}
export class BadRequest extends ProtocolError {
  static override readonly defaultCode: string = Code.BAD_REQUEST;
}
export class UnknownOp extends ProtocolError {
  static override readonly defaultCode: string = Code.UNKNOWN_OP;
}

export class UnknownProfile extends BrokerError {
  static override readonly defaultCode: string = Code.UNKNOWN_PROFILE;
}

/** The daemon refused this uid for this operation or profile. */
export class Forbidden extends BrokerError {
  static override readonly defaultCode: string = Code.FORBIDDEN;
}

/** Nobody has logged in to this profile (or someone logged out). */
export class NotLoggedIn extends BrokerError {
  static override readonly defaultCode: string = Code.NOT_LOGGED_IN;
}

/** The session ended upstream (refresh token rejected or expired): log in again. */
export class LoginRequired extends BrokerError {
  static override readonly defaultCode: string = Code.LOGIN_REQUIRED;
}

/**
 * The handle names no live session of this app: it never was one, it ended (logout, idle,
 * lifetime, eviction, "log out everywhere"), or it is another app's. The daemon answers all
 * of these alike, on purpose. Log the customer in again.
 */
export class UnknownSession extends BrokerError {
  static override readonly defaultCode: string = Code.UNKNOWN_SESSION;
}

/** No `[apps.NAME]` of that name in the daemon's config. */
export class UnknownApp extends BrokerError {
  static override readonly defaultCode: string = Code.UNKNOWN_APP;
}

/** Geins refused the username or password (or, for register, the username is taken). */
export class InvalidCredentials extends BrokerError {
  static override readonly defaultCode: string = Code.INVALID_CREDENTIALS;
}

/** Try again later: Geins unreachable, a timeout, or the daemon is busy. */
export class Unavailable extends BrokerError {
  static override readonly defaultCode: string = Code.UPSTREAM_UNAVAILABLE;
}
export class UpstreamUnavailable extends Unavailable {
  static override readonly defaultCode: string = Code.UPSTREAM_UNAVAILABLE;
}
/** Geins, the daemon's wait for a refresh, or the broker itself took too long. */
export class Timeout extends Unavailable {
  static override readonly defaultCode: string = Code.TIMEOUT;
}
export class Busy extends Unavailable {
  static override readonly defaultCode: string = Code.BUSY;
}

/**
 * Too many login or register attempts for this username or from this uid. `retryAfter`
 * is the daemon's word (seconds) on when another attempt may pass; null if it gave none.
 */
export class RateLimited extends BrokerError {
  static override readonly defaultCode: string = Code.RATE_LIMITED;
  readonly retryAfter: number | null;

  constructor(message: string, code?: string, retryAfter: number | null = null) {
    super(message, code);
    this.retryAfter = retryAfter;
  }
}

/** Geins answered, but not with something the broker could use. */
export class UpstreamError extends BrokerError {
  static override readonly defaultCode: string = Code.UPSTREAM_ERROR;
}

/** A bug in the daemon; the details are in its log. */
export class InternalError extends BrokerError {
  static override readonly defaultCode: string = Code.INTERNAL;
}

type ErrorClass = new (message: string, code?: string, retryAfter?: number | null) => BrokerError;

/** The class for each wire code. */
export const ERROR_CLASSES: Readonly<Record<string, ErrorClass>> = {
  [Code.BAD_FRAME]: BadFrame,
  [Code.BAD_REQUEST]: BadRequest,
  [Code.UNKNOWN_OP]: UnknownOp,
  [Code.UNKNOWN_PROFILE]: UnknownProfile,
  [Code.FORBIDDEN]: Forbidden,
  [Code.NOT_LOGGED_IN]: NotLoggedIn,
  [Code.LOGIN_REQUIRED]: LoginRequired,
  [Code.INVALID_CREDENTIALS]: InvalidCredentials,
  [Code.UPSTREAM_UNAVAILABLE]: UpstreamUnavailable,
  [Code.UPSTREAM_ERROR]: UpstreamError,
  [Code.TIMEOUT]: Timeout,
  [Code.UNKNOWN_APP]: UnknownApp,
  [Code.UNKNOWN_SESSION]: UnknownSession,
  [Code.RATE_LIMITED]: RateLimited,
  [Code.BUSY]: Busy,
  [Code.INTERNAL]: InternalError,
};

/** Longest wait a `retry_after` may ask for (a day): a larger one is a lie, not a plan. */
export const MAX_RETRY_AFTER = 86_400;

/**
 * The error for an `error` map (its `code`, `message` and, for `rate_limited`,
 * `retry_after`); an unknown code from a newer daemon is kept as it is.
 */
export function errorFromWire(code: unknown, message: unknown, retryAfter?: unknown): BrokerError {
  const codeText = typeof code === "string" ? code : Code.INTERNAL;
  const messageText = typeof message === "string" ? message : "(no message)";
  const cls = Object.hasOwn(ERROR_CLASSES, codeText) ? ERROR_CLASSES[codeText] : undefined;
  if (!cls) return new BrokerError(messageText, codeText);
  const wait =
    typeof retryAfter === "number" && Number.isFinite(retryAfter) && retryAfter >= 0
      ? Math.min(retryAfter, MAX_RETRY_AFTER)
      : null;
  return new cls(messageText, codeText, wait);
}
