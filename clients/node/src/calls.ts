/**
 * Requests and how to read their answers, without any I/O.
 *
 * Each builder returns the frame's fields (without the id) in the same order as the Python
 * client's `calls` module, so the two clients put the same bytes on the wire: the
 * protocol vectors check it. Arguments a caller leaves out are not sent; the daemon fills in
 * its defaults.
 */

import { BrokerError, ProtocolError, errorFromWire } from "./errors.js";
import { Op, type Message } from "./protocol.js";

export interface Call {
  readonly fields: Readonly<Message>;
  /** Safe to send again on a new connection if the old one died mid-call. */
  readonly idempotent: boolean;
}

function call(op: string, args: Message, profile: string | undefined, idempotent = false): Call {
  const fields: Message = { op };
  for (const [key, value] of Object.entries(args)) {
    if (value !== undefined && value !== null) fields[key] = value;
  }
  if (profile !== undefined) fields["profile"] = profile;
  return { fields, idempotent };
}

export const calls = {
  hello: (client?: string): Call => call(Op.HELLO, { v: 1, client }, undefined, true),
  // min_valid 0 is the daemon's default: left out, as the Python client does.
  token: (profile?: string, minValid = 0): Call =>
    call(Op.TOKEN, { min_valid: minValid || undefined }, profile, true),
  user: (profile?: string): Call => call(Op.USER, {}, profile, true),
  status: (): Call => call(Op.STATUS, {}, undefined, true),
  login: (username: string, password: string, profile?: string, remember = false): Call =>
    call(Op.LOGIN, { username, password, remember }, profile),
  logout: (profile?: string): Call => call(Op.LOGOUT, {}, profile),
  refresh: (profile?: string): Call => call(Op.REFRESH, {}, profile),
  changePassword: (password: string, newPassword: string, profile?: string): Call =>
    call(Op.CHANGE_PASSWORD, { password, new_password: newPassword }, profile),
  register: (
    username: string,
    password: string,
    profile?: string,
    remember = false,
    user?: Readonly<Record<string, unknown>>,
  ): Call => call(Op.REGISTER, { username, password, remember, user }, profile),
  watch: (profile?: string): Call => call(Op.WATCH, {}, profile),

  // Customer sessions: the app names an [apps.NAME] section; a handle names one session.
  sessionLogin: (app: string, username: string, password: string, remember = false): Call =>
    call(Op.SESSION_LOGIN, { app, username, password, remember }, undefined),
  sessionRegister: (
    app: string,
    username: string,
    password: string,
    remember = false,
    user?: Readonly<Record<string, unknown>>,
  ): Call => call(Op.SESSION_REGISTER, { app, username, password, remember, user }, undefined),
  sessionToken: (app: string, handle: string, minValid = 0): Call =>
    call(Op.SESSION_TOKEN, { app, handle, min_valid: minValid || undefined }, undefined, true),
  sessionInfo: (app: string, handle: string): Call => call(Op.SESSION_INFO, { app, handle }, undefined, true),
  sessionPasswd: (app: string, handle: string, password: string, newPassword: string): Call =>
    call(Op.SESSION_PASSWD, { app, handle, password, new_password: newPassword }, undefined),
  sessionLogout: (app: string, handle: string): Call => call(Op.SESSION_LOGOUT, { app, handle }, undefined),
  sessions: (app: string, username?: string): Call => call(Op.SESSIONS, { app, username }, undefined, true),
  sessionEnd: (app: string, username: string): Call => call(Op.SESSION_END, { app, username }, undefined),
};

/** The response itself if it says ok, else the typed error it carries. */
export function outcome(message: Message): Message {
  if (message["ok"] === true) return message;
  const error = message["error"];
  if (message["ok"] === false && typeof error === "object" && error !== null && !Array.isArray(error)) {
    const fields = error as Message;
    throw errorFromWire(fields["code"], fields["message"], fields["retry_after"]);
  }
  throw new ProtocolError("response has neither ok: true nor an error map");
}

/** The result a response carries, or the error it carries. */
export function answer<T>(parse: (message: Message) => T, message: Message): T {
  try {
    return parse(outcome(message));
  } catch (error) {
    if (error instanceof BrokerError) throw error;
    throw new ProtocolError(`malformed response: ${String(error)}`);
  }
}
