// The official SDK's own user.get(), signed with the broker's token.
//
//   npm install @geins/core@0.10.4 @geins/crm@0.10.4     (not dependencies of this package)
//   node examples/geins-sdk-user.mjs [MERCHANT_API_BASE]
//
// @geins/crm 0.10.4 is stateless: user.get(userToken) takes the bearer as an argument, so
// the broker's token is all it needs; the broker keeps it fresh. The SDK has the Merchant
// API's address built in (https://merchantapi.geins.io/graphql); with MERCHANT_API_BASE
// (e.g. the emulator's http://127.0.0.1:PORT) this example sends the SDK's requests there
// instead, by wrapping the global fetch the SDK's GraphQL client calls. Until the emulator
// answers the getUser query (it knows only the register commit today), it answers 400
// "knows only the UserCreate mutation" and the SDK throws that: which shows the SDK's
// request got through the emulator's API key and bearer checks with the broker's token.
// Against Geins, or an emulator with getUser, the user comes back.

import { GeinsCore } from "@geins/core";
import { GeinsCRM } from "@geins/crm";
import { TokenCache } from "geins-broker-client";

const [base] = process.argv.slice(2);
if (base) {
  const real = globalThis.fetch;
  globalThis.fetch = (input, init) =>
    real(String(input instanceof Request ? input.url : input).replace("https://merchantapi.geins.io", base), init);
}

const core = new GeinsCore({
  apiKey: process.env.GEINS_API_KEY ?? "demo-api-key",
  accountName: process.env.GEINS_ACCOUNT ?? "demo",
  environment: process.env.GEINS_ENVIRONMENT ?? "prod",
  channel: "1",
  tld: "se",
  locale: "sv-SE",
  market: "se",
});
const crm = new GeinsCRM(core, { clientConnectionMode: "Direct" });
const cache = new TokenCache({ profile: process.env.GEINS_PROFILE ?? "default" });

const user = await crm.user.get((await cache.get()).token);
console.log(JSON.stringify(user ?? null));
cache.client.close();
