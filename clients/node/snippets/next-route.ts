// app/login/route.ts (a Next.js route handler)
import { Storefront, StorefrontError } from "geins-broker-client";

const shop = new Storefront({ app: "shop" });

export async function POST(request: Request): Promise<Response> {
  const form = await request.formData();
  try {
    const { setCookie } = await shop.login(request, {
      username: form.get("username"),
      password: form.get("password"),
      remember: form.get("remember"),
    });
    return new Response(null, { status: 303, headers: { Location: "/account", "Set-Cookie": setCookie } });
  } catch (error) {
    if (error instanceof StorefrontError) return error.toResponse(); // 403 cross-origin, 401, 429, 503
    throw error;
  }
}

// app/api/me/route.ts: the customer's own data, fetched with their bearer
export async function GET(request: Request): Promise<Response> {
  try {
    const customer = await shop.customer(request);
    return await customer.fetch("https://merchantapi.geins.io/graphql", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-ApiKey": process.env["GEINS_API_KEY"] ?? "" },
      body: JSON.stringify({ query: "query UserGet { getUser { email } }", operationName: "UserGet" }),
    });
  } catch (error) {
    if (error instanceof StorefrontError) return error.toResponse();
    throw error;
  }
}
