// An example storefront on node:http and the broker's storefront kit: log in (remember
// me), register, "my account" (getUser and the orders through the Merchant API, as the
// customer), a page that fans out 20 Merchant API calls, and log out.
//
// The browser holds only the session cookie (the handle); the customer's tokens stay in
// the broker. Configuration, from the environment:
//   GEINS_BROKER_SOCKET  the broker's socket (default: the usual places)
//   STOREFRONT_APP       the broker's [apps.NAME] (default: shop)
//   MERCHANT_API_URL     the Merchant API's GraphQL endpoint (e.g. http://127.0.0.1:8080/graphql)
//   GEINS_API_KEY        the Merchant API key (sent as X-ApiKey)
//   HOST, PORT           where to listen (default 127.0.0.1, 3000; PORT=0 picks one)
//   STOREFRONT_ORIGIN    the shop's origin, when not http://HOST:PORT (e.g. behind a proxy)
//   COOKIE_SECURE        "false" for plain-http development on a host other than localhost
// It prints "listening on URL" once it accepts connections.

import { createServer } from "node:http";

import { BrokerClient, Storefront, StorefrontError } from "geins-broker-client";

const env = process.env;
const merchantApi = env.MERCHANT_API_URL;
const apiKey = env.GEINS_API_KEY ?? "";
if (!merchantApi) {
  console.error("storefront: set MERCHANT_API_URL (the Merchant API's /graphql URL)");
  process.exit(2);
}
const FANOUT = 20;
const MAX_FORM = 8 * 1024;

const broker = new BrokerClient({ socketPath: env.GEINS_BROKER_SOCKET, timeout: 15_000 });
let shop; // made once the listening port (and so the origin) is known

const QUERIES = {
  user: { operationName: "UserGet", query: "query UserGet { getUser { id email customerType } }" },
  orders: { operationName: "UserOrders", query: "query UserOrders { getOrders { id status total } }" },
};

/** One Merchant API query as the customer; its `data`, or an Error saying what failed. */
async function merchant(fetch, which) {
  const response = await fetch(merchantApi, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-ApiKey": apiKey },
    body: JSON.stringify(QUERIES[which]),
  });
  if (response.status === 401) throw shop.loggedOut("the Merchant API refused the session");
  if (!response.ok) throw new Error(`Merchant API answered ${response.status}`);
  return (await response.json()).data;
}

// -- pages -----------------------------------------------------------------------------

const escape = (value) =>
  String(value).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function page(title, body) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>${escape(title)}</title>
