/**
 * The geins-broker wire protocol, version 1: frames, op names and error codes.
 *
 * Sans-IO, like its Python twin (clients/python/geins_broker_client/protocol.py): bytes in,
 * messages out; messages in, bytes out. No sockets, no clocks. A frame is a 4-byte unsigned
 * big-endian length N, then N bytes holding one msgpack map with string keys. Both codecs
 * check themselves against docs/protocol-vectors.json, which is generated from the Python
 * one, so the two cannot drift apart.
 */

import { Decoder, Encoder } from "@msgpack/msgpack";

export const VERSION = 1;
/** The largest request body the daemon reads; a longer frame ends the connection. */
export const MAX_REQUEST_SIZE = 64 * 1024;
/** The largest response body the client accepts (`status` with ten thousand profiles fits). */
export const MAX_RESPONSE_SIZE = 16 * 1024 * 1024;
export const HEADER_SIZE = 4;

export const Op = {
  HELLO: "hello",
  TOKEN: "token",
  USER: "user",
  STATUS: "status",
  LOGIN: "login",
  LOGOUT: "logout",
  REFRESH: "refresh",
  CHANGE_PASSWORD: "change_password",
  REGISTER: "register",
  WATCH: "watch",
  SESSION_LOGIN: "session_login",
  SESSION_REGISTER: "session_register",
  SESSION_TOKEN: "session_token",
  SESSION_INFO: "session_info",
  SESSION_PASSWD: "session_passwd",
  SESSION_LOGOUT: "session_logout",
  SESSIONS: "sessions",
  SESSION_END: "session_end",
} as const;
export type OpName = (typeof Op)[keyof typeof Op];

export const Code = {
  BAD_FRAME: "bad_frame",
  BAD_REQUEST: "bad_request",
  UNKNOWN_OP: "unknown_op",
  UNKNOWN_PROFILE: "unknown_profile",
  FORBIDDEN: "forbidden",
  NOT_LOGGED_IN: "not_logged_in",
  LOGIN_REQUIRED: "login_required",
  INVALID_CREDENTIALS: "invalid_credentials",
  UPSTREAM_UNAVAILABLE: "upstream_unavailable",
  UPSTREAM_ERROR: "upstream_error",
  TIMEOUT: "timeout",
  UNKNOWN_APP: "unknown_app",
  UNKNOWN_SESSION: "unknown_session",
  RATE_LIMITED: "rate_limited",
  BUSY: "busy",
  INTERNAL: "internal",
} as const;
export type ErrorCode = (typeof Code)[keyof typeof Code];

/** One decoded frame: a map with string keys. */
export type Message = Record<string, unknown>;

/** A frame that cannot be read. The stream is out of step after it and must close. */
export class FrameError extends Error {
  override name = "FrameError";
}

// Strings are always msgpack str (never bin); integers stay integers. `undefined` fields
// are left out, so an optional argument the caller did not give is not sent at all.
const encoder = new Encoder({ ignoreUndefined: true });

function stringKey(key: unknown): string {
  if (typeof key !== "string") throw new FrameError("frame's map has keys that are not strings");
  return key;
}

function newDecoder(): Decoder {
  return new Decoder({ mapKeyConverter: stringKey });
}

/** One complete frame: the length prefix and the msgpack body. */
export function encode(message: Readonly<Message>): Buffer {
  const body = encoder.encode(message);
  const frame = Buffer.allocUnsafe(HEADER_SIZE + body.byteLength);
  frame.writeUInt32BE(body.byteLength, 0);
  frame.set(body, HEADER_SIZE);
  return frame;
}

const bodyDecoder = newDecoder();

/** One frame's body as a message, or FrameError saying why it is not one. */
export function decodeBody(body: Uint8Array): Message {
  if (body.byteLength === 0) throw new FrameError("empty frame");
  let value: unknown;
  try {
    value = bodyDecoder.decode(body);
  } catch (error) {
    if (error instanceof FrameError) throw error;
    const kind = error instanceof Error ? error.name : typeof error;
    throw new FrameError(`frame is not one msgpack value (${kind})`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value) || value instanceof Uint8Array) {
    throw new FrameError(`frame holds a msgpack ${describe(value)}, not a map`);
  }
  return value as Message;
}

function describe(value: unknown): string {
  if (value === null) return "nil";
  if (Array.isArray(value)) return "array";
  if (value instanceof Uint8Array) return "bin";
  return typeof value;
}

/**
 * Splits a byte stream into messages.
 *
 * `feed` returns every message completed by the new bytes. A frame that cannot be read
 * stops the decoder: the messages before it are returned, `error` says what was wrong, and
 * later bytes are ignored (the peer is out of step).
 */
export class FrameDecoder {
  error: FrameError | null = null;
  private buffer: Buffer = Buffer.alloc(0);

  constructor(private readonly maxSize: number = MAX_RESPONSE_SIZE) {}

  /** Bytes received but not yet decoded. */
  get buffered(): number {
    return this.buffer.byteLength;
  }

  feed(data: Uint8Array): Message[] {
    if (this.error !== null) return [];
    let bytes: Buffer;
    if (this.buffer.byteLength === 0) {
      bytes = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
      if (bytes.byteLength > HEADER_SIZE) {
        // The common case by far: exactly one whole frame per read.
        const size = bytes.readUInt32BE(0);
        if (size + HEADER_SIZE === bytes.byteLength && size <= this.maxSize) {
          try {
            return [decodeBody(bytes.subarray(HEADER_SIZE))];
          } catch (error) {
            this.error = asFrameError(error);
            return [];
          }
        }
      }
    } else {
      bytes = Buffer.concat([this.buffer, data]);
      this.buffer = Buffer.alloc(0);
    }
    const messages: Message[] = [];
    let offset = 0;
    const end = bytes.byteLength;
    while (end - offset >= HEADER_SIZE) {
      const size = bytes.readUInt32BE(offset);
      if (size > this.maxSize) {
        this.error = new FrameError(`frame of ${size} bytes is over the ${this.maxSize} limit`);
        return messages;
      }
      const start = offset + HEADER_SIZE;
      if (end - start < size) break;
      offset = start + size;
      try {
        messages.push(decodeBody(bytes.subarray(start, offset)));
      } catch (error) {
        this.error = asFrameError(error);
        return messages;
      }
    }
    if (offset < end) this.buffer = Buffer.from(bytes.subarray(offset));
    return messages;
  }
}

function asFrameError(error: unknown): FrameError {
  return error instanceof FrameError ? error : new FrameError(String(error));
}
