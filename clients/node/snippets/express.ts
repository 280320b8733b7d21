import express from "express";
import { Storefront, StorefrontError } from "geins-broker-client";

const MERCHANT_API = "https://merchantapi.geins.io/graphql";
const shop = new Storefront({ app: "shop" }); // [apps.shop] in the broker's config
const app = express();
app.use(express.urlencoded({ extended: false }));

app.post("/login", async (req, res, next) => {
  try {
    const { setCookie } = await shop.login(req, req.body); // checks Origin; body: username, password, remember
    res.append("Set-Cookie", setCookie).redirect(303, "/account");
  } catch (error) {
    if (error instanceof StorefrontError) error.send(res);
    else next(error);
  }
});

app.get("/account", async (req, res, next) => {
  try {
    const customer = await shop.customer(req); // 401 if no session (its headers clear a dead cookie)
    const answer = await customer.fetch(MERCHANT_API, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-ApiKey": process.env["GEINS_API_KEY"] ?? "" },
      body: JSON.stringify({ query: "query UserGet { getUser { email } }", operationName: "UserGet" }),
    });
    res.json(await answer.json());
  } catch (error) {
    if (error instanceof StorefrontError) res.set(Object.fromEntries(error.headers)).redirect(303, "/login");
    else next(error);
  }
});

app.post("/logout", async (req, res, next) => {
  try {
    res.append("Set-Cookie", await shop.logout(req)).redirect(303, "/login"); // at the broker and at Geins
  } catch (error) {
    if (error instanceof StorefrontError) error.send(res);
    else next(error);
  }
});

app.post("/cart", (req, res) => {
  shop.checkOrigin(req); // every other state-changing route checks the Origin too
  res.sendStatus(204);
});

app.listen(3000);
