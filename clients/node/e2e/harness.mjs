// The storefront's world for the browser suite: the emulator (Geins), the broker daemon
// with an [apps.shop] section, and the example storefront, each a real process; and
// Debian's chromium driven by playwright-core.

import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { BrokerClient } from "geins-broker-client";

const HERE = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(HERE, "..", "..", "..");
export const STOREFRONT = join(REPO, "clients", "node", "examples", "storefront");
export const GEINS_BROKER = process.env.GEINS_BROKER_BIN ?? join(REPO, ".venv", "bin", "geins-broker");
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
export const OUTPUT = process.env.E2E_OUTPUT ?? join(HERE, "output");
export const API_KEY = "demo-api-key";
/** The flags every launch uses: a quiet, headless browser that fetches nothing on its own. */
export const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** Why the suite cannot run here, or null. */
export function missing() {
  if (!existsSync(CHROMIUM)) return `no chromium at ${CHROMIUM} (apt-get install chromium)`;
  if (!existsSync(GEINS_BROKER)) return `no geins-broker at ${GEINS_BROKER} (source scripts/_venv.sh)`;
  if (!existsSync(join(REPO, "clients", "node", "dist", "index.js"))) return "the Node client is not built (npm run build)";
  if (!existsSync(join(STOREFRONT, "node_modules", "geins-broker-client"))) return "the example's dependencies are not installed (npm ci)";
  return null;
}

/** A process that prints "listening on URL" first; resolves to [child, URL]. */
async function started(command, args, options) {
  const child = spawn(command, args, { stdio: ["ignore", "pipe", "inherit"], ...options });
  const lines = createInterface({ input: child.stdout });
  const first = await new Promise((done, fail) => {
    const timer = setTimeout(() => fail(new Error(`${command} said nothing within 20 s`)), 20_000);
    lines.once("line", (line) => (clearTimeout(timer), done(line)));
    child.once("exit", (code) => (clearTimeout(timer), fail(new Error(`${command} ${args[0]} exited with ${code}`))));
  });
  lines.close();
  child.stdout.resume();
  if (!first.startsWith("listening on ")) throw new Error(`${command} said: ${first}`);
  return [child, first.slice("listening on ".length).trim()];
}

export async function stop(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((done) => child.once("exit", done));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

export class Emulator {
  static async start(tokenTtl) {
    const emulator = new Emulator();
    [emulator.process, emulator.url] = await started(GEINS_BROKER, ["emulator", "--token-ttl", String(tokenTtl)], {});
    return emulator;
  }

  async control(method, action, body) {
    const response = await fetch(`${this.url}/_emulator/${action}`, {
      method,
      headers: { "Content-Type": "application/json" },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
    if (!response.ok) throw new Error(`emulator ${action}: ${response.status} ${await response.text()}`);
    return response.json();
  }

  /** Request counts by route (`GET /login` is a refresh, `POST /login` half a login). */
  async counts() {
    return (await this.control("GET", "stats")).counts;
  }

  /** { live, rotations, all_rotations, refresh_requests } for a user, as Geins sees them. */
  sessionsOf(username) {
    return this.control("POST", "user_sessions", { username });
  }
}

export class Daemon {
  constructor(dir, emulator) {
    this.socket = join(dir, "broker.sock");
    this.config = join(dir, "config.toml");
    const q = JSON.stringify;
    writeFileSync(
      this.config,
      [
        "[broker]",
        `socket = ${q(this.socket)}`,
        `state_dir = ${q(join(dir, "state"))}`,
        "[apps.shop]",
        'account = "demo"',
        `api_key = ${q(API_KEY)}`,
        `auth_service_url = ${q(emulator.url)}`,
        `merchant_api_url = ${q(emulator.url)}`,
        'channel_id = "1|se"',
        'language_id = "sv-SE"',
        'market_id = "se"',
        "",
      ].join("\n"),
    );
    this.process = null;
  }

  async start() {
    const env = { ...process.env };
    delete env.NOTIFY_SOCKET;
    this.process = spawn(GEINS_BROKER, ["serve", "--config", this.config], { stdio: ["ignore", "ignore", "inherit"], env });
    const client = new BrokerClient({ socketPath: this.socket, timeout: 2000 });
    const deadline = Date.now() + 20_000;
    try {
      for (;;) {
        if (this.process.exitCode !== null) throw new Error(`daemon exited with ${this.process.exitCode}`);
        try {
          await client.hello();
          return;
        } catch (error) {
          if (Date.now() > deadline) throw error;
          await new Promise((done) => setTimeout(done, 50));
        }
      }
    } finally {
      client.close();
    }
  }

  stop() {
    return stop(this.process);
  }
}

/** The example storefront, started as a person would (`npm start`'s command). */
export async function startStorefront(daemon, emulator) {
  const [child, url] = await started(process.execPath, [join(STOREFRONT, "server.mjs")], {
    cwd: STOREFRONT,
    env: {
      PATH: process.env.PATH ?? "",
      GEINS_BROKER_SOCKET: daemon.socket,
      MERCHANT_API_URL: `${emulator.url}/graphql`,
      GEINS_API_KEY: API_KEY,
      PORT: "0",
      HOST: "127.0.0.1",
    },
  });
  return { process: child, url };
}

/**
 * Another site (another origin) whose page posts a form to `target` as soon as it loads:
 * the shape of a cross-site request forgery.
 */
export async function startAttacker() {
  const pages = new Map();
  const server = createServer((req, res) => {
    const html = pages.get(new URL(req.url ?? "/", "http://x").pathname);
    res.writeHead(html ? 200 : 404, { "Content-Type": "text/html" });
    res.end(html ?? "");
  });
  await new Promise((done) => server.listen(0, "127.0.0.1", done));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    /** A page at `path` that posts `fields` to `action` on load. */
    page(path, action, fields) {
      const inputs = Object.entries(fields)
        .map(([k, v]) => `<input type="hidden" name="${k}" value="${v}">`)
        .join("");
      pages.set(path, `<!doctype html><form method="post" action="${action}">${inputs}</form><script>document.forms[0].submit()</script>`);
    },
    close: () => new Promise((done) => server.close(done)),
  };
}

export function shortTmp() {
  return mkdtempSync("/tmp/gb-e2e-");
}

export function removeTmp(dir) {
  rmSync(dir, { recursive: true, force: true });
}

export function outputDir() {
  mkdirSync(OUTPUT, { recursive: true });
  return OUTPUT;
}