<style>body{font:16px system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem}
label{display:block;margin:.5rem 0}input[type=email],input[type=password]{width:100%;padding:.4rem}
button{padding:.4rem 1rem}.error{color:#b00}table{border-collapse:collapse}td,th{padding:.2rem .6rem;border:1px solid #ccc}
nav a,nav form{margin-right:1rem;display:inline}</style></head><body><h1>${escape(title)}</h1>${body}</body></html>`;
}

const nav = `<nav><a href="/account">My account</a><a href="/fanout">Fan-out</a>
<form method="post" action="/logout"><button data-testid="logout">Log out</button></form></nav>`;

function credentialsForm(action, error) {
  const other = action === "/login" ? `<a href="/register">Register</a>` : `<a href="/login">Log in</a>`;
  return `${error ? `<p class="error" data-testid="error">${escape(error)}</p>` : ""}
<form method="post" action="${action}">
<label>E-mail <input type="email" name="username" required autocomplete="username"></label>
<label>Password <input type="password" name="password" required autocomplete="${action === "/login" ? "current" : "new"}-password"></label>
<label><input type="checkbox" name="remember"> Remember me</label>
<button type="submit" data-testid="submit">${action === "/login" ? "Log in" : "Register"}</button></form><p>${other}</p>`;
}

async function account(customer) {
  const [user, orders] = await Promise.all([merchant(customer.fetch, "user"), merchant(customer.fetch, "orders")]);
  const rows = orders.getOrders.map((o) => `<tr><td>${escape(o.id)}</td><td>${escape(o.status)}</td><td>${escape(o.total)}</td></tr>`);
  return page(
    "My account",
    `${nav}<p>Logged in as <strong data-testid="email">${escape(user.getUser.email)}</strong>
(customer ${escape(user.getUser.id)}, ${escape(user.getUser.customerType)}).</p>
<h2>Orders</h2><table data-testid="orders"><tr><th>#</th><th>status</th><th>total</th></tr>${rows.join("")}</table>
<p data-testid="order-count">${orders.getOrders.length} orders</p>`,
  );
}

async function fanout(customer) {
  const started = Date.now();
  const answers = await Promise.all(Array.from({ length: FANOUT }, () => merchant(customer.fetch, "user")));
  const emails = answers.map((a) => a.getUser.email);
  return page(
    "Fan-out",
    `${nav}<p data-testid="answered">${answers.length} of ${FANOUT} answered</p>
<p>Every call as <span data-testid="emails">${escape([...new Set(emails)].join(", "))}</span>
in ${Date.now() - started} ms.</p><ol>${emails.map((e) => `<li>${escape(e)}</li>`).join("")}</ol>`,
  );
}

// -- the server --------------------------------------------------------------------------

function send(res, status, html, headers = []) {
  for (const [name, value] of headers) res.appendHeader(name, value);
  res.writeHead(status, { "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store" });
  res.end(html);
}

function redirect(res, location, headers = []) {
  for (const [name, value] of headers) res.appendHeader(name, value);
  res.writeHead(303, { Location: location, "Cache-Control": "no-store" });
  res.end();
}

async function form(req) {
  let size = 0;
  const chunks = [];
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_FORM) throw new StorefrontError(413, "form too large");
    chunks.push(chunk);
  }
  return Object.fromEntries(new URLSearchParams(Buffer.concat(chunks).toString("utf8")));
}

/** A page for the request's customer; not logged in (or the session ended): to /login. */
async function customerPage(res, req, render) {
  try {
    send(res, 200, await render(await shop.customer(req)));
  } catch (error) {
    if (error instanceof StorefrontError && error.status === 401) redirect(res, "/login", error.headers);
    else throw error;
  }
}

async function signIn(req, res, action) {
  try {
    const fields = await form(req);
    const signedIn = action === "/login" ? await shop.login(req, fields) : await shop.register(req, fields);
    redirect(res, "/account", [["Set-Cookie", signedIn.setCookie]]);
  } catch (error) {
    if (!(error instanceof StorefrontError)) throw error;
    send(res, error.status, page(action === "/login" ? "Log in" : "Register", credentialsForm(action, error.message)), error.headers);
  }
}

async function route(req, res) {
  const path = new URL(req.url ?? "/", "http://x").pathname;
  const key = `${req.method} ${path}`;
  switch (key) {
    case "GET /":
      return redirect(res, shop.handle(req) ? "/account" : "/login");
    case "GET /login":
      return send(res, 200, page("Log in", credentialsForm("/login")));
    case "GET /register":
      return send(res, 200, page("Register", credentialsForm("/register")));
    case "POST /login":
    case "POST /register":
      return signIn(req, res, path);
    case "GET /account":
      return customerPage(res, req, account);
    case "GET /fanout":
      return customerPage(res, req, fanout);
    case "POST /logout":
      try {
        return redirect(res, "/login", [["Set-Cookie", await shop.logout(req)]]);
      } catch (error) {
        if (error instanceof StorefrontError) return error.send(res);
        throw error;
      }
    case "GET /healthz":
      res.writeHead(200, { "Content-Type": "text/plain" });
      return res.end("ok\n");
    default:
      res.writeHead(404, { "Content-Type": "text/plain" });
      return res.end("not found\n");
  }
}

const server = createServer((req, res) => {
  route(req, res).catch((error) => {
    const status = error instanceof StorefrontError ? error.status : 500;
    // The error's class and message only: never a request's cookie or a token.
    console.error(`storefront: ${req.method} ${req.url} -> ${status}: ${error?.name}: ${error?.message}`);
    if (!res.headersSent) send(res, status, page("Something went wrong", `<p class="error">${escape(error?.message)}</p>`));
    else res.destroy();
  });
});

server.listen(Number(env.PORT ?? 3000), env.HOST ?? "127.0.0.1", () => {
  const { address, port } = server.address();
  const url = `http://${address.includes(":") ? `[${address}]` : address}:${port}`;
  shop = new Storefront({
    app: env.STOREFRONT_APP ?? "shop",
    client: broker,
    origins: [env.STOREFRONT_ORIGIN ?? url, ...(env.STOREFRONT_ORIGIN ? [] : [url.replace("127.0.0.1", "localhost")])],
    cookie: { secure: env.COOKIE_SECURE !== "false" },
  });
  console.log(`listening on ${url}`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.once(signal, () => {
    server.close();
    server.closeAllConnections();
    broker.close();
  });
}
